"""Leases: taking a slice of an allowance shared by every replica (a key's requests in one minute, a
work item's or a team's budget), atomically, so that the slices handed out never add up to more than
the allowance.

An allowance has up to two measures: `granted` (requests, or tokens) and `granted_nanos` (nano-USD).
Blocking functions; the guard runs them in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from taskproxy.storage.models import Lease
from taskproxy.storage.repo import insert_ignoring_duplicates

_L = Lease.__table__.c


@dataclass(frozen=True)
class Grant:
    amount: int  # of the first measure (requests or tokens)
    nanos: int
    taken: int  # what all takers hold now, of each measure
    taken_nanos: int


def take(engine: Engine, scope: str, window: str, wanted: tuple[int, int], allowance: tuple[int | None, int | None],
         spent: tuple[int, int] = (0, 0)) -> Grant:  # fmt: skip
    """Take up to `wanted` of what is left of `allowance` (None: that measure is unlimited). What was
    `spent` before the first lease of this scope and window (history) counts as taken from the start.
    The row is locked for the transaction on PostgreSQL; SQLite has one writer."""
    with engine.begin() as connection:
        connection.execute(insert_ignoring_duplicates(connection.dialect.name, Lease.__table__),
                           [{"scope": scope, "window": window, "granted": spent[0], "granted_nanos": spent[1]}])  # fmt: skip
        row = connection.execute(select(_L.granted, _L.granted_nanos).where(_L.scope == scope, _L.window == window).with_for_update()).one()
        taken = (int(row[0]), int(row[1]))
        amounts = [wanted[i] if allowance[i] is None else max(0, min(wanted[i], allowance[i] - taken[i])) for i in (0, 1)]  # type: ignore[operator]
        if any(allowance[i] is not None and amounts[i] == 0 for i in (0, 1)):
            amounts = [0, 0]  # one measure spent: nothing more
        connection.execute(update(Lease.__table__).where(_L.scope == scope, _L.window == window)
                           .values(granted=taken[0] + amounts[0], granted_nanos=taken[1] + amounts[1]))  # fmt: skip
    return Grant(amounts[0], amounts[1], taken[0] + amounts[0], taken[1] + amounts[1])


def give_back(engine: Engine, returns: list[tuple[str, str, int, int]]) -> None:
    """Return unused slices: (scope, window, amount, nanos) each."""
    with engine.begin() as connection:
        for scope, window, amount, nanos in sorted(returns):
            connection.execute(update(Lease.__table__).where(_L.scope == scope, _L.window == window)
                               .values(granted=_L.granted - amount, granted_nanos=_L.granted_nanos - nanos))  # fmt: skip


def prune(engine: Engine, before: str) -> None:
    """Forget rate windows that ended (their names sort as times do); budget leases are kept."""
    with engine.begin() as connection:
        connection.execute(delete(Lease.__table__).where(_L.scope.like("rate:%"), _L.window < before))


def minute(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M")
