"""The writer's calls to the database, each waited for a bounded time (storage/writer.py).

A database that has gone silent (a failover, a host gone) holds a call until the connection's TCP
timeouts end it. The writer does not wait that long: past the bound, the call goes on in its thread
and `DatabaseCalls` raises an OperationalError, which the writer treats as the database down (it
spools). While that call is unanswered, the next fail at once. One still unanswered
`ABANDON_SECONDS` after it was sent, which only a PgBouncer without `query_timeout` holds that long,
is left to its thread, and calls go on in a new one. SQLite's calls are bounded the same way: a local
file does not go silent, but another process can hold its write lock (a backup, a `taskproxy db`
command) up to the busy timeout, and what the writer has answered meanwhile must reach the spool on
disk rather than wait in memory for a lock that a kill -9 would lose with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from taskproxy.threads import DaemonThreads

log = logging.getLogger("taskproxy.writer")

ABANDON_SECONDS = 60.0  # an unanswered call is left to its thread after this, and calls go on in a new one
MAX_ABANDONED = 2  # calls left waiting at once (each holds a connection): past it, they are waited for


class DatabaseCalls:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._threads = DaemonThreads(1, "taskproxy-writer-database")
        self._unanswered: Future[None] | None = None  # a call still waiting for the database
        self._unanswered_since = 0.0
        self._abandoned: list[Future[None]] = []  # calls left to their threads (ABANDON_SECONDS)

    def call(self, function: Callable[..., None], wait: float, *args: object) -> None:
        """Run `function(engine, *args)` in the database thread and wait for it, `wait` at most. Past the
        wait, or while an earlier call is unanswered: an OperationalError (the database is down)."""
        if self._unanswered is not None and not self._unanswered.done() and not self._abandon_unanswered():
            raise self._no_answer()
        self._unanswered = None
        started = time.monotonic()
        call = self._threads.submit(function, self._engine, *args)
        try:
            call.result(timeout=wait)
        except FutureTimeout:
            self._unanswered, self._unanswered_since = call, started
            raise self._no_answer() from None

    def _abandon_unanswered(self) -> bool:
        """Leave a call unanswered for `ABANDON_SECONDS` to its thread, and go on in a new one (at most
        `MAX_ABANDONED` at once). Only a connection held open by a middleman that does not give up
        (PgBouncer without `query_timeout`) waits that long: storage/db.py's TCP timeouts end the others."""
        self._abandoned = [call for call in self._abandoned if not call.done()]
        if time.monotonic() - self._unanswered_since < ABANDON_SECONDS or len(self._abandoned) >= MAX_ABANDONED:
            return False
        log.warning("a write has waited %.0f s for the database; it is left to its thread, and writing goes on in a new one",
                    time.monotonic() - self._unanswered_since)  # fmt: skip
        self._abandoned.append(self._unanswered)  # type: ignore[arg-type]
        self._threads.close()
        self._threads = DaemonThreads(1, "taskproxy-writer-database")
        return True

    def close(self) -> None:
        self._threads.close()

    def _no_answer(self) -> OperationalError:
        why = ("SQLite's write lock was not granted in time (another process holds it)" if self._engine.dialect.name == "sqlite"
               else "the database has not answered the last write")  # fmt: skip
        return OperationalError("writing a batch", {}, TimeoutError(why))
