"""The detectors behind the gaming signals (see `signals.py` for what each one means)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, distinct, func, or_, select
from sqlalchemy.engine import Connection

from taskproxy.money import to_nanos, usd
from taskproxy.storage.models import UsageEvent, WorkItem
from taskproxy.storage import idsets, rollup
from taskproxy.storage.rollup import is_request, request_clause, within
from taskproxy.timeutil import iso
from taskproxy.workitems import RESOLVED

from taskproxy.settings import SignalSettings
from taskproxy.reports.signal_data import (
    EVENTS,
    Cadence,
    ITEMS,
    Intervals,
    ItemRow,
    KeyInfo,
    MAD_SCALE,
    MEAN_AD_SCALE,
    SPEND_FIELDS,
    Spend,
    WITHOUT_VERIFICATION,
    add_spend,
    completed_ids,
    item_entry,
    listed,
    rounded,
    span,
    status_of,
    totals,
)

_RANGES_PER_QUERY = 500  # three parameters each


Found = tuple[str, dict[str, Any], list[dict[str, Any]]]


def repeated_prompts(
    connection: Connection, keys: dict[str, KeyInfo], spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow],
    since: datetime, until: datetime, t: SignalSettings,
) -> list[Found]:  # fmt: skip
    answered = and_(*within(EVENTS.ts, since, until), request_clause(EVENTS), EVENTS.status < 400, EVENTS.prompt_hash.is_not(None))
    repeated = (
        select(EVENTS.key_id, EVENTS.prompt_hash)
        .where(answered)
        .group_by(EVENTS.key_id, EVENTS.prompt_hash)
        .having(func.count() >= t.repeated_prompt_min_requests)
        .subquery()
    )
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
        .join(repeated, and_(repeated.c.key_id == EVENTS.key_id, repeated.c.prompt_hash == EVENTS.prompt_hash))
        .where(answered)
        .group_by(EVENTS.key_id, EVENTS.prompt_hash, EVENTS.work_item)
    )
    by_key: dict[str, dict[str, list[Spend]]] = defaultdict(lambda: defaultdict(list))
    for row in connection.execute(query):
        by_key[row.key_id][row.prompt_hash].append(
            Spend(row.work_item, int(row.requests), int(row.cost or 0), int(row.tokens), row.first, row.last)
        )
    found = []
    for key_id, hashes in by_key.items():
        if _is_service(keys, key_id) and not t.flag_service_keys:
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
    from the per-key rollup, the day the grace ends in and the period's partial days from the raw events."""
    grace = timedelta(hours=t.after_completion_grace_hours)
    by_key: dict[str, dict[str, Spend]] = defaultdict(dict)

    def count(key_id: str, item: str, requests: int, cost: int, tokens: int, first: datetime, last: datetime) -> None:
        add_spend(by_key[key_id].setdefault(item, Spend(item)),
                  {"requests": requests, "cost_nanos": cost, "total_tokens": tokens, "first_used": first, "last_used": last})  # fmt: skip

    def raw(where: list[Any]) -> None:
        query = (
            select(EVENTS.key_id, EVENTS.work_item, EVENTS.ts, EVENTS.attempt, EVENTS.route, EVENTS.cost_nanos, EVENTS.total_tokens, ITEMS.completed_at)
            .select_from(UsageEvent.__table__.join(WorkItem.__table__, ITEMS.id == EVENTS.work_item))
            .where(ITEMS.status.in_(RESOLVED), EVENTS.ts > ITEMS.completed_at, *where)
        )  # fmt: skip
        for row in connection.execute(query):
            if row.ts > row.completed_at + grace:
                count(row.key_id, row.work_item, is_request(row.attempt, row.route), int(row.cost_nanos or 0), int(row.total_tokens or 0), row.ts, row.ts)

    period = rollup.Period(since, until, levels=rollup.KEY_LEVELS)
    days = period.ranges(rollup.KEY_DAILY)
    if days:
        k = rollup.KEY_DAILY.table.c
        day_of_completion = rollup.KEY_DAILY.floor_sql(ITEMS.completed_at, connection.dialect.name)
        query = (
            select(k.key_id, k.work_item, k.bucket, k.requests, k.cost_nanos, k.total_tokens, k.first_ts, k.last_ts, ITEMS.completed_at)
            .select_from(rollup.KEY_DAILY.table.join(WorkItem.__table__, ITEMS.id == k.work_item))
            .where(ITEMS.status.in_(RESOLVED), rollup.any_within(k.bucket, days), k.bucket >= day_of_completion)
        )  # fmt: skip
        edge_days: set[tuple[str, datetime, datetime]] = set()
        for row in connection.execute(query):
            threshold = row.completed_at + grace
            if row.bucket > threshold:  # the whole day is later
                count(row.key_id, row.work_item, int(row.requests), int(row.cost_nanos or 0), int(row.total_tokens), row.first_ts, row.last_ts)
            elif row.bucket + timedelta(days=1) > threshold:  # the day the grace ends in: its events later than that
                edge_days.add((row.work_item, threshold, row.bucket + timedelta(days=1)))
        ranges = sorted(edge_days)  # one range of the (work_item, ts) index each, a few hundred to a statement
        for start in range(0, len(ranges), _RANGES_PER_QUERY):
            raw([or_(*(and_(EVENTS.work_item == item, EVENTS.ts > threshold, EVENTS.ts < day_end)
                       for item, threshold, day_end in ranges[start : start + _RANGES_PER_QUERY]))])  # fmt: skip
    edges = period.ranges(None)
    if edges:
        raw([rollup.any_within(EVENTS.ts, edges)])
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


