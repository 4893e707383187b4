"""The detectors behind the gaming signals (see `signals.py` for what each one means), the data they
read, and their thresholds."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.engine import Connection

from taskproxy.storage.models import ApiKey, UsageEvent, WorkItem
from taskproxy.timeutil import iso

_E = UsageEvent.__table__.c
_W = WorkItem.__table__.c
_K = ApiKey.__table__.c

KINDS = (
    "repeated_prompt",
    "spend_after_completion",
    "spend_without_completion",
    "machine_cadence",
    "cost_outlier",
    "unverified_spend",
)
RESOLVED = ("done", "closed")
WITHOUT_VERIFICATION = ("unverified", "unknown")
MAX_LISTED = 50  # work items listed per signal
MAD_SCALE = 0.6745  # Iglewicz and Hoaglin: 0.6745 × (x − median) / MAD ~ a z-score for normal data
MEAN_AD_SCALE = 1.253314  # sqrt(pi / 2): the mean absolute deviation's scale, when MAD is 0


@dataclass(frozen=True)
class SignalThresholds:
    """When each signal fires (see the module docstring). Every field has a sensible default."""

    repeated_prompt_min_requests: int = 20
    after_completion_grace_hours: float = 1.0
    after_completion_min_requests: int = 10
    heavy_spend_min_usd: float = 50.0
    cadence_min_requests: int = 50
    cadence_max_cv: float = 0.2
    around_clock_min_hours: int = 20
    around_clock_min_days: int = 3
    cost_min_items: int = 5
    cost_min_z: float = 3.5
    cost_min_ratio: float = 3.0
    cost_min_key_share: float = 0.25
    unverified_min_share: float = 0.6
    unverified_min_usd: float = 10.0
    flag_service_keys: bool = False
    max_examples: int = 5

    def __post_init__(self) -> None:
        for name in ("repeated_prompt_min_requests", "after_completion_min_requests", "cadence_min_requests", "max_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.cadence_min_requests < 3:
            raise ValueError("cadence_min_requests must be at least 3 (two intervals)")
        if not 1 <= self.around_clock_min_hours <= 24:
            raise ValueError("around_clock_min_hours must be from 1 to 24")
        if self.around_clock_min_days < 1:
            raise ValueError("around_clock_min_days must be at least 1")
        if self.cost_min_items < 3:
            raise ValueError("cost_min_items must be at least 3")
        for name in (
            "after_completion_grace_hours",
            "heavy_spend_min_usd",
            "cadence_max_cv",
            "cost_min_z",
            "cost_min_ratio",
            "unverified_min_usd",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("cost_min_key_share", "unverified_min_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be above 0 and at most 1")


def thresholds_from(config: Any = None) -> SignalThresholds:
    """Thresholds from a settings section (a pydantic model), a mapping, or None (the defaults).
    Names the section does not have keep their defaults; names this class does not have are refused."""
    if config is None:
        return SignalThresholds()
    if isinstance(config, SignalThresholds):
        return config
    values = (
        config.model_dump() if hasattr(config, "model_dump") else dict(config) if isinstance(config, Mapping) else vars(config)
    )
    known = {f.name for f in fields(SignalThresholds)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown signal thresholds: {', '.join(unknown)}")
    return SignalThresholds(**values)


def _money(value: float | None) -> float | None:
    return None if value is None else round(float(value), 9)


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


# -- what the queries load ------------------------------------------------------------------------


@dataclass
class KeyInfo:
    id: str
    owner: str | None = None
    team: str | None = None
    role: str | None = None


@dataclass
class _Spend:
    """One key's events on one item in the period."""

    item: str
    requests: int = 0
    cost: float = 0.0
    tokens: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class _ItemRow:
    status: str
    completed_at: datetime | None
    team: str | None


@dataclass
class _Intervals:
    requests: int = 0
    first: datetime | None = None
    last: datetime | None = None
    gaps: list[float] = field(default_factory=list)
    hours: set[int] = field(default_factory=set)
    day_hours: dict[Any, set[int]] = field(default_factory=lambda: defaultdict(set))


def _in_period(column: Any, since: datetime, until: datetime) -> Any:
    return and_(column >= since, column < until)


def load_keys(connection: Connection) -> dict[str, KeyInfo]:
    return {r.id: KeyInfo(r.id, r.owner, r.team, r.role) for r in connection.execute(select(_K.id, _K.owner, _K.team, _K.role))}


def load_items(connection: Connection) -> dict[str, _ItemRow]:
    rows = connection.execute(select(_W.id, _W.status, _W.completed_at, _W.team))
    return {r.id: _ItemRow(r.status, r.completed_at, r.team) for r in rows}


