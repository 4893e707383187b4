"""Threads for work that waits on the database, which a process must be able to leave behind.

A database that has gone silent (a failover, a host powered off) holds a query until the
connection's TCP timeouts end it (storage/db.py: about half a minute), or, behind PgBouncer, until
PgBouncer's own `query_timeout`. The callers already stop waiting long before (a lookup after a
second, a write after two). But `concurrent.futures.ThreadPoolExecutor` and anyio's worker threads
are not daemons: the interpreter joins them at exit, so a process stopped with Ctrl-C during an
outage waited out every such query before it exited. These threads are daemons: what runs in them
when the process exits is abandoned (the writer has spooled what it could not write; a write that
commits late is skipped on replay, by its ids).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonThreads:
    """A pool of at most `size` daemon threads, started as they are needed, for blocking calls."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run `function(*args)` in one of the threads; RuntimeError once closed."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} threads are closed")
            self._calls.put((future, function, args))
            if self._idle > 0:
                self._idle -= 1
            elif self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._threads}", daemon=True).start()
        return future

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in one of the threads, awaited. Cancelled before it started, it does not run;
        once under way, it ends in its thread and its result is dropped."""
        return await asyncio.wrap_future(self.submit(function, *args))

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function, args = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as exc:  # handed to whoever waits for it
                    future.set_exception(exc)
            del call, future, function, args  # nothing of the last call is held while idle
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        """Drop the calls not yet started (they are cancelled) and let the threads end; calls under way end on their own."""
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[0].cancel()
        for _ in range(threads):
            self._calls.put(None)


async def finish_within(seconds: float, function: Callable[..., Any], *args: Any) -> bool:
    """Run `function(*args)` (blocking) in a daemon thread of its own and wait for it at most `seconds`:
    False if it was still running then (it is left to end on its own). For shutdown steps that talk
    to a database that may not answer; their errors are raised."""
    threads = DaemonThreads(1, f"taskproxy-{getattr(function, '__name__', 'step')}")
    try:
        await asyncio.wait_for(threads.run(function, *args), seconds)
    except TimeoutError:
        return False
    finally:
        threads.close()
    return True