def without_completion(
    spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], since: datetime, t: SignalSettings
) -> list[Found]:
    found = []
    for key_id, per_item in spend.items():
        spends = list(per_item.values())
        total = sum(s.cost for s in spends)
        if total < to_nanos(t.heavy_spend_min_usd) or total <= 0:
            continue
        if any(_completed_since(items.get(s.item), since) for s in spends):
            continue
        statuses: dict[str, int] = defaultdict(int)
        for s in spends:
            statuses[status_of(items, s.item)] += 1
        evidence = {**totals(spends), "items_by_status": dict(sorted(statuses.items()))}
        found.append((key_id, evidence, listed([item_entry(items, s) for s in spends])))
    return found


def _completed_since(item: ItemRow | None, since: datetime) -> bool:
    return item is not None and item.status == "done" and item.completed_at is not None and item.completed_at >= since


def cadence(
    connection: Connection, keys: dict[str, KeyInfo], spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow],
    since: datetime, until: datetime, t: SignalSettings,
) -> list[Found]:  # fmt: skip
    counts: dict[str, int] = {k: sum(s.requests for s in per_item.values()) for k, per_item in spend.items()}
    wanted = sorted(
        k for k, n in counts.items() if n >= t.cadence_min_requests and (t.flag_service_keys or not _is_service(keys, k))
    )
    if not wanted:
        return []
    runs = _cadence_in_postgres if connection.dialect.name == "postgresql" else _cadence_from_times
    found: list[Found] = []
    for key_id, run in runs(connection, wanted, since, until, t):
        result = _cadence_evidence(run, t)
        if result is not None:
            found.append((key_id, result, listed([item_entry(items, s) for s in spend[key_id].values() if s.requests])))
    return found


def _cadence_from_times(connection: Connection, keys: list[str], since: datetime, until: datetime, t: SignalSettings) -> Iterator[tuple[str, Cadence]]:
    """Each key's cadence from its request times, streamed in order (SQLite)."""
    current: Intervals | None = None
    current_key: str | None = None

    def finish() -> Iterator[tuple[str, Cadence]]:
        if current is not None and current_key is not None:
            gaps = current.gaps
            mean = statistics.fmean(gaps) if gaps else None
            yield current_key, Cadence(
                current.requests, current.first, current.last, len(gaps), mean, statistics.pstdev(gaps) if gaps else None,
                statistics.median(gaps) if gaps else None, len(current.hours),
                sum(1 for hours in current.day_hours.values() if len(hours) >= t.around_clock_min_hours),
            )  # fmt: skip

    for key_id, ts in _requests_by_key(connection, keys, since, until):
        if key_id != current_key:
            yield from finish()
            current, current_key = Intervals(), key_id
        assert current is not None
        if current.last is not None:
            current.gaps.append((ts - current.last).total_seconds())
        current.first = current.first or ts
        current.last = ts
        current.requests += 1
        current.hours.add(ts.hour)
        current.day_hours[ts.date()].add(ts.hour)
    yield from finish()