def _requests_column() -> Any:
    return func.sum(case((_E.attempt == 1, 1), else_=0))


def load_spend(connection: Connection, keys: dict[str, KeyInfo], since: datetime, until: datetime) -> dict[str, dict[str, _Spend]]:
    """Per key and item: the key's requests, spend, tokens and first/last event in the period."""
    query = (
        select(
            _E.key_id,
            _E.work_item,
            _requests_column().label("requests"),
            func.sum(_E.cost_usd).label("cost"),
            func.coalesce(func.sum(_E.total_tokens), 0).label("tokens"),
            func.min(_E.ts).label("first"),
            func.max(_E.ts).label("last"),
            func.max(_E.owner).label("owner"),
            func.max(_E.team).label("team"),
        )
        .where(_in_period(_E.ts, since, until))
        .group_by(_E.key_id, _E.work_item)
    )
    spend: dict[str, dict[str, _Spend]] = defaultdict(dict)
    for row in connection.execute(query):
        spend[row.key_id][row.work_item] = _Spend(
            row.work_item, int(row.requests or 0), float(row.cost or 0.0), int(row.tokens), row.first, row.last
        )
        if row.key_id not in keys:  # a key with events but no row: what its events say
            keys[row.key_id] = KeyInfo(row.key_id, row.owner, row.team, None)
    return spend


def _status(items: dict[str, _ItemRow], item_id: str) -> str:
    row = items.get(item_id)
    return row.status if row is not None else "unknown"


def _item_entry(items: dict[str, _ItemRow], spend: _Spend, **extra: Any) -> dict[str, Any]:
    return {
        "id": spend.item,
        "status": _status(items, spend.item),
        "requests": spend.requests,
        "cost_usd": _money(spend.cost),
        **extra,
    }


def _listed(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: e["id"])[:MAX_LISTED]


def _span(spends: list[_Spend]) -> dict[str, Any]:
    firsts = [s.first for s in spends if s.first is not None]
    lasts = [s.last for s in spends if s.last is not None]
    return {"first": iso(min(firsts)) if firsts else None, "last": iso(max(lasts)) if lasts else None}


def _totals(spends: list[_Spend]) -> dict[str, Any]:
    return {
        "requests": sum(s.requests for s in spends),
        "cost_usd": _money(sum(s.cost for s in spends)),
        "tokens": sum(s.tokens for s in spends),
        "items": len(spends),
        **_span(spends),
    }


# -- the signals, one function per kind; each yields (key id, evidence, work items) ----------------

Found = tuple[str, dict[str, Any], list[dict[str, Any]]]


def repeated_prompts(
    connection: Connection, keys: dict[str, KeyInfo], spend: dict[str, dict[str, _Spend]], items: dict[str, _ItemRow],
    since: datetime, until: datetime, t: SignalThresholds,
) -> list[Found]:  # fmt: skip
    answered = and_(_in_period(_E.ts, since, until), _E.attempt == 1, _E.status < 400, _E.prompt_hash.is_not(None))
    repeated = (
        select(_E.key_id, _E.prompt_hash)
        .where(answered)
        .group_by(_E.key_id, _E.prompt_hash)
        .having(func.count() >= t.repeated_prompt_min_requests)
        .subquery()
    )
    query = (
        select(
            _E.key_id,
            _E.prompt_hash,
            _E.work_item,
            func.count().label("requests"),
            func.sum(_E.cost_usd).label("cost"),
            func.coalesce(func.sum(_E.total_tokens), 0).label("tokens"),
            func.min(_E.ts).label("first"),
            func.max(_E.ts).label("last"),
        )
        .join(repeated, and_(repeated.c.key_id == _E.key_id, repeated.c.prompt_hash == _E.prompt_hash))
        .where(answered)
        .group_by(_E.key_id, _E.prompt_hash, _E.work_item)
    )
    by_key: dict[str, dict[str, list[_Spend]]] = defaultdict(lambda: defaultdict(list))
    for row in connection.execute(query):
        by_key[row.key_id][row.prompt_hash].append(
            _Spend(row.work_item, int(row.requests), float(row.cost or 0.0), int(row.tokens), row.first, row.last)
        )
    found = []
    for key_id, hashes in by_key.items():
        if _is_service(keys, key_id) and not t.flag_service_keys:
            continue
        prompts = []
        per_item: dict[str, _Spend] = {}
        for prompt, spends in hashes.items():
            prompts.append(
                {
                    "prompt_hash": prompt,
                    "requests": sum(s.requests for s in spends),
                    "cost_usd": _money(sum(s.cost for s in spends)),
                    **_span(spends),
                }
            )
            for s in spends:
                merged = per_item.setdefault(s.item, _Spend(s.item))
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
            "cost_usd": _money(sum(s.cost for s in everything)),
            "items": len(everything),
            **_span(everything),
            "prompts": prompts[: t.max_examples],
        }
        found.append((key_id, evidence, _listed([_item_entry(items, s) for s in everything])))
    return found


