"""The adoption report: AI spend measured against completed work. Pure queries and arithmetic.

Definitions (the period is [since, until); times are naive UTC in the database, ISO 8601 with `Z` out):

- **Item team**: `work_items.team` if set; otherwise its tracker project's team in `work_items.teams`
  (the id's project: `PROJ` of `PROJ-12`, `acme/web` of `acme/web#12`); otherwise, for a merged PR carrying
  tickets, the team of the first of them (by id) that has one (set or by project); otherwise the team that spent the most on the item over all
  time (sum of `usage_events.cost_usd`, unknown prices counting 0, then sum of `total_tokens`; ties go
  to the team name that sorts first; events without a team are not counted); otherwise none, and the
  item counts only in `overall`. An item with usage but no row in `work_items` counts as `unverified`.
- **Completed item in the period**: status `done` and `completed_at` in the period (closed items are
  not completed). It counts with all the spend it ever had (all its events, whenever they happened),
  and a merged PR whose merge stands now (not reverted, nor reopened and not done since) with that of
  the tickets it came out of (links), not done now and never reworked, since the ticket's merged PR
  standing now before it (from the start, for the first) up to its merge: the work was on the ticket,
  and the ticket is no completed item of its own (adoption_data.carry_tickets). A ticket's usage up to
  its last such merge in the period is in those PRs' costs; after it, the ticket's status decides, as
  below (spend without outcome).
- **AI-assisted**: a completed item with at least one usage event whose status is below 400 and that
  is not a token count (`/v1/messages/count_tokens`, `/v1/responses/input_tokens`: they generate
  nothing, and cost nothing), a carried ticket's in the PR's span of it included, the
  first of them (`usage_item_totals.first_answered_ts`, all time) no later than its `completed_at` (for
  an item not done now, than the completion its reopening undid): requests sent only after the work
  was done do not make it assisted (they are spend after completion). An item done again after a
  reopening (a change away from `done` before its `completed_at`) is assisted only by such an event of
  its own between the last such reopening and its `completed_at` when the completion that reopening
  undid was before the period (a completion recycled into a later period; read from the raw events: in
  a partition `recording.retention_months` dropped, none is found).
- `ai_assisted_share` = ai_assisted_items / completed_items (null when nothing was completed).
- `cost_per_completed_item`, `tokens_per_completed_item`: over the AI-assisted completed items, the
  per-item total (sum of `cost_usd` / of `total_tokens` over all the item's events) as
  `{"median", "p90", "total", "by_model"}`. Percentiles interpolate linearly between closest ranks
  (numpy's default, `statistics.quantiles(method="inclusive")`); one item: median = p90 = its value;
  none: null, total 0. An item none of whose events has a known price has no cost: it is left out of
  the cost median and p90 and counted in `cost_per_completed_item.unpriced_items`. `by_model` sums
  the same items' events per model (the model the client asked for); a model none of whose events on
  those items has a known price shows null.
- **Rework marks**: `reworked_at` — a merged PR reverted within `reports.rework_days` of its merge
  (`rework_reason` `reverted`), and the done tickets it came out of; or an item reopened or closed after
  done (`reopened`). Only the first rework of an item is recorded, but a ticket marked `reverted` and
  then reopened is marked by its reopening. The marks are set when the deliveries arrive (registry.py).
- **Reworked in the period**: the completion that puts the item in the period did not hold — a
  reverted PR, or an item whose reopening undid a completion in the period (the last change to `done`
  before `reworked_at` is in the period). An item reopened before the period and done again in it is
  a completion that held.
- `excluding_reworked` (in `cost_per_completed_item`): `{"median", "p90", "total", "items"}` over the
  AI-assisted completed items not reworked in the period, with a known cost.
- `cost_by_size`: the AI-assisted completed items by size band, each `{"basis", "label", "above",
  "up_to", "items", "median", "p90", "total", "unpriced_items"}` (cost figures as above). An item's
  size is its lines changed (`lines_added` + `lines_deleted`, either known) if the tracker sent lines,
  else its `points` (story points, estimate) as they stood when it was completed (points set or raised
  afterwards do not count), else it is `unsized`. Bands come from
  `reports.size_bands` (`lines`, `points`: increasing upper bounds); a band holds sizes > `above`
  and <= `up_to` (null: unbounded). Every band is listed, empty or not, lines first, `unsized` last.
- `cost_per_100_changed_lines`: `{"usd", "items", "lines"}`: 100 × the summed cost / the summed lines
  changed, over the AI-assisted completed items with more than 0 lines changed and a known cost (pull
  requests, in practice). A ratio of sums, so a one-line PR cannot dominate it; null with no lines.
- `rework`: `{"ai_assisted", "other"}` each `{"items", "reworked", "rate"}`, and `by_reason`
  `{"reverted", "reopened"}`, over the items **completed in the period** plus the items reopened after
  a completion in the period (their last change to `done` before `reworked_at` is in the period), whether
  or not they were done again; `reworked` counts those reworked in the period. AI-assisted as above.
  `rate` = reworked / items (null with no items).
  Rework counts as known when the report is run: a past month's rate rises as its work is reverted.
- `spend_usd`: all the spend in the period (events with `ts` in it) on the scope's items, whatever
  became of them: what the spend without outcome and after completion are parts of.
- `spend_without_outcome_usd`: spend (events with `ts` in the period) on items **undone as of
  `until`** (`reworked`: reworked before `until` and not done again since — status `done` as of `until`
  with its completion as of `until` (the last status change before it) after the rework; a reverted PR
  never is, not even set done again by hand), and on the other items whose status
  *as of `until`* is `closed`, `unverified`, or `open`/`in_progress` and started (the later of
  `created_at` and its first request of all time: a backlog ticket picked up now is fresh) more than
  `stale_after_days` before `until` — except, on tickets with a `work_item_links` row whose linked item
  (the merged PR) was `done`, and not undone, as of `until`, the spend up to the last such merge
  (its completion as of `until`: a merge reopened or redone since still splits the period's spend) (the
  merged PR is its outcome; what the ticket spends after it is not). Split in `spend_without_outcome_breakdown`
  (`closed`, `unverified`, `stale_open`, `reworked`). The status as of `until` is the current status when no change
  was recorded at or after `until` (every status change records one); otherwise the target of the last
  recorded change before `until`, or, when none was, the origin of the first change after it (`unverified` if
  that change created the item: a pull request opened after `until` was no merged PR then).
  An item `open`/`in_progress` as of `until` and started less than `stale_after_days` before it was work
  in progress then: its period spend is judged by its status as of the moment it turned stale
  (started + `stale_after_days`), or as of now (the report's computation) when that has not come:
  `closed` then counts as `closed`, still `open`/`in_progress` at that moment as `stale_open`, `done` and
  reverted by then as `reworked`, anything else not at all. So spend moved onto fresh tickets late in a
  period and closed (as duplicates) or abandoned after it counts in that period once that is known; a
  period's figure settles `stale_after_days` after its end.
- `spend_after_completion_usd`: spend (events with `ts` in the period) on items whose current status
  is `done` or `closed`, on events later than the item's `completed_at`.
- `cycle_time_hours`: `{"ai_assisted", "other"}` medians of completed_at − created_at, in hours, over
  the AI-assisted and the other completed items of the period (null where there are none). Context,
  not cause.
- `rejected_requests`: `{reason: count}` of rejections with `ts` in the period; for a team, those made
  with a key (revoked or not) of that team.
- Spend sums count events with a known price only (0 when none is known).

Privacy: a team's figures are shown only if it has at least `min_group_size` people (privacy.py: distinct
owners of its non-revoked keys, service keys not counted); otherwise the team appears as `{"team", "withheld": true, "reason"}` with
no figure at all, and with a `team=` filter on such a team `overall` is withheld too. When the groups
withheld (the items of no team count as the group of the people without a team, when keys without a
team spent on them) hold fewer than `min_group_size` people between them, the smallest teams shown are
withheld as well until they hold that many (`privacy.withheld_groups`, with its own reason): otherwise
`overall` less the teams shown would be a small group's figures. The report never
names owners or keys and has no per-person figure. Teams listed: every team of a non-revoked key, plus
the team of every item with usage in the period, or completed (or reopened after completion) in it, sorted by name.

Queries aggregate in SQL (per work item, per model), reading spend from the usage rollups
(`adoption_data.py`, `storage/rollup.py`); only those aggregates and the work items the period touched,
with their status changes and links, are loaded into Python for the arithmetic.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from taskproxy import privacy
from taskproxy.money import usd
from taskproxy.reports import adoption_data as data
from taskproxy.reports import adoption_teams
from taskproxy.reports.adoption_item import Item as _Item
from taskproxy.settings import SizeBands
from taskproxy.storage.db import one_snapshot
from taskproxy.timeutil import iso, rounded_hours, utcnow
from taskproxy.workitems import IN_PROGRESS

WITHOUT_OUTCOME = ("closed", "unverified", "stale_open", "reworked")
REWORK_REASONS = ("reverted", "reopened")


def quantile(values: Iterable[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    return _quantile_of_sorted(sorted(values), q)


def _quantile_of_sorted(ordered: list[float] | list[int], q: float) -> float | None:
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))


# -- the figures of one scope ---------------------------------------------------------------------


def _without_outcome(item: _Item, until: datetime, stale_after: timedelta) -> tuple[str | None, int]:
    """Which spend without outcome the item's period spend is, and how much of it: a ticket's merged PR
    covers the spend up to its merge, not what the ticket spends after it."""
    if not item.spend:
        return None, 0
    if item.undone_as_of(until):
        return "reworked", item.spend
    status = item.status_at_until
    if status in ("closed", "unverified"):
        kind = status
    elif status in IN_PROGRESS and item.started_at is not None and item.started_at < until - stale_after:
        kind = "stale_open"
    elif (later := _judged_later(item)) is not None:
        kind = later
    else:
        return None, 0
    spend = item.spend_after_merge if item.merged_pr else item.spend
    return (kind, spend) if spend else (None, 0)


def _judged_later(item: _Item) -> str | None:
    """An item in progress and fresh at `until`, as it stood once it could be judged (`status_judged`):
    closed, still in progress when it turned stale, or done and reverted since then; None while it may
    still lead somewhere, or once it did. An item done at `until` whose completion was undone since
    (reopened, closed or reverted), as it stood `stale_after` after `until` (or now): reworked unless
    done again by then."""
    status, at = item.status_judged, item.judged_at
    if status is None or at is None:
        return None
    if item.status_at_until == "done":
        return "reworked" if item.undone_later else None
    reverted = item.rework_reason == "reverted" and item.reworked_at is not None and item.reworked_at <= at
    if status == "closed":
        return "closed"
    if status in IN_PROGRESS:
        return "stale_open" if item.judged_stale else None
    return "reworked" if status == "done" and reverted else None


def _cost_figures(costs: list[int]) -> dict[str, Any]:
    ordered = sorted(costs)  # once for both
    return {"median": usd(_quantile_of_sorted(ordered, 0.5)), "p90": usd(_quantile_of_sorted(ordered, 0.9)), "total": usd(sum(costs))}


def _bands(bounds: tuple[float, ...], basis: str) -> list[tuple[str, float | None, float | None]]:
    """(label, above, up_to) of each band: up to the first bound, between bounds, above the last."""
    number = (lambda b: f"{b:g}") if basis == "points" else (lambda b: str(int(b)))
    edges: list[float | None] = [None, *bounds, None]
    found = []
    for above, up_to in zip(edges, edges[1:]):
        if above is None and up_to is None:
            label = f"{basis}: all"
        elif above is None:
            label = f"{basis} <={number(up_to)}"  # type: ignore[arg-type]
        elif up_to is None:
            label = f"{basis} >{number(above)}"
        elif basis == "lines":
            label = f"lines {int(above) + 1}-{number(up_to)}"
        else:
            label = f"points >{number(above)}-{number(up_to)}"
        found.append((label, above, up_to))
    return found


def _by_size(assisted: list[_Item], bands: SizeBands) -> list[dict[str, Any]]:
    """Cost per completed item per size band, over the AI-assisted completed items."""
    table = [("lines", *band) for band in _bands(bands.lines, "lines")] + [("points", *band) for band in _bands(bands.points, "points")]
    members: dict[int, list[_Item]] = defaultdict(list)
    for item in assisted:
        basis, size = ("lines", item.lines) if item.lines is not None else ("points", item.points)
        if size is None:
            members[len(table)].append(item)
            continue
        members[next(n for n, (b, _, above, up_to) in enumerate(table)
                     if b == basis and (above is None or size > above) and (up_to is None or size <= up_to))].append(item)  # fmt: skip
    found = []
    for n, (basis, label, above, up_to) in enumerate([*table, ("unsized", "unsized", None, None)]):
        costs = [i.cost for i in members[n] if i.cost is not None]
        entry = {"basis": basis, "label": label, "above": above, "up_to": up_to, "items": len(members[n])}
        found.append({**entry, **_cost_figures(costs), "unpriced_items": len(members[n]) - len(costs)})
    return found


def _per_100_lines(assisted: list[_Item]) -> dict[str, Any]:
    sized = [(item.cost, item.lines) for item in assisted if item.lines and item.cost is not None]
    lines = sum(n for _, n in sized)
    return {"usd": usd(100 * sum(c for c, _ in sized) / lines) if lines else None, "items": len(sized), "lines": lines}


def _rework(delivered: list[_Item]) -> dict[str, Any]:
    def rate(group: list[_Item]) -> dict[str, Any]:
        reworked = sum(1 for i in group if i.reworked)
        return {"items": len(group), "reworked": reworked, "rate": reworked / len(group) if group else None}

    reasons = {reason: sum(1 for i in delivered if i.reworked and i.rework_reason == reason) for reason in REWORK_REASONS}
    return {"ai_assisted": rate([i for i in delivered if i.assisted]), "other": rate([i for i in delivered if not i.assisted]),
            "by_reason": reasons}  # fmt: skip


def _completed(items: Iterable[_Item], since: datetime, until: datetime) -> tuple[list[_Item], list[_Item]]:
    """The items completed in the period, and those of them AI-assisted."""
    completed = [i for i in items if i.completed_in(since, until)]
    return completed, [i for i in completed if i.assisted_since(since)]


def settle(items: Iterable[_Item], since: datetime, until: datetime, stale_after: timedelta) -> None:
    """Decide, once per item, what the period's figures ask of it (`_figures` reads the verdicts in
    every scope the item counts in: overall and its team)."""
    for item in items:
        item.completed = item.completed_in(since, until)
        item.delivered = item.completed or item.delivered_in(since, until)
        item.reworked = item.delivered and item.reworked_in(since, until)
        item.assisted = item.assisted_since(since)
        item.without_outcome, item.without_outcome_spend = _without_outcome(item, until, stale_after)
        timed = item.completed and item.completed_at is not None and item.created_at is not None
        item.cycle_hours = (item.completed_at - item.created_at).total_seconds() / 3600 if timed else None  # type: ignore[operator]


def _figures(items: list[_Item], rejected: dict[str, int], *, bands: SizeBands) -> dict[str, Any]:
    """The figures of one scope, over `items` as `settle` decided them."""
    completed = [i for i in items if i.completed]
    assisted = [i for i in completed if i.assisted]
    other = [i for i in completed if not i.assisted]

    tokens: list[float] = []
    cost_by_model: dict[str, int | None] = {}
    tokens_by_model: dict[str, int] = defaultdict(int)
    for item in assisted:
        for model, (_, _, cost, model_tokens) in item.by_model.items():
            tokens_by_model[model] += model_tokens
            if cost is not None:
                cost_by_model[model] = (cost_by_model.get(model) or 0) + cost
            else:
                cost_by_model.setdefault(model, None)
        tokens.append(float(item.tokens))
    tokens.sort()
    costs = [i.cost for i in assisted if i.cost is not None]
    held = [i.cost for i in assisted if i.cost is not None and not i.reworked]

    without = dict.fromkeys(WITHOUT_OUTCOME, 0)
    after = spend = 0
    for item in items:
        if item.without_outcome is not None:
            without[item.without_outcome] += item.without_outcome_spend
        after += item.spend_after_completion
        spend += item.spend

    def cycle(group: list[_Item]) -> float | None:
        hours = [i.cycle_hours for i in group if i.cycle_hours is not None]
        return rounded_hours(statistics.median(hours)) if hours else None

    return {
        "completed_items": len(completed),
        "ai_assisted_items": len(assisted),
        "ai_assisted_share": len(assisted) / len(completed) if completed else None,
        "cost_per_completed_item": {
            **_cost_figures(costs),
            "by_model": {m: usd(v) for m, v in sorted(cost_by_model.items())},
            "unpriced_items": len(assisted) - len(costs),
            "excluding_reworked": {**_cost_figures(held), "items": len(held)},
        },
        "tokens_per_completed_item": {
            "median": _quantile_of_sorted(tokens, 0.5),
            "p90": _quantile_of_sorted(tokens, 0.9),
            "total": int(sum(tokens)),
            "by_model": dict(sorted(tokens_by_model.items())),
        },
        "cost_by_size": _by_size(assisted, bands),
        "cost_per_100_changed_lines": _per_100_lines(assisted),
        "rework": _rework([i for i in items if i.delivered]),
        "spend_usd": usd(spend),
        "spend_without_outcome_usd": usd(sum(without.values())),
        "spend_without_outcome_breakdown": {k: usd(v) for k, v in without.items()},
        "spend_after_completion_usd": usd(after),
        "cycle_time_hours": {"ai_assisted": cycle(assisted), "other": cycle(other)},
        "rejected_requests": dict(sorted(rejected.items())),
    }


# -- the report -----------------------------------------------------------------------------------


def completions_by_period(engine: Engine, periods: list[tuple[datetime, datetime]]) -> list[dict[str, Any]]:
    """Per period, the overall `completed_items`, `ai_assisted_items` and `cost_per_completed_item`'s
    median, p90 and total, as `adoption_report` for that period gives them, from one read of the items
    completed in all of them (the dashboard's weekly chart: twelve reports' worth of reading, once)."""
    if not periods:
        return []
    with engine.connect() as connection:
        items = list(data.load_completed(connection, min(p[0] for p in periods), max(p[1] for p in periods)).values())
    found = []
    for since, until in periods:
        completed, assisted = _completed(items, since, until)
        costs = [i.cost for i in assisted if i.cost is not None]
        found.append({"completed_items": len(completed), "ai_assisted_items": len(assisted), **_cost_figures(costs)})
    return found





def adoption_report(
    engine: Engine,
    *,
    since: datetime,
    until: datetime,
    team: str | None = None,
    min_group_size: int = 5,
    stale_after_days: float = 14.0,
    size_bands: SizeBands | None = None,
    item_teams: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The adoption report for [since, until), overall and per team (see the module docstring).
    `item_teams`: the team of each tracker project's items (`work_items.teams`); `now`: the moment it is
    computed at (what became of the items in progress at `until` is known up to it)."""
    if since >= until:
        raise ValueError("'since' must be before 'until'")
    with one_snapshot(engine) as connection:
        items = data.load(connection, since, until, stale_after=timedelta(days=stale_after_days), now=now or utcnow())
        adoption_teams.assign_teams(connection, items, since, until, item_teams or {})
        people = privacy.group_sizes(connection, as_of=until)  # the period's answer does not change with later hires
        rejections = adoption_teams.rejections(connection, since, until)

    bands = size_bands or SizeBands()
    relevant = [i for i in items.values() if i.period_events or i.delivered_in(since, until)]
    settle(relevant, since, until, timedelta(days=stale_after_days))
    by_team: dict[str | None, list[_Item]] = defaultdict(list)
    for item in relevant:
        by_team[item.team].append(item)
    rejected_by_team: dict[str | None, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rejected_all: dict[str, int] = defaultdict(int)
    refused_people: set[str | None] = set()  # the groups whose people's refusals are counted
    for key_team, keyed, reason, count in rejections:
        rejected_by_team[key_team][reason] += count
        rejected_all[reason] += count
        if keyed:
            refused_people.add(key_team)

    # The groups with figures here: overall less the teams shown is the withheld ones' sum, the group of
    # no team included when its items have usage (in the period, or a completed item's, a carried
    # ticket's included: people without a team spent it) or people without a team were refused (items
    # done by hand spent nothing; a request refused without a key is nobody's).
    present = {name for name, group in by_team.items() if name is not None or any(i.period_events or (i.completed and i.by_model) for i in group)}
    present |= refused_people
    held = privacy.withheld_groups(people, present, min_group_size)

    def figures_of(name: str) -> dict[str, Any]:
        if name in held or not privacy.shown(people.get(name, 0), min_group_size):  # a team not present: by its size
            return privacy.withheld(name, min_group_size, people=people.get(name, 0))
        rejected = dict(rejected_by_team.get(name, {}))
        return {"team": name, **_figures(by_team.get(name, []), rejected, bands=bands)}

    if team is not None:
        entry = figures_of(team)
        overall = {k: v for k, v in entry.items() if k != "team"}
        teams = [entry]
    else:
        overall = _figures(relevant, dict(rejected_all), bands=bands)
        names = {t for t in (*people, *by_team) if t is not None}
        teams = [figures_of(name) for name in sorted(names)]
    return {
        "since": iso(since),
        "until": iso(until),
        "team": team,
        "min_group_size": min_group_size,
        "stale_after_days": stale_after_days,
        "overall": overall,
        "teams": teams,
    }