def _cadence_in_postgres(connection: Connection, keys: list[str], since: datetime, until: datetime, t: SignalSettings) -> Iterator[tuple[str, Cadence]]:
    """The same figures computed by PostgreSQL (the intervals by a window over each key's requests, in
    the order of the (key_id, ts) index): only a row per key comes back, not every request's time."""
    for batch in idsets.batches(connection, keys):
        previous = func.lag(EVENTS.ts).over(partition_by=EVENTS.key_id, order_by=EVENTS.ts)
        day = func.date_trunc("day", EVENTS.ts)
        hour = func.extract("hour", EVENTS.ts)
        # The rank of a request's hour among its day's distinct hours: a day reaches N distinct hours
        # when one of its requests ranks N (so one pass over the requests, no join).
        hour_rank = func.dense_rank().over(partition_by=(EVENTS.key_id, day), order_by=hour)
        requests = (
            select(EVENTS.key_id, EVENTS.ts, func.extract("epoch", EVENTS.ts - previous).label("gap"), day.label("day"), hour.label("hour"),
                   hour_rank.label("hour_rank"))
            .where(*within(EVENTS.ts, since, until), request_clause(EVENTS), idsets.among(connection, EVENTS.key_id, batch))
            .subquery()
        )  # fmt: skip
        r = requests.c
        query = (
            select(r.key_id, func.count().label("requests"), func.min(r.ts).label("first"), func.max(r.ts).label("last"),
                   func.count(r.gap).label("gaps"), func.avg(r.gap).label("mean"), func.stddev_pop(r.gap).label("pstdev"),
                   func.percentile_cont(0.5).within_group(r.gap).label("median"), func.count(distinct(r.hour)).label("hours"),
                   func.count(distinct(r.day)).filter(r.hour_rank >= t.around_clock_min_hours).label("around"))
            .group_by(r.key_id)
        )  # fmt: skip
        for row in connection.execute(query):
            number = lambda value: None if value is None else float(value)  # noqa: E731 (numeric → float, as the times give)
            yield row.key_id, Cadence(int(row.requests), row.first, row.last, int(row.gaps), number(row.mean), number(row.pstdev),
                                      number(row.median), int(row.hours), int(row.around))  # fmt: skip


def _requests_by_key(connection: Connection, keys: list[str], since: datetime, until: datetime) -> Iterator[tuple[str, datetime]]:
    """(key, time) of the keys' requests in the period, by key then time. The keys are bound in batches
    (storage/idsets.py: an organisation has more keys than a statement binds parameters)."""
    for batch in idsets.batches(connection, keys):
        query = (
            select(EVENTS.key_id, EVENTS.ts)
            .where(*within(EVENTS.ts, since, until), request_clause(EVENTS), idsets.among(connection, EVENTS.key_id, batch))
            .order_by(EVENTS.key_id, EVENTS.ts)
        )
        yield from connection.execute(query.execution_options(yield_per=20_000))  # type: ignore[misc]


def _cadence_evidence(run: Cadence, t: SignalSettings) -> dict[str, Any] | None:
    if run.requests < t.cadence_min_requests or not run.gaps or run.mean is None:
        return None
    cv = run.pstdev / run.mean if run.mean > 0 and run.pstdev is not None else None
    reasons = []
    if cv is not None and cv <= t.cadence_max_cv:
        reasons.append("regular_intervals")
    if run.around_days >= t.around_clock_min_days:
        reasons.append("around_the_clock")
    if not reasons:
        return None
    return {
        "requests": run.requests,
        "first": iso(run.first),
        "last": iso(run.last),
        "interval_mean_seconds": rounded(run.mean, 3),
        "interval_median_seconds": rounded(run.median, 3),
        "interval_cv": rounded(cv),
        "distinct_hours": run.distinct_hours,
        "around_the_clock_days": run.around_days,
        "reasons": reasons,
    }


