"""Waking the change feed's readers early on PostgreSQL (LISTEN/NOTIFY).

A change that refuses requests (a key revoked or bound, an item completed, closed or given a budget)
is noted in the change feed with a NOTIFY on `changes.CHANNEL`, which PostgreSQL delivers when its
transaction commits. Each serving process keeps one connection of its own listening on that
channel, in a thread of its own, and reads the feed as soon as a notification arrives: the change
reaches every replica in a moment instead of at its next timer (`auth.key_refresh_seconds`,
`work_items.refresh_seconds`), which stays as the fallback. The ids the writer registers as it meets
them in requests notify nobody: there are many of them and nothing is refused because of them.

A notification carries nothing: what changed is read from the feed, so a notification lost while the
listener reconnects costs only the wait for the timer (and the feed is read on every reconnection).
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import Engine

from taskproxy.storage.changes import CHANNEL
from taskproxy.storage.db import application_name, connection_defaults

log = logging.getLogger("taskproxy.changes")
STOP_SECONDS = 3.0  # close() waits this long for the thread at most
RETRY_SECONDS = 5.0  # after the connection failed, before the next


class ChangeListener:
    """A thread with one PostgreSQL connection, LISTENing on the change feed's channel, that calls
    `on_change` (from that thread) for every notification and after every (re)connection."""

    def __init__(self, engine: Engine, on_change: Callable[[], None]) -> None:
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # A connection that only listens sends nothing: without keepalives, a peer gone silently would
        # leave the listener waiting for good while the timers alone keep the caches fresh.
        self._tcp = connection_defaults(engine.url)
        self._named = {} if "application_name" in engine.url.query else {"application_name": application_name("listener")}
        self._on_change = on_change
        self._stopping = threading.Event()
        self._wake: tuple[int, int] | None = None  # close() writes to it: the thread waits on the socket and on this
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._listen, args=(self._wake[0],), name="taskproxy-change-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening (blocking, a moment). Safe before `start` and a second time."""
        self._stopping.set()
        if self._thread is None or self._wake is None:
            return
        os.write(self._wake[1], b"x")
        self._thread.join(timeout=STOP_SECONDS)
        if not self._thread.is_alive():  # else the thread may still select() on the pipe: leave it open
            os.close(self._wake[0])
            os.close(self._wake[1])
            self._wake = None

    def _listen(self, wake: int) -> None:
        # selectors (epoll here), not select.select(): a busy server's sockets pass 1,024, where
        # select() raises ValueError.
        with selectors.DefaultSelector() as selector:
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                try:
                    self._serve(selector)
                except psycopg.Error as exc:
                    log.warning("not listening for changes (%s); the timers keep the caches fresh; again in %.0f s",
                                exc.__class__.__name__, RETRY_SECONDS)  # fmt: skip
                except Exception:
                    # Whatever it is, a dead listener would leave every replica on its timers for good.
                    log.exception("the change listener failed; the timers keep the caches fresh; again in %.0f s", RETRY_SECONDS)
                self._stopping.wait(RETRY_SECONDS)

    def _serve(self, selector: selectors.BaseSelector) -> None:
        with psycopg.connect(self._conninfo, autocommit=True, **self._named, **self._tcp) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            socket_fd = connection.fileno()  # kept: a lost connection no longer tells its socket
            selector.register(socket_fd, selectors.EVENT_READ)
            try:
                self._on_change()  # whatever committed while nobody listened
                # Idle, the thread sleeps in the selector: no CPU until the server sends something.
                while selector.select() and not self._stopping.is_set():
                    for _ in connection.notifies(timeout=0):
                        self._on_change()
            finally:
                selector.unregister(socket_fd)
