"""The detectors behind the gaming signals (see `signals.py` for what each one means); the machine
cadence has a module of its own (`signal_cadence.py`)."""

from __future__ import annotations

import statistics
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection

from taskproxy.money import to_nanos, usd
from taskproxy.storage.models import WorkItem
from taskproxy.storage import idsets, rollup
from taskproxy.storage.rollup import is_request, request_clause, within
from taskproxy.storage.rows import rows
from taskproxy.timeutil import iso
from taskproxy.workitems import RESOLVED, completed_in, completion_holds

from taskproxy.settings import SignalSettings
from taskproxy.reports.signal_data import (
    EVENTS,
    Found,
    ITEMS,
    ItemRow,
    KeyInfo,
    Spend,
    WITHOUT_VERIFICATION,
    Span,
    add_spend,
    events_within,
    is_service,
    item_entry,
    listed,
    rounded,
    span,
    status_of,
    totals,
)

_MICROSECOND = timedelta(microseconds=1)


def repeated_prompts(
    connection: Connection, keys: dict[str, KeyInfo], spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow],
    since: datetime, until: datetime, t: SignalSettings,
) -> list[Found]:  # fmt: skip
    answered = and_(*within(EVENTS.ts, since, until), request_clause(EVENTS), EVENTS.status < 400, EVENTS.prompt_hash.is_not(None))
    repeated = connection.execute(
        select(EVENTS.key_id, EVENTS.prompt_hash)
        .where(answered)
        .group_by(EVENTS.key_id, EVENTS.prompt_hash)
        .having(func.count() >= t.repeated_prompt_min_requests)
    ).all()
    # The repeats' events, per item, read afterwards by the keys that sent them (the index on key_id
    # and ts): a second pass over the whole period's events would cost as much as the first.
    pairs = sorted((row.key_id, row.prompt_hash) for row in repeated)
    by_key: dict[str, dict[str, list[Spend]]] = defaultdict(lambda: defaultdict(list))
    size = idsets.batch_size(connection)
    for start in range(0, len(pairs), size):
        batch = set(pairs[start : start + size])
        senders, sent = sorted({key_id for key_id, _ in batch}), sorted({prompt for _, prompt in batch})
        query = (
            select(
                EVENTS.key_id,
                EVENTS.prompt_hash,
                EVENTS.work_item,
                func.count().label("requests"),
                func.sum(EVENTS.cost_nanos).label("cost"),
                func.coalesce(func.sum(EVENTS.total_tokens), 0).label("tokens"),
                func.min(EVENTS.ts).label("first"),
                func.max(EVENTS.ts).label("last"),
            )
            .where(answered, idsets.among(connection, EVENTS.key_id, senders), idsets.among(connection, EVENTS.prompt_hash, sent))
            .group_by(EVENTS.key_id, EVENTS.prompt_hash, EVENTS.work_item)
        )
        for row in rows(connection.execute(query)):
            if (row.key_id, row.prompt_hash) in batch:
                by_key[row.key_id][row.prompt_hash].append(
                    Spend(row.work_item, int(row.requests), int(row.cost or 0), int(row.tokens), row.first, row.last)
                )
    found = []
    for key_id, hashes in by_key.items():
        if is_service(keys, key_id) and not t.flag_service_keys:
            continue
        prompts = []
        per_item: dict[str, Spend] = {}
        for prompt, spends in hashes.items():
            prompts.append(
                {
                    "prompt_hash": prompt,
                    "requests": sum(s.requests for s in spends),
                    "cost_usd": usd(sum(s.cost for s in spends)),
                    **span(spends),
                }
            )
            for s in spends:
                merged = per_item.setdefault(s.item, Spend(s.item))
                merged.requests += s.requests
                merged.cost += s.cost
                merged.tokens += s.tokens
                merged.first = s.first if merged.first is None or (s.first and s.first < merged.first) else merged.first
                merged.last = s.last if merged.last is None or (s.last and s.last > merged.last) else merged.last
        prompts.sort(key=lambda p: (-p["requests"], p["prompt_hash"]))
        everything = list(per_item.values())
        evidence = {
            "requests": sum(s.requests for s in spend.get(key_id, {}).values()),
            "repeated_prompts": len(prompts),
            "repeated_requests": sum(p["requests"] for p in prompts),
            "cost_usd": usd(sum(s.cost for s in everything)),
            "items": len(everything),
            **span(everything),
            "prompts": prompts[: t.max_examples],
        }
        found.append((key_id, evidence, listed([item_entry(items, s) for s in everything])))
    return found