def cost_outliers(
    connection: Connection, items: dict[str, ItemRow], since: datetime, until: datetime, t: SignalSettings
) -> list[Found]:
    all_time = rollup.Period(levels=rollup.KEY_LEVELS)  # every day of the per-key rollup: no raw event is read
    found_spend = rollup.totals(connection, by=("work_item", "key_id", "team"), period=all_time, fields=SPEND_FIELDS,
                                where=lambda c: [c.work_item.in_(completed_ids(since, until))])  # fmt: skip
    by_item: dict[str, dict[str, Spend]] = defaultdict(dict)  # item -> key -> all-time spend
    team_spend: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    priced: set[str] = set()
    for (work_item, key_id, team), row in found_spend.items():
        add_spend(by_item[work_item].setdefault(key_id, Spend(work_item)), row)
        if row["cost_nanos"] is not None:
            priced.add(work_item)
        if team is not None:
            totals = team_spend[work_item][team]
            totals[0] += int(row["cost_nanos"] or 0)
            totals[1] += int(row["total_tokens"] or 0)

    costs_by_team: dict[str, dict[str, int]] = defaultdict(dict)
    for item_id in priced:
        team = items[item_id].team
        if team is None and team_spend.get(item_id):
            team = min(team_spend[item_id].items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[0]
        if team is not None:
            costs_by_team[team][item_id] = sum(s.cost for s in by_item[item_id].values())

    flagged: dict[str, list[tuple[Spend, dict[str, Any]]]] = defaultdict(list)
    for team, costs in costs_by_team.items():
        if len(costs) < t.cost_min_items:
            continue
        values = list(costs.values())
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        mean_ad = statistics.fmean(abs(v - median) for v in values)
        if mad > 0:
            scale = mad / MAD_SCALE
        elif mean_ad > 0:
            scale = MEAN_AD_SCALE * mean_ad
        else:
            continue
        for item_id, cost in costs.items():
            z = (cost - median) / scale
            if z < t.cost_min_z or cost < t.cost_min_ratio * median:
                continue
            for key_id, s in by_item[item_id].items():
                share = s.cost / cost if cost > 0 else 0.0
                if share < t.cost_min_key_share:
                    continue
                figures = {
                    "completed_at": iso(items[item_id].completed_at),
                    "item_cost_usd": usd(cost),
                    "team": team,
                    "team_items": len(values),
                    "team_median_usd": usd(median),
                    "team_mad_usd": usd(mad),
                    "robust_z": rounded(z, 3),
                    "ratio_to_median": rounded(cost / median, 3) if median > 0 else None,
                    "key_cost_usd": usd(s.cost),
                    "key_share": rounded(share, 6),
                    "first": iso(s.first),
                    "last": iso(s.last),
                }
                flagged[key_id].append((s, figures))
    found = []
    for key_id, entries in flagged.items():
        spends = [s for s, _ in entries]
        evidence = {
            "items": len(entries),
            "requests": sum(s.requests for s in spends),
            "cost_usd": usd(sum(s.cost for s in spends)),
            **span(spends),
        }
        found.append((key_id, evidence, listed([item_entry(items, s, **figures) for s, figures in entries])))
    return found


def unverified(spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], t: SignalSettings) -> list[Found]:
    found = []
    for key_id, per_item in spend.items():
        total = sum(s.cost for s in per_item.values())
        spends = [s for s in per_item.values() if status_of(items, s.item) in WITHOUT_VERIFICATION]
        unverified = sum(s.cost for s in spends)
        if total <= 0 or unverified < to_nanos(t.unverified_min_usd) or unverified / total < t.unverified_min_share:
            continue
        evidence = {
            "cost_usd": usd(total),
            "unverified_cost_usd": usd(unverified),
            "share": rounded(unverified / total),
            "requests": sum(s.requests for s in spends),
            "items": len(spends),
            **span(spends),
        }
        found.append((key_id, evidence, listed([item_entry(items, s) for s in spends])))
    return found


def _is_service(keys: dict[str, KeyInfo], key_id: str) -> bool:
    key = keys.get(key_id)
    return key is not None and key.role == "service"


# -- the report -----------------------------------------------------------------------------------


def trivial_completions(spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow], since: datetime, until: datetime, t: SignalSettings) -> list[Found]:
    """Keys whose AI-assisted items completed in the period are mostly trivial: done within minutes of
    being opened, or (where the tracker gave a size) a handful of changed lines."""
    quick_limit = timedelta(minutes=t.trivial_max_minutes)
    found = []
    for key_id, per_item in spend.items():
        completed = [s for s in per_item.values() if s.requests > 0 and _completed_in(items.get(s.item), since, until)]
        trivial, quick, small = [], 0, 0
        for s in completed:
            row = items[s.item]
            is_quick = row.created_at is not None and row.completed_at - row.created_at <= quick_limit  # type: ignore[operator]
            is_small = row.changed_lines is not None and row.changed_lines <= t.trivial_max_lines
            if is_quick or is_small:
                trivial.append(s)
                quick, small = quick + is_quick, small + is_small
        if len(trivial) < t.trivial_min_items or len(trivial) < t.trivial_min_share * len(completed):
            continue
        evidence = {
            **totals(trivial), "completed_items": len(completed), "trivial_items": len(trivial), "share": rounded(len(trivial) / len(completed), 3),
            "quick_items": quick, "small_items": small,
        }  # fmt: skip
        entries = []
        for s in trivial:
            row = items[s.item]
            minutes = None if row.created_at is None else rounded((row.completed_at - row.created_at).total_seconds() / 60, 1)  # type: ignore[operator]
            entries.append(item_entry(items, s, completed_at=iso(row.completed_at), minutes_to_complete=minutes, changed_lines=row.changed_lines))
        found.append((key_id, evidence, listed(entries)))
    return found


def _completed_in(item: ItemRow | None, since: datetime, until: datetime) -> bool:
    return item is not None and item.status == "done" and item.completed_at is not None and since <= item.completed_at < until


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

