"""Spend counters: tokens and nano-USD per work item (its lifetime) and per team and calendar month
(UTC), kept by the writer in the transaction that inserts the events, so budgets are read by index
from a row per item or team, never summed from the events.

Each counter carries `updated_at`, the writer's clock at the write: a process reads the counters
changed since its last read (less `OVERLAP`, for clocks apart and transactions slow to commit), which
is work proportional to the spend since then, not to the history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import select
from sqlalchemy.engine import Connection

from taskproxy.storage import bulk
from taskproxy.storage.models import SpendCounter

ITEM, TEAM = "item", "team"
LIFETIME = ""
OVERLAP = timedelta(seconds=60)
_S = SpendCounter.__table__.c
_TABLE = SpendCounter.__table__
_KEYS_PER_QUERY = 5000  # PostgreSQL binds at most 65,535 parameters a statement
Scope = tuple[str, str, str]  # (scope, ref, period)


def month(ts: datetime) -> str:
    return ts.strftime("%Y-%m")


def scopes_of(event: dict) -> list[Scope]:
    """The counters an event adds to."""
    found: list[Scope] = [(ITEM, event["work_item"], LIFETIME)]
    if event.get("team"):
        found.append((TEAM, event["team"], month(event["ts"])))
    return found


_MERGES = {"tokens": "spend_counters.tokens + excluded.tokens", "cost_nanos": "spend_counters.cost_nanos + excluded.cost_nanos",
           "updated_at": "excluded.updated_at"}  # fmt: skip


def add(connection: Connection, events: Iterable[dict], now: datetime) -> None:
    """Add `events` (rows this transaction has just inserted) to their counters, from Python (SQLite;
    PostgreSQL adds them in the inserting statement itself: `upsert_over`)."""
    sums: dict[Scope, list[int]] = {}
    for event in events:
        tokens, nanos = int(event.get("total_tokens") or 0), int(event.get("cost_nanos") or 0)
        for scope in scopes_of(event):
            total = sums.setdefault(scope, [0, 0])
            total[0] += tokens
            total[1] += nanos
    rows = [{"scope": s, "ref": r, "period": p, "tokens": t, "cost_nanos": n, "updated_at": now} for (s, r, p), (t, n) in sorted(sums.items())]
    bulk.upsert(connection, _TABLE, rows, ("scope", "ref", "period"), _MERGES)  # in key order: concurrent writers lock alike


@cache
def upsert_over(source: str) -> str:
    """PostgreSQL: the statement that adds the events of `source` (a CTE of the rows just inserted) to
    their counters, as `add` does (`scopes_of`: the item's lifetime; the team's month, for an event with
    a team), in key order. Its one placeholder is the writer's clock (`updated_at`)."""
    return (
        f"INSERT INTO spend_counters (scope, ref, period, tokens, cost_nanos, updated_at) "
        f"SELECT scope, ref, period, tokens, cost_nanos, %s::timestamp FROM ("
        f"SELECT '{ITEM}' AS scope, work_item AS ref, '{LIFETIME}' AS period, COALESCE(SUM(total_tokens), 0) AS tokens, "
        f"COALESCE(SUM(cost_nanos), 0) AS cost_nanos FROM {source} GROUP BY work_item "
        f"UNION ALL SELECT '{TEAM}', team, to_char(ts, 'YYYY-MM'), COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cost_nanos), 0) "
        f"FROM {source} WHERE team <> '' GROUP BY team, to_char(ts, 'YYYY-MM')) AS sums ORDER BY scope, ref, period "
        f"ON CONFLICT (scope, ref, period) DO UPDATE SET {', '.join(f'{name} = {sql}' for name, sql in _MERGES.items())}"
    )


def changed_since(connection: Connection, since: datetime) -> dict[Scope, tuple[int, int]]:
    """Counters written at or after `since` (less OVERLAP)."""
    query = select(_S.scope, _S.ref, _S.period, _S.tokens, _S.cost_nanos).where(_S.updated_at >= since - OVERLAP)
    return {(row[0], row[1], row[2]): (int(row[3]), int(row[4])) for row in connection.execute(query)}


def read(connection: Connection, scopes: Sequence[Scope]) -> dict[Scope, tuple[int, int]]:
    """These counters (by primary key: `ref IN (...)` per scope and period); a scope with no spend yet is absent."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for scope, ref, period in scopes:
        wanted.setdefault((scope, period), []).append(ref)
    found: dict[Scope, tuple[int, int]] = {}
    for (scope, period), refs in wanted.items():
        for start in range(0, len(refs), _KEYS_PER_QUERY):
            chunk = refs[start : start + _KEYS_PER_QUERY]
            query = select(_S.ref, _S.tokens, _S.cost_nanos).where(_S.scope == scope, _S.period == period, _S.ref.in_(chunk))
            found.update({(scope, row[0], period): (int(row[1]), int(row[2])) for row in connection.execute(query)})
    return found
