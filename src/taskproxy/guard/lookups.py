"""The database reads a request may wait for: a key, a work item or an item's spend that is not in
this process's memory, read by primary key (a millisecond when the database is well).

They run on a few threads of their own per kind, so a flood of made-up keys or ids cannot take the
threads the rest of the app needs, and a request waits for one at most `LOOKUP_WAIT_SECONDS`: a
database that has gone silent (a failover, a host gone; storage/db.py's TCP timeouts end such a
connection only after tens of seconds) costs a request a second, as a slow lease does, and then the
caller's answer for a database that does not answer (503, or this process's own count). While
every thread of a kind is taken by a lookup that outlived its wait, the next fails at once: the
database has gone silent, and a request would only wait its second to be told so.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from taskproxy.threads import DaemonThreads

T = TypeVar("T")

LOOKUP_WAIT_SECONDS = 1.0
LOOKUPS_AT_ONCE = 4


class LookupTimeout(TimeoutError):
    """The database did not answer a lookup within `LOOKUP_WAIT_SECONDS`."""


class Lookups:
    """At most `at_once` lookups run at a time; the others wait their turn, within the same bound."""

    def __init__(self, name: str, at_once: int = LOOKUPS_AT_ONCE) -> None:
        self._threads = DaemonThreads(at_once, f"taskproxy-{name}-lookup")  # not joined at exit (threads.py)
        self._at_once = at_once
        self._lock = threading.Lock()
        self._overdue = 0  # lookups still running after their caller stopped waiting

    def _done_late(self, _call: object) -> None:
        with self._lock:
            self._overdue -= 1

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a lookup thread. Past the bound: LookupTimeout. A lookup that had not
        started is dropped; one under way ends in its thread (within the TCP timeouts) and is discarded."""
        with self._lock:
            if self._overdue >= self._at_once:
                raise LookupTimeout("the database has not answered the last lookups")
        try:
            call = self._threads.submit(function, *args)
        except RuntimeError:  # closed: the process is stopping, and a request still arriving is told so as for a silent database
            raise LookupTimeout("this process is stopping") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(call), LOOKUP_WAIT_SECONDS)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.cancelled() and task is not None and not task.cancelling():  # dropped by close(), not this request cancelled
                raise LookupTimeout("this process is stopping") from None
            raise
        except TimeoutError:
            if not call.cancel():  # under way (not just queued): counted until it ends
                with self._lock:
                    self._overdue += 1
                call.add_done_callback(self._done_late)
            raise LookupTimeout(f"the database did not answer within {LOOKUP_WAIT_SECONDS:g} s") from None

    def close(self) -> None:
        """Drop the lookups waiting for a thread (at shutdown); those under way end on their own."""
        self._threads.close()
