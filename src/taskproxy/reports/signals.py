"""Gaming signals: advisory flags about a key, each with its evidence. Pure queries and arithmetic.

A signal says "this key's usage in the period looks like X; here are the numbers". It is never a score,
never a verdict, and never a ranking: signals are ordered by kind (in the order of `KINDS`) and then by
key id, and nothing compares people's spend or tokens with each other. Every threshold is absolute
(a count, an amount, a share of the key's own spend) except the cost outlier, which compares an *item*
with its team's items. Signals name keys and owners, so they are for admins only (the route audits
the read).

Definitions (the period is [since, until); times are naive UTC in the database, ISO 8601 with `Z` out):

- **Events in the period**: `usage_events` rows with `ts` in the period. A **request** is an event with
  `attempt = 1` (fallback attempts belong to the same client request); an **answered request** also has
  `status < 400`. **Spend** (`cost_usd`) is the sum of `cost_usd` over the events, all attempts, counting
  only known prices; `tokens` is the sum of `total_tokens`. A key with only unpriced usage has no spend.
- **Item status**: the item's current `work_items.status`; an item with usage but no row is `unknown`.
- **Key**: owner, team and role from `api_keys` as they are now; for a key with no row, owner and team
  from its events in the period and role null. Service keys (`role = service`) are declared automation:
  they are left out of `repeated_prompt` and `machine_cadence` unless `flag_service_keys`.

The kinds, each with its thresholds (`SignalSettings`; defaults in brackets):

- `repeated_prompt`: the key sent the same `prompt_hash` in at least `repeated_prompt_min_requests` [20]
  answered requests. Evidence: `requests` (all the key's requests), `repeated_prompts` (how many such
  hashes), `repeated_requests` and `cost_usd` (of the requests with those hashes), `first`/`last` (of
  them), and `prompts`: up to `max_examples` [5] of the hashes, `{prompt_hash, requests, cost_usd,
  first, last}`, most requests first (then by hash).
- `spend_after_completion`: requests on items whose status is `done` or `closed`, made more than
  `after_completion_grace_hours` [1] after the item's `completed_at`; flagged with at least
  `after_completion_min_requests` [10] of them. Evidence: `requests`, `cost_usd`, `tokens`, `items`,
  `first`, `last` of those requests; each work item also has its `completed_at`.
- `spend_without_completion`: the key's spend in the period is at least `heavy_spend_min_usd` [50] and
  the items it spent on (any event in the period) that count as completed — status `done` with
  `completed_at` at or after `since` (completed in the period or since; an item done before the period
  is no outcome of this period's spend), and the tickets a merged PR completed since `since` carries
  (not done, never reworked: the adoption report's rule), for the key's spend on them up to the merge —
  took less than `heavy_spend_max_completed_share` [0.1] of it, or there are none (so one cheap
  completed item does not shield the rest). Evidence: `cost_usd`, `requests`, `tokens`, `items`,
  `items_by_status`, `completed_items`, `completed_cost_usd` (carried tickets' part included),
  `carried_tickets`, `first`, `last`.
- `machine_cadence`: a key with at least `cadence_min_requests` [50] requests whose intervals are near
  constant — coefficient of variation (population standard deviation / mean of the seconds between
  consecutive requests) at most `cadence_max_cv` [0.2] — and/or that is active around the clock: on at
  least `around_clock_min_days` [3] UTC days it made requests in at least `around_clock_min_hours` [20]
  distinct hours of that day. Evidence: `requests`, `first`, `last`, `interval_mean_seconds`,
  `interval_median_seconds`, `interval_cv`, `distinct_hours` (hours of the day, UTC, with any request
  in the period), `around_the_clock_days`, and `reasons` (`regular_intervals`, `around_the_clock`).
- `cost_outlier`: items completed in the period (status `done`, `completed_at` in the period) are
  compared within their team. An item's cost is all the spend it ever had, and a merged PR's with its
  carried tickets' usage since each one's merged PR before it, up to its merge (as in the adoption
  report: `signal_carry.py`);
  items none of whose events has a known price are left out. An item's team is `work_items.team`, else
  its project's in the config's `work_items.teams`, else (a PR carrying tickets) theirs, else the team
  that spent the most on it over all time (cost, then tokens, then name); items with none
  are not compared. In a team with at least `cost_min_items` [5] such items, with m the median and MAD
  the median absolute deviation of their costs, an item's robust z-score is 0.6745 × (cost − m) / MAD
  (when MAD is 0: (cost − m) / (1.253314 × mean absolute deviation from m); when that is 0 too, nothing
  in the team is an outlier). An item is an outlier when z ≥ `cost_min_z` [3.5] and its cost is at
  least `cost_min_ratio` [3] × m. The signal names each key that carried at least `cost_min_key_share`
  [0.25] of an outlier item's cost (all time; on a carried ticket, in its span). Evidence: `items`,
  and the key's `cost_usd` and `requests` on them; each work item has `item_cost_usd`, `team`,
  `team_items`, `team_median_usd`, `team_mad_usd`, `robust_z`, `ratio_to_median`, `key_cost_usd`,
  `key_share`, `carried_tickets` (the tickets whose usage its cost holds).
- `trivial_completions`: of the items completed in the period (status `done`, `completed_at` in the
  period) on which the key made requests up to the period's end (before the period too: a tag sent on
  a backlog ticket before the period makes it AI-assisted as one sent in it), at least `trivial_min_items` [5], and at least
  `trivial_min_share` [0.6] of them, are trivial: completed within `trivial_max_minutes` [10] of being
  created or of the key's first event on it (a ticket done by hand, tagged with one
  request to count as AI-assisted), or with a known size of at most `trivial_max_lines` [10] changed
  lines (a pull request's additions + deletions), or light: the key's events on it came
  to at most `trivial_max_tokens` [100] tokens in all (0: not counted; a tag sent hours before the item
  was done escapes the minutes, not this), or the item's spend up to the period's end, every key's, to at most
  `trivial_max_cost_share` [0.01] of the median cost per completed item of the others' items (the
  team's, given `cost_min_items` of them, else all teams'; 0: not counted; a tag padded with prompt
  tokens escapes the tokens, not this). Cost per completed item and the AI-assisted share
  reward such items. Evidence: `completed_items`, `trivial_items`, `share`, `quick_items`,
  `small_items`, `light_items`, and `requests`, `cost_usd`, `tokens`, `items`, `first`, `last` over the trivial items;
  each work item has `completed_at`, `minutes_to_complete`, `minutes_from_first_request`, `changed_lines`, `tokens`
  (light by cost: `item_cost_usd`, `typical_cost_usd`). A team that genuinely ships small changes can be flagged: it is
  evidence to look at (docs/signals.md).
- `split_work`: a burst of small items completed by the key — at least `split_min_items` [4] items
  it made requests on, completed in the period with consecutive completions at most
  `split_window_hours` [8] apart, each with a known size of at most `split_max_item_share` [0.5] of its
  team's median size — whose sizes add up to between 0.5 and 2 times that median: one ordinary item,
  cut up. A team's median is over its items completed in the period with a known size (additions +
  deletions), and needs `split_min_team_items` [5] of them. Evidence: `bursts` (team, items,
  `combined_lines`, `team_median_lines`, first and last completion), and `requests`, `cost_usd`,
  `tokens`, `items`, `first`, `last` over the burst items; each work item has `completed_at` and
  `changed_lines`.
- `unverified_spend`: items whose status is `unverified` or `unknown` carry at least
  `unverified_min_share` [0.6] of the key's spend in the period, and at least `unverified_min_usd` [10],
  not counting a ticket's spend up to the last merge before `until` of a pull request linked to it that
  held then (as the adoption report's spend without outcome: that spend led to merged work). Evidence: `cost_usd` (the key's spend),
  `unverified_cost_usd`, `carried_cost_usd` (the part left out), `share`, `requests`, `items`, `first`,
  `last` (of the requests on those items).

Every signal is `{"kind", "key_id", "owner", "team", "role", "evidence", "work_items"}`; `work_items`
lists the affected items (at most `MAX_LISTED`, by id; `evidence.items` counts them all), each with
`{"id", "status", "requests", "cost_usd", ...}` — the key's own requests and spend on the item in the
period, except for `cost_outlier`, whose figures are all time, and `trivial_completions`, whose are up
to the period's end, before it too. Money is rounded to 9 decimals.

Queries aggregate in SQL (per key and item, per key and prompt hash, per item and key). The machine
cadence's intervals are computed by PostgreSQL (a row per key comes back); on SQLite the request times
(key, ts) are streamed into Python for them (`signal_cadence.py`).
"""