def after_completion(
    connection: Connection, items: dict[str, _ItemRow], since: datetime, until: datetime, t: SignalThresholds
) -> list[Found]:
    query = (
        select(_E.key_id, _E.work_item, _E.ts, _E.attempt, _E.cost_usd, _E.total_tokens, _W.completed_at)
        .select_from(UsageEvent.__table__.join(WorkItem.__table__, _W.id == _E.work_item))
        .where(_in_period(_E.ts, since, until), _W.status.in_(RESOLVED), _E.ts > _W.completed_at)
    )
    grace = timedelta(hours=t.after_completion_grace_hours)
    by_key: dict[str, dict[str, _Spend]] = defaultdict(dict)
    for row in connection.execute(query):
        if row.ts <= row.completed_at + grace:
            continue
        s = by_key[row.key_id].setdefault(row.work_item, _Spend(row.work_item))
        s.requests += 1 if row.attempt == 1 else 0
        s.cost += float(row.cost_usd or 0.0)
        s.tokens += int(row.total_tokens or 0)
        s.first = row.ts if s.first is None or row.ts < s.first else s.first
        s.last = row.ts if s.last is None or row.ts > s.last else s.last
    found = []
    for key_id, per_item in by_key.items():
        spends = list(per_item.values())
        if sum(s.requests for s in spends) < t.after_completion_min_requests:
            continue
        entries = [
            _item_entry(items, s, completed_at=iso(items[s.item].completed_at), first=iso(s.first), last=iso(s.last))
            for s in spends
        ]
        found.append((key_id, _totals(spends), _listed(entries)))
    return found


def without_completion(
    spend: dict[str, dict[str, _Spend]], items: dict[str, _ItemRow], since: datetime, t: SignalThresholds
) -> list[Found]:
    found = []
    for key_id, per_item in spend.items():
        spends = list(per_item.values())
        total = sum(s.cost for s in spends)
        if total < t.heavy_spend_min_usd or total <= 0:
            continue
        if any(_completed_since(items.get(s.item), since) for s in spends):
            continue
        statuses: dict[str, int] = defaultdict(int)
        for s in spends:
            statuses[_status(items, s.item)] += 1
        evidence = {**_totals(spends), "items_by_status": dict(sorted(statuses.items()))}
        found.append((key_id, evidence, _listed([_item_entry(items, s) for s in spends])))
    return found


def _completed_since(item: _ItemRow | None, since: datetime) -> bool:
    return item is not None and item.status == "done" and item.completed_at is not None and item.completed_at >= since


def cadence(
    connection: Connection, keys: dict[str, KeyInfo], spend: dict[str, dict[str, _Spend]], items: dict[str, _ItemRow],
    since: datetime, until: datetime, t: SignalThresholds,
) -> list[Found]:  # fmt: skip
    counts: dict[str, int] = {k: sum(s.requests for s in per_item.values()) for k, per_item in spend.items()}
    wanted = sorted(
        k for k, n in counts.items() if n >= t.cadence_min_requests and (t.flag_service_keys or not _is_service(keys, k))
    )
    if not wanted:
        return []
    query = (
        select(_E.key_id, _E.ts)
        .where(_in_period(_E.ts, since, until), _E.attempt == 1, _E.key_id.in_(wanted))
        .order_by(_E.key_id, _E.ts)
    )
    found: list[Found] = []
    current: _Intervals | None = None
    current_key: str | None = None

    def finish() -> None:
        if current is not None and current_key is not None:
            result = _cadence_evidence(current, t)
            if result is not None:
                found.append(
                    (current_key, result, _listed([_item_entry(items, s) for s in spend[current_key].values() if s.requests]))
                )

    for key_id, ts in connection.execute(query.execution_options(yield_per=20_000)):
        if key_id != current_key:
            finish()
            current, current_key = _Intervals(), key_id
        assert current is not None
        if current.last is not None:
            current.gaps.append((ts - current.last).total_seconds())
        current.first = current.first or ts
        current.last = ts
        current.requests += 1
        current.hours.add(ts.hour)
        current.day_hours[ts.date()].add(ts.hour)
    finish()
    return found