def after_completion(
    connection: Connection, items: dict[str, ItemRow], since: datetime, until: datetime, t: SignalSettings
) -> list[Found]:
    """Per key, its events on done or closed items later than `completed_at` + the grace: whole days
    from the per-key rollup; of the day the grace ends in, a key's row wholly before or after that
    moment (its first and last event say) from the rollup too, and the others from their raw events;
    the period's partial days from the raw events."""
    grace = timedelta(hours=t.after_completion_grace_hours)
    by_key: dict[str, dict[str, Spend]] = defaultdict(dict)

    def count(key_id: str, item: str, requests: int, cost: int, tokens: int, first: datetime, last: datetime) -> None:
        add_spend(by_key[key_id].setdefault(item, Spend(item)), requests, cost, tokens, first, last)

    def count_events(events: Iterable[Any]) -> None:
        for key_id, work_item, ts, attempt, route, cost, tokens in events:  # _EVENT_FIGURES
            count(key_id, work_item, is_request(attempt, route), int(cost or 0), int(tokens or 0), ts, ts)

    period = rollup.Period(since, until, levels=rollup.KEY_LEVELS)
    days = period.ranges(rollup.KEY_DAILY)
    if days:
        k = rollup.KEY_DAILY.table.c
        day_of_completion = rollup.KEY_DAILY.floor_sql(ITEMS.completed_at, connection.dialect.name)
        # One row per key, item and day, its teams' rows added up: a key whose events on the item that day
        # carry two teams (a key without a row, a key moved to another team) has a row per team, and one
        # wholly later was counted from the rollup while another's span read its events again.
        query = (
            select(k.key_id, k.work_item, k.bucket, func.sum(k.requests), func.sum(k.cost_nanos), func.sum(k.total_tokens), func.min(k.first_ts),
                   func.max(k.last_ts), ITEMS.completed_at)
            .select_from(rollup.KEY_DAILY.table.join(WorkItem.__table__, ITEMS.id == k.work_item))
            .where(ITEMS.status.in_(RESOLVED), rollup.any_within(k.bucket, days), k.bucket >= day_of_completion)
            .group_by(k.key_id, k.work_item, k.bucket, ITEMS.completed_at)
        )  # fmt: skip
        spans: list[Span] = []
        for key_id, work_item, bucket, requests, cost, tokens, first_ts, last_ts, completed_at in rows(connection.execute(query)):
            threshold = completed_at + grace
            if bucket > threshold or first_ts > threshold:  # every event of the row is later
                count(key_id, work_item, int(requests), int(cost or 0), int(tokens), first_ts, last_ts)
            elif bucket + timedelta(days=1) > threshold and last_ts > threshold:  # some are: read them
                spans.append((work_item, key_id, threshold, bucket + timedelta(days=1)))
        count_events(events_within(connection, sorted(spans)))
    edges = period.ranges(None)
    if edges:
        # The partial days at the period's ends have no rollup row of their own: their events on a done
        # or closed item, later than its moment, as spans of any key. (Not a join of the events with the
        # items: one item with a hundred thousand events in those hours made PostgreSQL's hash join
        # spill for minutes.)
        used = connection.execute(select(EVENTS.work_item).where(rollup.any_within(EVENTS.ts, edges)).distinct()).scalars()
        spans = []
        for item_id in used:
            row = items.get(item_id)
            if row is None or row.status not in RESOLVED or row.completed_at is None:
                continue
            for low, high in edges:  # bounded: the signals' period has both ends
                after = max(row.completed_at + grace, low - _MICROSECOND)  # ts > low - 1 µs: ts >= low, at the stored precision
                if after < high:
                    spans.append((item_id, None, after, high))
        count_events(events_within(connection, sorted(spans, key=lambda span: (span[0], span[2]))))
    found = []
    for key_id, per_item in by_key.items():
        spends = list(per_item.values())
        if sum(s.requests for s in spends) < t.after_completion_min_requests:
            continue
        entries = [
            item_entry(items, s, completed_at=iso(items[s.item].completed_at), first=iso(s.first), last=iso(s.last))
            for s in spends
        ]
        found.append((key_id, totals(spends), listed(entries)))
    return found