from __future__ import annotations

from datetime import datetime
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Connection, Engine

from taskproxy.settings import SignalSettings
from taskproxy.reports import adoption_data, signal_carry
from taskproxy.reports.signal_cadence import cadence
from taskproxy.reports.signal_checks import (
    after_completion,
    heavy_spenders,
    repeated_prompts,
    split_work,
    trivial_completions,
    unverified,
    unverified_candidates,
    without_completion,
)
from taskproxy.reports.signal_outliers import cost_outliers
from taskproxy.storage.db import one_snapshot
from taskproxy.storage.repo import completed_ids
from taskproxy.reports.signal_data import (
    KINDS,
    Found,
    ItemRow,
    KeyInfo,
    Spend,
    keys_from_events,
    load_items,
    load_keys,
    load_spend,
    load_spend_before,
    with_spend,
)
from taskproxy.money import format_usd
from taskproxy.timeutil import iso
from taskproxy.workitems import completed_in

__all__ = ["KINDS", "SignalSettings", "gaming_signals", "signals_text"]


def _unverified(connection: Connection, spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], since: datetime, until: datetime,
                t: SignalSettings) -> list[Found]:  # fmt: skip
    """`unverified_spend`, less each ticket's spend up to the last merge of its pull requests as of `until`."""
    candidates = unverified_candidates(spend, items)
    merges = signal_carry.merges_as_of(connection, {s.item for spends in candidates.values() for s in spends}, until)
    return unverified(spend, items, t, signal_carry.completed_spend(connection, candidates, merges, since))


