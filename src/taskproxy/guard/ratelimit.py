"""A per-key request rate limit (`limits.requests_per_minute`), shared by every process and replica.

Requests are counted per key and calendar minute (UTC). A minute's allowance lives in the database
(storage/leases.py): each process takes a slice of it at a time (a tenth of the limit, at least one
request) and admits requests against its slices in memory, so the request path never waits for the
database. The next slice is taken in the background once half of the last one is used; while it is
on its way the process admits on credit, up to one slice, and a request beyond that credit waits for
it (at most a second: only a burst that outruns the leases, as a minute starts, waits). A grant also
says how much of the allowance all processes have taken, so a process knows when it is gone.

The bound: a key's requests in one minute, over N processes, are at most the limit plus one slice per
process (the credit spent while the allowance ran out elsewhere). While the database does not answer,
a process counts on its own: at most the limit per process. A refused request gets 429 `rate_limited`
with the seconds to the next minute, and is not forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.errors import RateLimited
from taskproxy.storage import leases
from taskproxy.threads import DaemonThreads
from taskproxy.timeutil import utcnow

log = logging.getLogger("taskproxy.ratelimit")
SLICES_PER_MINUTE = 10
LEASE_WAIT_SECONDS = 1.0


@dataclass(slots=True)
class _Minute:
    minute: str
    granted: int = 0  # leased to this process
    used: int = 0  # admitted by this process
    asking: bool = False
    exhausted: bool = False  # every process together has taken the whole allowance
    alone: bool = False  # the database did not answer: counted by this process alone
    arrived: asyncio.Event | None = None  # set when the slice asked for has arrived


class RateLimiter:
    def __init__(self, requests_per_minute: int | None, engine: Engine | None = None) -> None:
        self._limit = requests_per_minute
        self._engine = engine
        self._slice = max(1, -(-(requests_per_minute or 0) // SLICES_PER_MINUTE))
        self._minutes: dict[str, _Minute] = {}
        self._current = ""
        self._threads = DaemonThreads(2, "taskproxy-rate-lease")  # not joined at exit (threads.py)
        self._background: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        """At shutdown: leases not yet asked for are dropped; those under way end in their threads."""
        self._threads.close()

    @property
    def slice(self) -> int:
        return self._slice

    async def check(self, key_id: str, now: datetime | None = None) -> None:
        if self._limit is None:
            return
        now = now or utcnow()
        minute = leases.minute(now)
        if minute != self._current:  # a new minute: the last one's counts are done with
            self._current = minute
            self._minutes = {}
            self._run(self._prune, minute)
        state = self._minutes.get(key_id)
        if state is None:
            state = self._minutes[key_id] = _Minute(minute, alone=self._engine is None)
        if state.alone:
            allowed = self._limit
        elif state.exhausted:
            allowed = state.granted
        else:
            allowed = state.granted + self._slice
        if state.used >= allowed and state.asking and state.arrived is not None:
            # Requests outran the slice on its way (a burst as the minute starts): wait for it, briefly.
            with anyio.move_on_after(LEASE_WAIT_SECONDS) as waiting:
                await state.arrived.wait()
            if waiting.cancelled_caught:  # the database is slow to answer: counted in this process alone this minute,
                state.alone = True  # rather than a second's wait per request
            allowed = self._limit if state.alone else state.granted if state.exhausted else state.granted + self._slice
        if state.used >= allowed:
            wait = 60 - now.second
            raise RateLimited(f"This key sent {self._limit} requests this minute, its limit. Try again in {wait} s.", retry_after=wait)
        state.used += 1
        if not (state.alone or state.exhausted or state.asking) and state.granted - state.used <= self._slice // 2:
            self._ask(key_id, state)

    def _ask(self, key_id: str, state: _Minute) -> None:
        state.asking = True
        state.arrived = asyncio.Event()
        self._run(self._take, key_id, state)

    def _run(self, work: object, *args: object) -> None:
        if self._engine is None:
            return
        task = asyncio.get_running_loop().create_task(work(*args))  # type: ignore[operator]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _take(self, key_id: str, state: _Minute) -> None:
        try:
            grant = await self._threads.run(leases.take, self._engine, f"rate:{key_id}", state.minute, (self._slice, 0), (self._limit, None))
        except (SQLAlchemyError, RuntimeError) as exc:  # RuntimeError: the process is stopping (its lease threads are closed)
            log.warning("could not lease requests for key %s (%s): counting them in this process alone this minute", key_id,
                        exc.__class__.__name__)  # fmt: skip
            state.alone = True
            return
        else:
            state.granted += grant.amount
            state.exhausted = grant.taken >= (self._limit or 0)
        finally:
            state.asking = False
            if state.arrived is not None:
                state.arrived.set()
        if not state.exhausted and state.granted - state.used <= self._slice // 2:  # used up while it was on its way
            self._ask(key_id, state)

    async def _prune(self, minute: str) -> None:
        before = leases.minute(datetime.strptime(minute, "%Y-%m-%dT%H:%M") - timedelta(minutes=5))
        try:
            await self._threads.run(leases.prune, self._engine, before)
        except (SQLAlchemyError, RuntimeError):
            pass  # the next minute prunes them