def heavy_spenders(spend: dict[str, dict[str, Spend]], t: SignalSettings) -> dict[str, list[Spend]]:
    """The keys whose spend in the period reaches `heavy_spend_min_usd`: their spend per item."""
    heavy = {}
    for key_id, per_item in spend.items():
        total = sum(s.cost for s in per_item.values())
        if total >= to_nanos(t.heavy_spend_min_usd) and total > 0:
            heavy[key_id] = list(per_item.values())
    return heavy


def without_completion(
    heavy: dict[str, list[Spend]], items: dict[str, ItemRow], since: datetime, t: SignalSettings, carried: Mapping[str, Mapping[str, int]]
) -> list[Found]:
    """`carried`: per key, {ticket: its spend up to the merge} on the tickets a merged PR completed
    since `since` carries (signal_carry.completed_spend): spend on completed work, as the adoption
    report counts it."""
    found = []
    for key_id, spends in heavy.items():
        total = sum(s.cost for s in spends)
        # One cheap completed item must not shield the rest: what completed has to carry a share of the spend.
        completed = [s for s in spends if _completed_since(items.get(s.item), since)]
        carried_here = carried.get(key_id, {})
        completed_cost = sum(s.cost for s in completed) + sum(carried_here.values())
        if (completed or carried_here) and completed_cost >= t.heavy_spend_max_completed_share * total:
            continue
        statuses: dict[str, int] = defaultdict(int)
        for s in spends:
            statuses[status_of(items, s.item)] += 1
        evidence = {**totals(spends), "items_by_status": dict(sorted(statuses.items())), "completed_items": len(completed),
                    "completed_cost_usd": usd(completed_cost), "carried_tickets": len(carried_here)}  # fmt: skip
        found.append((key_id, evidence, listed([item_entry(items, s) for s in spends])))
    return found


def _completed_since(item: ItemRow | None, since: datetime) -> bool:
    """Completed since `since`, and the completion stands: a merge reverted since (or an item reopened
    and not done again) is the adoption report's reworked spend, not completed work (found by a review:
    merging, then reverting, hid heavy spend from this signal)."""
    return (item is not None and completed_in(item.status, item.completed_at, since, datetime.max)
            and completion_holds(item.status, item.completed_at, item.reworked_at, item.rework_reason))  # fmt: skip


def unverified_candidates(spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow]) -> dict[str, list[Spend]]:
    """Per key with spend on unverified or unknown items, its spend on them."""
    found = {key_id: [s for s in per_item.values() if status_of(items, s.item) in WITHOUT_VERIFICATION] for key_id, per_item in spend.items()}
    return {key_id: spends for key_id, spends in found.items() if spends}


def unverified(spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], t: SignalSettings, carried: Mapping[str, Mapping[str, int]]) -> list[Found]:
    """`carried`: per key, {ticket: its spend up to the merge}, the merge being the last one before the
    period's end of a pull request linked to the ticket that held then (signals._unverified): a ticket no
    tracker confirmed but whose branch led to a merged pull request was real work up to that merge (the
    adoption report does not count it as spend without outcome), and flagged every key that worked on it before."""
    found = []
    candidates = unverified_candidates(spend, items)
    for key_id, per_item in spend.items():
        total = sum(s.cost for s in per_item.values())
        spends = candidates.get(key_id, [])
        carried_here = carried.get(key_id, {})
        merged_cost = sum(min(s.cost, carried_here.get(s.item, 0)) for s in spends)
        unverified = sum(s.cost for s in spends) - merged_cost
        if total <= 0 or unverified < to_nanos(t.unverified_min_usd) or unverified / total < t.unverified_min_share:
            continue
        # The evidence names the items whose spend counts: not one whose spend was all up to a merge.
        shown = [s for s in spends if s.cost <= 0 or carried_here.get(s.item, 0) < s.cost]
        evidence = {
            "cost_usd": usd(total),
            "unverified_cost_usd": usd(unverified),
            "carried_cost_usd": usd(merged_cost),  # on those items, up to the merge of a pull request that carries them
            "share": rounded(unverified / total),
            "requests": sum(s.requests for s in shown),
            "items": len(shown),
            **span(shown),
        }
        found.append((key_id, evidence, listed([item_entry(items, s) for s in shown])))
    return found