def _trivial(connection: Connection, spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], carries: list[adoption_data.Carry],
             since: datetime, until: datetime, t: SignalSettings) -> list[Found]:  # fmt: skip
    """`trivial_completions`, each key's spend on an item completed in the period counted from before the
    period too: a tag sent on a backlog ticket days (or hours) before the period, the ticket done by hand
    in it, made the ticket AI-assisted while the key had no event on it in the period, and the check saw
    nothing (found by a review). Read for the period's completed items alone, by id."""
    completed = [item for item, row in items.items() if completed_in(row.status, row.completed_at, since, until)]
    whole = with_spend(spend, load_spend_before(connection, completed, since))
    return trivial_completions(signal_carry.on_their_pull_requests(connection, whole, carries), items, since, until, t)


def gaming_signals(
    engine: Engine, *, since: datetime, until: datetime, thresholds: SignalSettings | None = None, item_teams: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The gaming signals of [since, until) (see the module docstring): advisory, ordered by kind then key id.
    `item_teams`: the team of each tracker project's items (`work_items.teams`), for an item no one gave one."""
    if since >= until:
        raise ValueError("'since' must be before 'until'")
    t = thresholds or SignalSettings()
    with one_snapshot(engine) as connection:
        spend = load_spend(connection, since, until)
        keys = load_keys(connection, spend)
        keys |= keys_from_events(connection, spend.keys() - keys.keys(), since, until)  # a key with events but no row
        touched = {item for per_item in spend.values() for item in per_item}
        items = load_items(connection, touched | set(connection.execute(completed_ids(since, until)).scalars()), item_teams or {})
        heavy = heavy_spenders(spend, t)
        # The tickets carried by pull requests merged since `since` (an outcome of this period's spend);
        # those merged in the period are the cost comparison's: the same read serves both.
        carries = signal_carry.carried(connection, since)
        merges = signal_carry.last_merges(carries)
        in_period = [carry for carry in carries if carry.merge < until]
        by_kind: dict[str, list[Found]] = {
            "repeated_prompt": repeated_prompts(connection, keys, spend, items, since, until, t),
            "spend_after_completion": after_completion(connection, items, since, until, t),
            "spend_without_completion": without_completion(heavy, items, since, t, signal_carry.completed_spend(connection, heavy, merges, since)),
            "machine_cadence": cadence(connection, keys, spend, items, since, until, t),
            "cost_outlier": cost_outliers(connection, items, since, until, t, item_teams or {}, in_period),
            "unverified_spend": _unverified(connection, spend, items, since, until, t),
            "trivial_completions": _trivial(connection, spend, items, in_period, since, until, t),
            "split_work": split_work(spend, items, keys, since, until, t),
        }
        load_keys(connection, {key_id for found in by_kind.values() for key_id, _, _ in found}, into=keys)
    signals = []
    for kind in KINDS:
        for key_id, evidence, work_items in sorted(by_kind[kind], key=lambda found: found[0]):
            key = keys.get(key_id) or KeyInfo(key_id)
            signals.append(
                {
                    "kind": kind,
                    "key_id": key_id,
                    "owner": key.owner,
                    "team": key.team,
                    "role": key.role,
                    "evidence": evidence,
                    "work_items": work_items,
                }
            )
    return {"since": iso(since), "until": iso(until), "thresholds": t.model_dump(), "signals": signals}


# -- plain text, for the CLI ----------------------------------------------------------------------

_SUMMARY = {
    "repeated_prompt": lambda e: (
        f"{e['repeated_requests']} answered requests with {e['repeated_prompts']} repeated prompt(s) "
        f"(of {e['requests']} requests); most repeated {e['prompts'][0]['prompt_hash'][:12]} x {e['prompts'][0]['requests']}"
    ),
    "spend_after_completion": lambda e: (
        f"{e['requests']} requests, {format_usd(e['cost_usd'])} on {e['items']} item(s) after they were done or closed"
    ),
    "spend_without_completion": lambda e: (
        f"{format_usd(e['cost_usd'])} over {e['requests']} requests on {e['items']} item(s), "
        + (f"{e['completed_items']} completed, carrying {format_usd(e['completed_cost_usd'])} of it " if e.get("completed_items") else "none completed ")
        + f"({', '.join(f'{k} {v}' for k, v in e['items_by_status'].items())})"
    ),
    "machine_cadence": lambda e: (
        f"{e['requests']} requests, interval mean {e['interval_mean_seconds']}s cv {e['interval_cv']}, "
        f"{e['distinct_hours']} distinct hours, {e['around_the_clock_days']} day(s) around the clock ({', '.join(e['reasons'])})"
    ),
    "cost_outlier": lambda e: (
        f"{e['items']} completed item(s) far above their team's cost per item; {format_usd(e['cost_usd'])} of it by this key"
    ),
    "unverified_spend": lambda e: f"{e['share']:.0%} of {format_usd(e['cost_usd'])} on {e['items']} unverified or unknown item(s)",
    "trivial_completions": lambda e: (
        f"{e['trivial_items']} of {e['completed_items']} completed item(s) trivial ({e['quick_items']} done within minutes, "
        f"{e['small_items']} tiny); {format_usd(e['cost_usd'])} on them"
    ),
    "split_work": lambda e: "; ".join(
        f"{b['items']} small items done between {b['first_completed']} and {b['last_completed']}, {b['combined_lines']} lines together "
        f"(team median item {b['team_median_lines']})" for b in e["bursts"]
    ),
}


def signals_text(report: dict[str, Any]) -> str:
    """The report as lines of text: advisory signals, in the report's order (kind, then key id)."""
    lines = [f"gaming signals {report['since']} .. {report['until']} (advisory: evidence to look at, not a verdict)"]
    if not report["signals"]:
        lines.append("no signals")
    for signal in report["signals"]:
        who = f"{signal['key_id']} ({signal['owner'] or '?'}, team {signal['team'] or '-'})"
        lines.append(f"{signal['kind']}  {who}: {_SUMMARY[signal['kind']](signal['evidence'])}")
        listed = [w["id"] for w in signal["work_items"]]
        if listed:
            lines.append("    items: " + ", ".join(listed[:10]) + (f" and {len(listed) - 10} more" if len(listed) > 10 else ""))
    return "\n".join(lines)
