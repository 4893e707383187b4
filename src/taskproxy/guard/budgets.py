"""Budgets per work item and per team (tokens and USD), checked before anything goes upstream.

Spend is counted in memory: each process counts what the provider reports the moment it passes by
on the request path (metering/meter.py), before the client has the end of the answer, and adds what
only the writer thread learns (an estimate, when the provider reported nothing) as it builds the
record. The writer keeps spend counters per item and per team-month in the database
(storage/spend.py); every `budgets.refresh_seconds` each process reads the counters changed since
its last read (spend through other replicas), keeping the larger of its own count and the
database's. A registered, budgeted item whose spend this process has not read yet (first seen, or
dropped from the bounded working set) costs its first request one read of its counter, by primary
key. An id not registered (open mode; registered by the writer with its first event) has no counter
to read yet: each process spends at most a slice of its budget (a tenth) alone, then through the
leases below, as for any item.

A request is refused once the spend has reached the limit, so on one process the overshoot is
bounded by the requests already admitted and still in flight when the limit is crossed: a client
sending one request after another is refused on the first request after its budget is spent.
Replicas share a budget through leases (guard/shares.py): each spends only the slices it was granted,
so across replicas too the overshoot is bounded by the requests in flight (plus, on an item not yet
registered, a tenth of its budget per replica). Team budgets run per calendar month, UTC.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

from cachetools import LRUCache
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.errors import BudgetExceeded
from taskproxy.guard.items import ItemCache, KnownItem
from taskproxy.guard.lookups import Lookups, LookupTimeout
from taskproxy.guard.shares import SLICES, BudgetShares
from taskproxy.money import format_usd, to_nanos
from taskproxy.settings import BudgetSettings
from taskproxy.storage import spend
from taskproxy.storage.batch import Record

log = logging.getLogger("taskproxy.budgets")


@dataclass(slots=True)
class _Spent:
    tokens: int = 0
    nanos: int = 0
    read: bool = False  # the database's counter has been read into it


class Budgets:
    def __init__(self, engine: Engine, settings: BudgetSettings, items: ItemCache) -> None:
        self._engine = engine
        self._settings = settings
        self._items = items
        self._lock = threading.Lock()
        self._item_spent: LRUCache[str, _Spent] = LRUCache(items.capacity)
        self._team_spent: dict[tuple[str, str], _Spent] = {}  # (team, "YYYY-MM")
        self._since: datetime | None = None
        self._lookups = Lookups("spend")  # the spend of items not in memory (guard/lookups.py)
        self.shares = BudgetShares(engine, items.capacity)

    def close(self) -> None:
        self._lookups.close()

    @property
    def _item_defaults(self) -> bool:
        return self._settings.work_item_tokens is not None or self._settings.work_item_usd is not None

    def warm(self, now: datetime) -> None:
        """Read the spend of the configured teams this month and of the budgeted items held (blocking)."""
        scopes: list[spend.Scope] = [(spend.TEAM, team, spend.month(now)) for team in self._settings.teams]
        held = self._items.cached_ids()
        if not self._item_defaults:
            held = [item_id for item_id in held if (known := self._items.cached(item_id)) is not None and known.has_budget]
        scopes += [(spend.ITEM, item_id, spend.LIFETIME) for item_id in held]
        with self._engine.connect() as connection:
            found = spend.read(connection, scopes)
        self._since = now
        with self._lock:
            for item_id in held:
                self._raise(self._item_entry(item_id), found.get((spend.ITEM, item_id, spend.LIFETIME)))
            for team in self._settings.teams:
                self._raise(self._team_entry(team, spend.month(now)), found.get((spend.TEAM, team, spend.month(now))))

    def load(self, now: datetime) -> int:
        """Read the counters changed since the last read (blocking; run it in a thread). Returns how many."""
        if self._since is None:
            self.warm(now)
            return 0
        with self._engine.connect() as connection:
            changed = spend.changed_since(connection, self._since)
        self._since = now
        with self._lock:
            for (scope, ref, period), figures in changed.items():
                if scope == spend.ITEM:
                    entry = self._item_spent.get(ref)
                    if entry is not None and entry.read:  # not yet read: its whole counter is read on its next request
                        self._raise(entry, figures)
                elif ref in self._settings.teams:
                    self._raise(self._team_entry(ref, period), figures)
        return len(changed)

    def refresh(self, now: datetime) -> None:
        """One refresh (blocking): the counters that changed; the unused slices of evicted shares go back."""
        self.load(now)
        self.shares.flush_returns()

    @staticmethod
    def _raise(entry: _Spent, figures: tuple[int, int] | None) -> None:
        # Spend only grows. Counted here but not committed yet, it is missing from the database's totals:
        # keep the larger of the two, so a re-read never forgets this process's latest spend.
        if figures is not None:
            _raise_to(entry, figures[0], figures[1])
        entry.read = True

    def _item_entry(self, item_id: str) -> _Spent:
        entry = self._item_spent.get(item_id)
        if entry is None:
            entry = self._item_spent[item_id] = _Spent()
        return entry

    def _team_entry(self, team: str, month: str) -> _Spent:
        entry = self._team_spent.get((team, month))
        if entry is None:
            entry = self._team_spent[(team, month)] = _Spent(read=True)  # a new month starts at zero
        return entry

    def charge(self, item_id: str, team: str | None, ts: datetime, tokens: int, nanos: int) -> None:
        """Count spend the provider just reported (the request path; cheap, no database)."""
        if not tokens and not nanos:
            return
        with self._lock:
            spent = self._item_entry(item_id)
            spent.tokens += tokens
            spent.nanos += nanos
            if team in self._settings.teams:
                team_spent = self._team_entry(team, spend.month(ts))  # type: ignore[arg-type]
                team_spent.tokens += tokens
                team_spent.nanos += nanos
        self.shares.use(f"item:{item_id}", "", tokens, nanos)
        if team in self._settings.teams:
            self.shares.use(f"team:{team}", spend.month(ts), tokens, nanos)

    def record(self, record: Record) -> None:
        """Count what an event's record adds to what the request path counted (the writer thread)."""
        if record.kind != "event":
            return
        row = record.row
        self.charge(row["work_item"], row["team"], row["ts"], int(row["total_tokens"] or 0) - record.charged[0],
                    int(row["cost_nanos"] or 0) - record.charged[1])  # fmt: skip

    async def check(self, item_id: str, known: KnownItem | None, team: str | None, now: datetime) -> None:
        tokens_limit = known.budget_tokens if known and known.budget_tokens is not None else self._settings.work_item_tokens
        usd_limit = known.budget_usd if known and known.budget_usd is not None else self._settings.work_item_usd
        if tokens_limit is not None or usd_limit is not None:
            with self._lock:
                entry = self._item_spent.get(item_id)
            if known is not None and (entry is None or not entry.read):  # registered, first seen here: read its spend once
                await self._read_item(item_id)
            with self._lock:
                entry = self._item_spent.get(item_id)
                spent = (entry.tokens, entry.nanos) if entry is not None else (0, 0)
            where = f"The work item {item_id}"
            _refuse_if_spent(where, spent[0], tokens_limit, spent[1], usd_limit)
            # Shared by the replicas through leases. An id met first in requests (open mode) is known to the
            # others only once the writer has registered it (each could spend the whole budget meanwhile),
            # so it leases too once this process has spent a slice of it: ids invented by the thousand,
            # spending little each, take no lease rows.
            if known is not None:
                await self._leased(where, f"item:{item_id}", "", (tokens_limit, usd_limit), spent)
            elif _past_a_slice(spent, tokens_limit, usd_limit):  # what it spent here is its share's own use, not history
                await self._leased(where, f"item:{item_id}", "", (tokens_limit, usd_limit), (0, 0))
        team_budget = self._settings.teams.get(team) if team else None
        if team_budget is not None:
            with self._lock:
                entry = self._team_spent.get((team, spend.month(now)))  # type: ignore[arg-type]
                spent = (entry.tokens, entry.nanos) if entry is not None else (0, 0)
            where = f"The team {team} this month"
            _refuse_if_spent(where, spent[0], team_budget.tokens, spent[1], team_budget.usd)
            await self._leased(where, f"team:{team}", spend.month(now), (team_budget.tokens, team_budget.usd), spent)

    async def _leased(self, where: str, scope: str, window: str, limits: tuple[int | None, float | None], spent: tuple[int, int]) -> None:
        """Refuse unless this process holds a share of the budget left to spend (guard/shares.py)."""
        tokens_limit, usd_limit = limits
        nanos_limit = to_nanos(usd_limit) if usd_limit is not None else None
        if not await self.shares.admit(scope, window, (tokens_limit, nanos_limit), spent):
            limit = f"{tokens_limit:,} tokens" if tokens_limit is not None else format_usd(usd_limit)
            raise BudgetExceeded(f"{where} has no budget left: the proxy's replicas together have been granted all of its {limit}, "
                                 "and the last of it is being spent. Ask an admin to raise it.")  # fmt: skip

    async def _read_item(self, item_id: str) -> None:
        try:
            found = await self._lookups.run(self._read_counter, item_id)
        except (SQLAlchemyError, LookupTimeout):  # the database is down: usage is spooled, so serve on what this process counted
            log.warning("could not read the spend of %s; checked against this process's count until the database answers", item_id)
            return
        with self._lock:
            self._raise(self._item_entry(item_id), found)

    def _read_counter(self, item_id: str) -> tuple[int, int] | None:
        scope = (spend.ITEM, item_id, spend.LIFETIME)
        with self._engine.connect() as connection:
            return spend.read(connection, [scope]).get(scope)


def _past_a_slice(spent: tuple[int, int], tokens_limit: int | None, usd_limit: float | None) -> bool:
    """This process has spent a slice (a tenth, guard/shares.py) of a budget."""
    return (tokens_limit is not None and spent[0] * SLICES >= tokens_limit) or (usd_limit is not None and spent[1] * SLICES >= to_nanos(usd_limit))


def _raise_to(spent: _Spent, tokens: int, nanos: int) -> None:
    spent.tokens = max(spent.tokens, tokens)
    spent.nanos = max(spent.nanos, nanos)


def _refuse_if_spent(where: str, tokens: int, tokens_limit: int | None, nanos: int, usd_limit: float | None) -> None:
    # What was spent is not said: any key may name an item, and a team's spend less a key's own is the
    # rest of the team's (a teammate's, in a team of two). The reports give it to admins.
    if tokens_limit is not None and tokens >= tokens_limit:
        raise BudgetExceeded(f"{where} has used all of its budget of {tokens_limit:,} tokens. Ask an admin to raise it.")
    if usd_limit is not None and nanos >= to_nanos(usd_limit):
        raise BudgetExceeded(f"{where} has spent all of its budget of {format_usd(usd_limit)}. Ask an admin to raise it.")