def trivial_completions(spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], since: datetime, until: datetime, t: SignalSettings) -> list[Found]:
    """Keys whose AI-assisted items completed in the period are mostly trivial: done within minutes of
    being opened or of the key's first event on them (a ticket done by hand, tagged with one request
    to count as AI-assisted), or (where the tracker gave a size) a handful of changed lines, or light:
    touched by AI with a handful of tokens in all, or its AI use in all (every key's) a negligible share
    of what the others' completed items cost (the same tag, sent early enough to escape the minutes; a
    tag's prompt can be padded with thousands of tokens for a fraction of a cent, its cost next to a
    real item's cannot). `spend` holds each key's events on such an item from before the period too
    (signals._trivial): a tag sent before it counts as one sent in it."""
    quick_limit = timedelta(minutes=t.trivial_max_minutes)
    typical = _TypicalCost(spend, items, since, until, t.cost_min_items) if t.trivial_max_cost_share > 0 else None  # 0: not counted
    found = []
    for key_id, per_item in spend.items():
        completed = [s for s in per_item.values() if s.requests > 0 and _completed_in(items.get(s.item), since, until)]
        medians = typical.without(completed) if typical is not None and len(completed) >= t.trivial_min_items else {}
        trivial, quick, small, light = [], 0, 0, 0
        costs: dict[str, tuple[int, float]] = {}  # per light-by-cost item: its cost, the median it was held against
        for s in completed:
            row = items[s.item]
            is_quick = any(start is not None and timedelta(0) <= row.completed_at - start <= quick_limit  # type: ignore[operator]
                           for start in (row.created_at, s.first))  # fmt: skip
            is_small = row.changed_lines is not None and row.changed_lines <= t.trivial_max_lines
            is_light = 0 < t.trivial_max_tokens and s.tokens <= t.trivial_max_tokens  # 0: not counted
            median = medians.get(row.team, medians.get(None))
            if median is not None and 0 < typical.cost[s.item] <= t.trivial_max_cost_share * median:  # type: ignore[union-attr]
                is_light = True
                costs[s.item] = (typical.cost[s.item], median)  # type: ignore[union-attr]
            if is_quick or is_small or is_light:
                trivial.append(s)
                quick, small, light = quick + is_quick, small + is_small, light + is_light
        if len(trivial) < t.trivial_min_items or len(trivial) < t.trivial_min_share * len(completed):
            continue
        evidence = {
            **totals(trivial), "completed_items": len(completed), "trivial_items": len(trivial), "share": rounded(len(trivial) / len(completed), 3),
            "quick_items": quick, "small_items": small, "light_items": light,
        }  # fmt: skip
        entries = []
        for s in trivial:
            row = items[s.item]
            entries.append(item_entry(items, s, completed_at=iso(row.completed_at), minutes_to_complete=_minutes(row.created_at, row.completed_at),
                                      minutes_from_first_request=_minutes(s.first, row.completed_at), changed_lines=row.changed_lines,
                                      tokens=s.tokens, **_against(costs.get(s.item))))  # fmt: skip
        found.append((key_id, evidence, listed(entries)))
    return found


def _against(cost: tuple[int, float] | None) -> dict[str, Any]:
    """A light-by-cost item's evidence: its cost (every key's) and the others' median it was held against."""
    return {} if cost is None else {"item_cost_usd": usd(cost[0]), "typical_cost_usd": usd(round(cost[1]))}


class _TypicalCost:
    """What an item completed in the period typically cost: its spend up to the period's end, before it
    too, every key's (a merged pull request's with the tickets it carries up to the merge), over the priced items. A key's items are
    held against the median of the *others'* (`without`): a key that tags many items pulls the median of
    all of them down to its tag (six tags beside five real items made it $0.0003)."""

    def __init__(self, spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], since: datetime, until: datetime, min_items: int) -> None:
        self.cost: dict[str, int] = {}
        completed: dict[str, bool] = {}
        for per_item in spend.values():
            for s in per_item.values():
                done = completed.get(s.item)
                if done is None:
                    done = completed[s.item] = _completed_in(items.get(s.item), since, until)
                if done:
                    self.cost[s.item] = self.cost.get(s.item, 0) + s.cost
        self.min_items = min_items
        self.team = {item: items[item].team for item in self.cost}
        self.sorted: dict[str | None, list[tuple[int, str]]] = defaultdict(list)  # per team, and None: all teams
        for item, cost in self.cost.items():
            if cost > 0:
                self.sorted[None].append((cost, item))
                if self.team[item] is not None:
                    self.sorted[self.team[item]].append((cost, item))
        for costs in self.sorted.values():
            costs.sort()

    def without(self, spends: list[Spend]) -> dict[str | None, float]:
        """Per team of `spends`' items, the median cost of its other completed items, where it has
        `min_items` of them; under None, the median over all teams' other items (if as many)."""
        mine: dict[str | None, list[tuple[int, str]]] = defaultdict(list)
        for s in spends:
            cost = self.cost.get(s.item, 0)
            if cost > 0:
                mine[None].append((cost, s.item))
                if self.team[s.item] is not None:
                    mine[self.team[s.item]].append((cost, s.item))
        medians = {}
        for team in {None, *(self.team.get(s.item) for s in spends)}:
            excluded = sorted(mine.get(team, ()))
            costs = self.sorted.get(team, [])
            if len(costs) - len(excluded) >= self.min_items:
                medians[team] = _median_without(costs, excluded)
        return medians