def _cadence_evidence(run: _Intervals, t: SignalThresholds) -> dict[str, Any] | None:
    if run.requests < t.cadence_min_requests or not run.gaps:
        return None
    mean = statistics.fmean(run.gaps)
    cv = statistics.pstdev(run.gaps) / mean if mean > 0 else None
    around = sum(1 for hours in run.day_hours.values() if len(hours) >= t.around_clock_min_hours)
    reasons = []
    if cv is not None and cv <= t.cadence_max_cv:
        reasons.append("regular_intervals")
    if around >= t.around_clock_min_days:
        reasons.append("around_the_clock")
    if not reasons:
        return None
    return {
        "requests": run.requests,
        "first": iso(run.first),
        "last": iso(run.last),
        "interval_mean_seconds": _round(mean, 3),
        "interval_median_seconds": _round(statistics.median(run.gaps), 3),
        "interval_cv": _round(cv),
        "distinct_hours": len(run.hours),
        "around_the_clock_days": around,
        "reasons": reasons,
    }


def cost_outliers(
    connection: Connection, items: dict[str, _ItemRow], since: datetime, until: datetime, t: SignalThresholds
) -> list[Found]:
    completed = select(_W.id).where(_W.status == "done", _in_period(_W.completed_at, since, until))
    query = (
        select(
            _E.work_item,
            _E.key_id,
            _E.team,
            _requests_column().label("requests"),
            func.sum(_E.cost_usd).label("cost"),
            func.coalesce(func.sum(_E.total_tokens), 0).label("tokens"),
            func.min(_E.ts).label("first"),
            func.max(_E.ts).label("last"),
        )
        .where(_E.work_item.in_(completed))
        .group_by(_E.work_item, _E.key_id, _E.team)
    )
    by_item: dict[str, dict[str, _Spend]] = defaultdict(dict)  # item -> key -> all-time spend
    team_spend: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    priced: set[str] = set()
    for row in connection.execute(query):
        s = by_item[row.work_item].setdefault(row.key_id, _Spend(row.work_item))
        s.requests += int(row.requests or 0)
        s.cost += float(row.cost or 0.0)
        s.tokens += int(row.tokens)
        s.first = row.first if s.first is None or row.first < s.first else s.first
        s.last = row.last if s.last is None or row.last > s.last else s.last
        if row.cost is not None:
            priced.add(row.work_item)
        if row.team is not None:
            totals = team_spend[row.work_item][row.team]
            totals[0] += float(row.cost or 0.0)
            totals[1] += int(row.tokens)

    costs_by_team: dict[str, dict[str, float]] = defaultdict(dict)
    for item_id in priced:
        team = items[item_id].team
        if team is None and team_spend.get(item_id):
            team = min(team_spend[item_id].items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[0]
        if team is not None:
            costs_by_team[team][item_id] = sum(s.cost for s in by_item[item_id].values())

    flagged: dict[str, list[tuple[_Spend, dict[str, Any]]]] = defaultdict(list)
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
                    "item_cost_usd": _money(cost),
                    "team": team,
                    "team_items": len(values),
                    "team_median_usd": _money(median),
                    "team_mad_usd": _money(mad),
                    "robust_z": _round(z, 3),
                    "ratio_to_median": _round(cost / median, 3) if median > 0 else None,
                    "key_cost_usd": _money(s.cost),
                    "key_share": _round(share, 6),
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
            "cost_usd": _money(sum(s.cost for s in spends)),
            **_span(spends),
        }
        found.append((key_id, evidence, _listed([_item_entry(items, s, **figures) for s, figures in entries])))
    return found


def unverified(spend: dict[str, dict[str, _Spend]], items: dict[str, _ItemRow], t: SignalThresholds) -> list[Found]:
    found = []
    for key_id, per_item in spend.items():
        total = sum(s.cost for s in per_item.values())
        spends = [s for s in per_item.values() if _status(items, s.item) in WITHOUT_VERIFICATION]
        unverified = sum(s.cost for s in spends)
        if total <= 0 or unverified < t.unverified_min_usd or unverified / total < t.unverified_min_share:
            continue
        evidence = {
            "cost_usd": _money(total),
            "unverified_cost_usd": _money(unverified),
            "share": _round(unverified / total),
            "requests": sum(s.requests for s in spends),
            "items": len(spends),
            **_span(spends),
        }
        found.append((key_id, evidence, _listed([_item_entry(items, s) for s in spends])))
    return found


def _is_service(keys: dict[str, KeyInfo], key_id: str) -> bool:
    key = keys.get(key_id)
    return key is not None and key.role == "service"


# -- the report -----------------------------------------------------------------------------------


