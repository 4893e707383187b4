"""Leases: taking a slice of an allowance shared by every replica (a key's requests in one minute),
atomically, so that the slices handed out never add up to more than the allowance.

Blocking functions; the rate limiter runs them in a worker thread, off the request path.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from taskproxy.storage.models import Lease
from taskproxy.storage.repo import insert_ignoring_duplicates

_L = Lease.__table__.c


def take(engine: Engine, scope: str, window: str, wanted: int, allowance: int) -> tuple[int, int]:
    """Take up to `wanted` of what is left of `allowance` in `window`. Returns how much was granted
    (0: nothing is left) and how much all takers have taken now. The row is locked for the
    transaction on PostgreSQL; SQLite has one writer."""
    with engine.begin() as connection:
        connection.execute(insert_ignoring_duplicates(connection.dialect.name, Lease.__table__), [{"scope": scope, "window": window, "granted": 0}])
        taken = connection.execute(select(_L.granted).where(_L.scope == scope, _L.window == window).with_for_update()).scalar_one()
        granted = max(0, min(wanted, allowance - int(taken)))
        if granted:
            connection.execute(update(Lease.__table__).where(_L.scope == scope, _L.window == window).values(granted=_L.granted + granted))
    return granted, int(taken) + granted


def prune(engine: Engine, before: str) -> None:
    """Forget windows that ended (their names sort as times do)."""
    with engine.begin() as connection:
        connection.execute(delete(Lease.__table__).where(_L.window < before))


def minute(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M")
