"""Threads for the API's blocking database calls, apart from everything the proxy itself needs.

The model routes hand large bodies to anyio's default threads (40 of them) to join and decode, and the
key and item lookups, the leases, the change feed and the writer share the database engine's
connections (10). An API call that waits on a slow database holds a thread, and a connection, while it
waits: sixty reads of one key's own usage while a table they read was locked took every one of both,
and a 1.5 MiB prompt, an admin's call and a key made meanwhile all waited for the lock
(tests/test_bounded.py). So each kind of API call runs in a `Lane`: at most a few of its calls at a
time, in daemon threads of its own (threads.py: a process stopping during an outage does not wait
for them), the rest waiting their turn on the event loop, holding neither a thread nor a connection.
Together the lanes take at most six of the engine's ten connections (storage/db.py).

The self-service lane also lets one key have only `OWN_PER_KEY` request under way (fewer than the
lane's threads); the next is told 429 `rate_limited` at once, so one key polling its own usage, or
reloading the dashboard, cannot keep the others' reads waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from taskproxy.errors import RateLimited
from taskproxy.guard.per_key import PerKey
from taskproxy.threads import DaemonThreads

T = TypeVar("T")

API_AT_ONCE = 2  # the admin API, the dashboard's admin pages, report snapshots
OWN_AT_ONCE = 2  # any key's calls about itself (/api/me/*, its dashboard session and page)
WEBHOOKS_AT_ONCE = 2  # tracker deliveries
OWN_PER_KEY = 1  # below the lane's width: one key alone cannot take the whole lane


class Lane:
    """At most `at_once` blocking calls at a time, in threads named `taskproxy-{name}`; with `per_key`,
    at most that many requests of one key under way (`turn_of`)."""

    def __init__(self, name: str, at_once: int, per_key: int | None = None) -> None:
        self._threads = DaemonThreads(at_once, f"taskproxy-{name}")
        self._under_way = PerKey(per_key)

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` in one of the lane's threads. Cancelled while waiting its turn,
        it does not run; once under way, it ends in its thread and its result is dropped."""
        return await self._threads.run(partial(function, *args, **kwargs))

    @contextmanager
    def turn_of(self, key_id: str) -> Iterator[None]:
        """One of `key_id`'s requests under way; past `per_key` of them, RateLimited."""
        if self._under_way.take(key_id) is None:
            raise RateLimited(f"This key already has {self._under_way.limit} request(s) about itself under way; ask again once answered.", retry_after=1)
        try:
            yield
        finally:
            self._under_way.give_back(key_id)

    def close(self) -> None:
        self._threads.close()
