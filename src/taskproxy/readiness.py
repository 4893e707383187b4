"""Whether the database answers, as `/readyz` asks it: one ping at a time, in one thread of its own,
shared by the probes that arrive while it runs and kept for a second after it answers.

`/readyz` needs no key. A ping per probe took a thread each, and against a database gone silent each
thread stayed until the connection's TCP timeout: a hundred probing clients for 12 s grew the process
from 12 to 704 threads, and its recording caught up 12 s after the database came back instead of 2
(found by a review). Now a flood of probes costs one thread and one connection at most.
"""

from __future__ import annotations

import asyncio
import math
import time

from sqlalchemy.engine import Engine

from taskproxy.storage.db import ping
from taskproxy.threads import DaemonThreads

FRESH_SECONDS = 1.0  # a ping's answer serves the probes of this long after it


class Readiness:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._threads = DaemonThreads(1, "taskproxy-ready")
        self._ping: asyncio.Future[None] | None = None
        self._answered_at = -math.inf

    async def check(self, wait: float) -> None:
        """Return once the database has answered; raise what its ping raised, or TimeoutError after
        `wait` seconds (the ping in flight is left to end, and the next probes wait for it)."""
        stale = self._ping is not None and self._ping.done() and time.monotonic() - self._answered_at > FRESH_SECONDS
        if self._ping is None or stale:
            self._ping = asyncio.ensure_future(self._threads.run(ping, self._engine))
            self._ping.add_done_callback(self._answered)
        await asyncio.wait_for(asyncio.shield(self._ping), wait)

    def _answered(self, _: asyncio.Future[None]) -> None:
        self._answered_at = time.monotonic()

    def close(self) -> None:
        self._threads.close()
