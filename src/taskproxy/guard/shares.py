"""This process's shares of budgets that several replicas spend from.

A budget (a work item's, a team's in one month) is an allowance in the database (storage/leases.py).
A process takes a slice of it at a time (a tenth of the budget, or twice the largest request it has
seen on it, whichever is more) and admits requests while what it has spent of its slices is below
what it was granted. The first request on a budget goes on credit while the first slice is fetched;
the next slice is asked for in the background once half of the last one is spent; a request that finds
the slices spent waits for the next (at most `LEASE_WAIT_SECONDS`), and is refused when the allowance
is gone. What a process was granted and did not spend goes back when the
item leaves its working set (a slice that arrives after it left, too; spend counted after it left
is added) and when the process stops (a process that is killed keeps its slices:
the budget is under-spent by them, never over-spent).

What goes back waits in memory for the next refresh, per budget. Once `MAX_RETURNS` budgets wait, a
new budget entering the working set first has them written (a flood of new items makes its own
requests wait for that, up to `LEASE_WAIT_SECONDS`, rather than the settlements be lost); only when
the database does not take them in time (an outage) and `2 × MAX_RETURNS` wait are further ones
dropped, and logged: a dropped slice leaves that budget under-spent by it, and dropped spend can let
it be over-spent by as much.

The bound: the replicas together are granted at most the budget, and each admits only within its
grant, so the spend exceeds the budget by at most the requests admitted and still in flight when
the grants ran out (their size is known only once the provider answers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

import anyio
from cachetools import LRUCache
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.storage import leases
from taskproxy.threads import DaemonThreads, finish_within

log = logging.getLogger("taskproxy.budgets")
LEASE_WAIT_SECONDS = 1.0
MAX_RETURNS = 10_000  # budgets waiting to be settled before a new budget waits for them to be written
ALONE_SECONDS = 30.0  # after a failed lease, how long a share is checked without leases before trying again
SETTLE_WAIT_SECONDS = 3.0  # at shutdown, how long the unused slices' write is waited for
SLICES = 10
Limits = tuple[int | None, int | None]  # tokens, nano-USD; None: not limited


@dataclass(slots=True)
class _Share:
    scope: str
    window: str
    granted: int = 0
    granted_nanos: int = 0
    used: int = 0
    used_nanos: int = 0
    largest: int = 0  # the largest request charged to it, per measure: slices are at least twice that
    largest_nanos: int = 0
    exhausted: bool = False  # every replica together holds the whole budget
    credited: bool = False  # the first request was admitted before any slice arrived
    alone_until: float = 0.0  # the database did not answer: until then this process checks against its own count
    arrived: asyncio.Event | None = None  # set when the slice asked for arrives
    leased: bool = False  # a budget shared through leases: its row counts what this process spends of it
    evicted: bool = False  # it left the working set: what it was granted, and what arrives later, goes back
    returned: int = 0  # of what it was granted, what is on its way back
    returned_nanos: int = 0

    def room(self, limits: Limits) -> bool:
        return (limits[0] is None or self.used < self.granted) and (limits[1] is None or self.used_nanos < self.granted_nanos)

    def running_low(self, limits: Limits) -> bool:
        tokens_slice, nanos_slice = self.slice(limits)
        return (limits[0] is not None and self.granted - self.used <= tokens_slice // 2) or (
            limits[1] is not None and self.granted_nanos - self.used_nanos <= nanos_slice // 2
        )

    def slice(self, limits: Limits) -> tuple[int, int]:
        """The next slice to ask for; it also covers what was spent beyond the grants (the first request,
        on credit; requests admitted on this process's own count while a slice was late)."""
        tokens = 0 if limits[0] is None else max(1, -(-limits[0] // SLICES), 2 * self.largest) + max(0, self.used - self.granted)
        nanos = 0 if limits[1] is None else max(1, -(-limits[1] // SLICES), 2 * self.largest_nanos) + max(0, self.used_nanos - self.granted_nanos)
        return tokens, nanos


class _Returning(LRUCache):  # type: ignore[type-arg]
    """An LRU of shares that hands the unused part of an evicted share back."""

    def __init__(self, maxsize: int, on_evict: "BudgetShares") -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Hashable, _Share]:
        key, share = super().popitem()
        share.evicted = True
        self._on_evict.give_back_later(share)
        if share.leased:
            self._on_evict.left[key] = True
        return key, share


class BudgetShares:
    def __init__(self, engine: Engine, capacity: int) -> None:
        self._engine = engine
        self._lock = threading.Lock()  # charged from the writer thread too
        self._shares: _Returning = _Returning(capacity, self)
        self._returns: dict[tuple[str, str], list[int]] = {}  # (scope, window): [tokens, nanos] to give back (< 0: to add)
        self.left: LRUCache[tuple[str, str], bool] = LRUCache(capacity)  # leased budgets whose shares left the working set
        self._threads = DaemonThreads(4, "taskproxy-budget-lease")  # not joined at exit (threads.py)
        self._background: set[asyncio.Task[None]] = set()
        self._flushing: asyncio.Task[None] | None = None
        self.dropped = 0  # settlements lost past 2 × MAX_RETURNS waiting (an outage and a flood of new budgets)

    def _share(self, scope: str, window: str) -> _Share:
        share = self._shares.get((scope, window))
        if share is None:
            share = self._shares[(scope, window)] = _Share(scope, window)
        return share

    def _backlogged(self, scope: str, window: str) -> bool:
        """Would a share entering the working set here evict one while `MAX_RETURNS` budgets wait to be settled?"""
        return (scope, window) not in self._shares and len(self._returns) >= MAX_RETURNS

    async def admit(self, scope: str, window: str, limits: Limits, spent: tuple[int, int]) -> bool:
        """May one more request spend from this budget here? `spent`: what is known to be spent of it
        (the counters), which counts as taken before the first lease."""
        if self._backlogged(scope, window):
            await self._drain_backlog()
        with self._lock:
            share = self._share(scope, window)
            share.leased = True
        if share.alone_until > time.monotonic():
            return True  # checked against the process's own count of the spend (Budgets)
        if not share.room(limits) and not share.exhausted:
            if not share.credited and share.granted == 0 and share.granted_nanos == 0:
                # The first request here on this budget goes on credit while its first slice is fetched:
                # a new item costs its first request no database round trip.
                share.credited = True
                if share.arrived is None:
                    self._ask(share, limits, spent)
                return True
            # Wait for slices until there is room or the budget is gone (a slice asked for before the
            # first answers were counted can be smaller than a request).
            with anyio.move_on_after(LEASE_WAIT_SECONDS) as waiting:
                while not share.room(limits) and not share.exhausted and share.alone_until <= time.monotonic():
                    if share.arrived is None:
                        self._ask(share, limits, spent)
                    await share.arrived.wait()  # type: ignore[union-attr]
            if waiting.cancelled_caught:  # the database is slow to answer: the process's own count decides (Budgets)
                if share.arrived is not None:  # until the slice arrives, rather than a second's wait per request
                    share.alone_until = time.monotonic() + ALONE_SECONDS
                return True
        if share.alone_until > time.monotonic():
            return True
        admitted = share.room(limits)
        if admitted and not share.exhausted and share.arrived is None and share.running_low(limits):
            self._ask(share, limits, spent)
        return admitted

    def use(self, scope: str, window: str, tokens: int, nanos: int) -> None:
        # Called on the request path too: it never waits for the database. It rarely brings a share into
        # the working set (admit did, just before), so the backlog's room beyond MAX_RETURNS covers it.
        with self._lock:
            if (scope, window) not in self._shares and (scope, window) in self.left:
                # Spent after its share left the working set (the end of a long answer, the writer's
                # estimate), when that share had settled what it held: added to the budget's row.
                self._settle(scope, window, -tokens, -nanos)
                return
            share = self._share(scope, window)
            share.used += tokens
            share.used_nanos += nanos
            share.largest = max(share.largest, tokens)
            share.largest_nanos = max(share.largest_nanos, nanos)

    async def _drain_backlog(self) -> None:
        """Have the settlements waiting written before a new share evicts another: one write at a time,
        which every request that finds the backlog full waits for, at most `LEASE_WAIT_SECONDS` (a
        database that is slow to answer does not hold requests up longer than a slow lease does)."""
        if self._flushing is None or self._flushing.done():
            self._flushing = self._spawn(self._threads.run(self.flush_returns))
        with anyio.move_on_after(LEASE_WAIT_SECONDS):
            try:
                await asyncio.shield(self._flushing)
            except Exception:  # a bug in the write: the request still goes on (the settlements wait in memory)
                log.exception("writing the budgets' settlements failed")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` beside the requests, held until it ends (a task nobody holds may be collected
        mid-run) and waited for at shutdown (aclose)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _ask(self, share: _Share, limits: Limits, spent: tuple[int, int]) -> None:
        share.arrived = asyncio.Event()
        self._spawn(self._take(share, limits, spent))

    async def _take(self, share: _Share, limits: Limits, spent: tuple[int, int]) -> None:
        arrived = share.arrived
        try:
            grant = await self._threads.run(leases.take, self._engine, share.scope, share.window, share.slice(limits), limits, spent)
        except (SQLAlchemyError, RuntimeError) as exc:  # RuntimeError: the process is stopping (its lease threads are closed)
            log.warning("could not lease from the budget of %s (%s): checked against this process's count meanwhile", share.scope,
                        exc.__class__.__name__)  # fmt: skip
            share.alone_until = time.monotonic() + ALONE_SECONDS
        except Exception:  # a bug: the same fallback, or every request on the budget would ask again at once, in a loop
            log.exception("leasing from the budget of %s failed: checked against this process's count meanwhile", share.scope)
            share.alone_until = time.monotonic() + ALONE_SECONDS
        else:
            share.alone_until = 0.0  # it was slow, not gone: back on slices (what was spent meanwhile is counted: use())
            with self._lock:
                share.granted += grant.amount
                share.granted_nanos += grant.nanos
                share.exhausted = (limits[0] is not None and grant.taken >= limits[0]) or (limits[1] is not None and grant.taken_nanos >= limits[1])
        finally:
            with self._lock:
                share.arrived = None
                if share.evicted:  # it left the working set while the slice was on its way: nobody here spends it
                    self.give_back_later(share)
            if arrived is not None:
                arrived.set()

    def give_back_later(self, share: _Share) -> None:
        """Settle a share leaving the working set (or a slice that reached it after it left): what it was
        granted beyond what it spent goes back; what it spent beyond its grants (the first request, on
        credit) is added. The budget's row then holds exactly what was spent through it."""
        unused = (share.granted - share.returned - share.used, share.granted_nanos - share.returned_nanos - share.used_nanos)
        if not share.leased:  # this process's alone: no row to settle with
            return
        if share.arrived is not None:
            # A slice is on its way, and the first one makes the budget's row: settled when it arrives
            # (_take), since a settlement written before the row exists would be lost.
            return
        if unused != (0, 0) and self._settle(share.scope, share.window, *unused):  # else dropped (an outage: see _settle)
            share.returned += unused[0]
            share.returned_nanos += unused[1]

    def _settle(self, scope: str, window: str, tokens: int, nanos: int) -> bool:
        """Queue a change of what this process holds of a budget, for the next flush (under the lock)."""
        pending = self._returns.get((scope, window))
        if pending is None:
            if len(self._returns) >= 2 * MAX_RETURNS:  # the database did not take the first MAX_RETURNS either
                self.dropped += 1
                if self.dropped == 1 or self.dropped % MAX_RETURNS == 0:
                    log.warning("%d budgets wait to be settled and the database takes none: %d settlements dropped "
                                "(budget %s under- or over-spent by what this process held of it)", len(self._returns), self.dropped, scope)  # fmt: skip
                return False
            pending = self._returns[(scope, window)] = [0, 0]
        pending[0] += tokens
        pending[1] += nanos
        return True

    def flush_returns(self) -> None:
        """Give back what evicted shares did not use (blocking; the refresh loop calls it)."""
        with self._lock:
            returns, self._returns = self._returns, {}
        if returns:
            try:
                leases.give_back(self._engine, [(scope, window, tokens, nanos) for (scope, window), (tokens, nanos) in returns.items()])
            except BaseException as exc:  # not written: they wait for the next flush
                with self._lock:
                    for (scope, window), (tokens, nanos) in returns.items():
                        self._settle(scope, window, tokens, nanos)
                if not isinstance(exc, SQLAlchemyError):
                    raise

    async def aclose(self) -> None:
        """At shutdown: wait a little for the slices on their way (a rolling restart under load would
        otherwise leave them granted to nobody), then give back every unused slice."""
        # asyncio.wait, not a cancelled gather: a lease cancelled here would still be granted by its
        # thread, and never given back. One that is still on its way after close() finds its share
        # evicted, queues its slice, and the last flush writes it.
        # Each write is waited for at most SETTLE_WAIT_SECONDS: a database gone silent must not hold
        # the process up (what is not given back leaves the budget under-spent, never over).
        try:
            if self._background:
                await asyncio.wait(set(self._background), timeout=2 * LEASE_WAIT_SECONDS)
            if not await finish_within(SETTLE_WAIT_SECONDS, self.close):
                log.warning("the database did not take the unused budget slices within %g s; they stay granted", SETTLE_WAIT_SECONDS)
                return
            if self._background:  # slices still on their way: their shares are evicted, so they queue themselves
                await asyncio.wait(set(self._background), timeout=2 * LEASE_WAIT_SECONDS)
                await finish_within(SETTLE_WAIT_SECONDS, self.flush_returns)
        finally:
            self._threads.close()

    def close(self) -> None:
        """Give back every unused slice (blocking; at shutdown)."""
        with self._lock:
            for share in self._shares.values():
                share.evicted = True  # a slice still on its way goes back when it arrives
                self.give_back_later(share)
            self._shares.clear()  # (clear() does not go through popitem)
        self.flush_returns()
