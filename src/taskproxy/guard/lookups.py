"""The database reads a request may wait for: a key, a work item or an item's spend that is not in
this process's memory, read by primary key (a millisecond when the database is well).

They run on a few threads of their own per kind, so a flood of made-up keys or ids cannot take the
threads the rest of the app needs, and a request waits for one at most `LOOKUP_WAIT_SECONDS`: a
database that has gone silent (a failover, a host gone; storage/db.py's TCP timeouts end such a
connection only after tens of seconds) costs a request a second, as a slow lease does, and then the
caller's answer for a database that does not answer (503, or this process's own count).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

LOOKUP_WAIT_SECONDS = 1.0
LOOKUPS_AT_ONCE = 4


class LookupTimeout(TimeoutError):
    """The database did not answer a lookup within `LOOKUP_WAIT_SECONDS`."""


class Lookups:
    """At most `at_once` lookups run at a time; the others wait their turn, within the same bound."""

    def __init__(self, name: str, at_once: int = LOOKUPS_AT_ONCE) -> None:
        self._threads = ThreadPoolExecutor(at_once, thread_name_prefix=f"taskproxy-{name}-lookup")

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a lookup thread. Past the bound: LookupTimeout. A lookup that had not
        started is dropped; one under way ends in its thread (within the TCP timeouts) and is discarded."""
        future = asyncio.get_running_loop().run_in_executor(self._threads, function, *args)
        try:
            return await asyncio.wait_for(future, LOOKUP_WAIT_SECONDS)
        except TimeoutError:
            raise LookupTimeout(f"the database did not answer within {LOOKUP_WAIT_SECONDS:g} s") from None

    def close(self) -> None:
        """Drop the lookups waiting for a thread (at shutdown); those under way end on their own."""
        self._threads.shutdown(wait=False, cancel_futures=True)