def _median_without(costs: list[tuple[int, str]], excluded: list[tuple[int, str]]) -> float:
    """The median of sorted `costs` less the sorted `excluded` (some of them), without copying `costs`:
    a key is held against its team's items but its own, for every key of a large organisation."""

    def nth(rank: int) -> int:  # the cost at `rank` (from 0) of what remains
        low, high = 0, len(costs) - 1
        while low < high:  # the first position with rank + 1 remaining items up to it
            middle = (low + high) // 2
            if middle + 1 - bisect_right(excluded, costs[middle]) >= rank + 1:
                high = middle
            else:
                low = middle + 1
        return costs[low][0]

    remaining = len(costs) - len(excluded)
    return (nth((remaining - 1) // 2) + nth(remaining // 2)) / 2


def _minutes(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else rounded((end - start).total_seconds() / 60, 1)


def _completed_in(item: ItemRow | None, since: datetime, until: datetime) -> bool:
    return item is not None and completed_in(item.status, item.completed_at, since, until)


SPLIT_COMBINED = (0.5, 2.0)  # a burst's combined size, as a multiple of the team's median: about one ordinary item


def split_work(spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], keys: dict[str, KeyInfo], since: datetime, until: datetime,
               t: SignalSettings) -> list[Found]:  # fmt: skip
    """Keys that completed a burst of small items whose sizes add up to about one ordinary item of their team."""
    sized: dict[str | None, list[int]] = defaultdict(list)  # the team's completed, sized items of the period
    for row in items.values():
        if _completed_in(row, since, until) and row.changed_lines is not None:
            sized[row.team].append(row.changed_lines)
    medians = {team: statistics.median(lines) for team, lines in sized.items() if team is not None and len(lines) >= t.split_min_team_items}
    window = timedelta(hours=t.split_window_hours)
    found = []
    for key_id, per_item in spend.items():
        mine = sorted(
            (s for s in per_item.values() if s.requests > 0 and _completed_in(items.get(s.item), since, until) and items[s.item].changed_lines is not None),
            key=lambda s: (items[s.item].completed_at, s.item),
        )  # fmt: skip
        bursts: list[list[Spend]] = []
        for s in mine:
            row = items[s.item]
            median = medians.get(row.team or (keys[key_id].team if key_id in keys else None))
            if median is None or row.changed_lines > t.split_max_item_share * median:  # type: ignore[operator]
                continue
            if bursts and row.completed_at - items[bursts[-1][-1].item].completed_at <= window:  # type: ignore[operator]
                bursts[-1].append(s)
            else:
                bursts.append([s])
        flagged = []
        for burst in bursts:
            team = items[burst[0].item].team or keys[key_id].team
            combined = sum(items[s.item].changed_lines for s in burst)  # type: ignore[misc]
            if len(burst) >= t.split_min_items and SPLIT_COMBINED[0] * medians[team] <= combined <= SPLIT_COMBINED[1] * medians[team]:
                flagged.append((burst, team, combined))
        if not flagged:
            continue
        spends = [s for burst, _, _ in flagged for s in burst]
        evidence = {
            **totals(spends), "bursts": [
                {"team": team, "items": len(burst), "combined_lines": combined, "team_median_lines": rounded(medians[team], 1),
                 "first_completed": iso(items[burst[0].item].completed_at), "last_completed": iso(items[burst[-1].item].completed_at)}
                for burst, team, combined in flagged
            ][: t.max_examples],
        }  # fmt: skip
        entries = [item_entry(items, s, completed_at=iso(items[s.item].completed_at), changed_lines=items[s.item].changed_lines) for s in spends]
        found.append((key_id, evidence, listed(entries)))
    return found

