"""Whether the database answers, as `/readyz` asks it: one ping at a time, in threads of their own,
shared by the probes that arrive while it runs and kept for a second after it answers.

`/readyz` needs no key. A ping per probe took a thread each, and against a database gone silent each
thread stayed until the connection's TCP timeout: a hundred probing clients for 12 s grew the process
from 12 to 704 threads, and its recording caught up 12 s after the database came back instead of 2
(found by a review). Now a flood of probes costs `PINGS_AT_ONCE` threads and connections at most.
A ping stuck past a probe's wait (on a connection the database dropped while it was silent, say) is
left to end, and the next probe starts another on another connection, so one dead connection does
not keep the process unready after the database is back.
"""

from __future__ import annotations

import asyncio
import math
import time

from sqlalchemy.engine import Engine

from taskproxy.storage.db import ping
from taskproxy.threads import DaemonThreads

FRESH_SECONDS = 1.0  # a ping's answer serves the probes of this long after it
PINGS_AT_ONCE = 2  # a stuck one and the one after it


class Readiness:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._threads = DaemonThreads(PINGS_AT_ONCE, "taskproxy-ready")
        self._ping: asyncio.Future[None] | None = None  # the latest
        self._started_at = -math.inf
        self._answered_at = -math.inf
        self._running = 0

    async def check(self, wait: float) -> None:
        """Return once the database has answered; raise what its ping raised, or TimeoutError after
        `wait` seconds."""
        now = time.monotonic()
        latest = self._ping
        fresh = latest is not None and latest.done() and now - self._answered_at <= FRESH_SECONDS
        in_time = latest is not None and not latest.done() and now - self._started_at < wait
        if latest is None or not (fresh or in_time) and self._running < PINGS_AT_ONCE:
            latest = self._start(now)
        await asyncio.wait_for(asyncio.shield(latest), wait)

    def _start(self, now: float) -> asyncio.Future[None]:
        started = asyncio.ensure_future(self._threads.run(ping, self._engine))
        self._ping, self._started_at = started, now
        self._running += 1
        started.add_done_callback(self._answered)
        return started

    def _answered(self, answered: asyncio.Future[None]) -> None:
        self._running -= 1
        if not answered.cancelled():
            answered.exception()  # read here: a stuck ping that fails after every probe stopped waiting is no error to log
        if answered is self._ping:  # a stuck one ending late says nothing about now
            self._answered_at = time.monotonic()

    def close(self) -> None:
        self._threads.close()
