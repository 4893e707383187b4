"""The guard's views of the database (keys, work items, spend) are kept fresh on a timer, so the
request path never waits for the database. One loop serves them all; what each pass reads is what
changed since the last (the change feed, the spend counters), never the whole tables. On PostgreSQL
the change feed's loop is also woken when a change is committed (storage/listen.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.guard.auth import KeyStore
from taskproxy.guard.items import ItemCache
from taskproxy.storage import changes
from taskproxy.storage.changes import ChangeFeed
from taskproxy.threads import DaemonThreads
from taskproxy.timeutil import utcnow

log = logging.getLogger("taskproxy.guard")
MIN_GAP_SECONDS = 0.05  # a woken reload waits this long, so the changes committed with it are read together


class Wakeup:
    """Ends a reload loop's wait early; `set` may be called from any thread (the change listener's).
    Made inside the running event loop."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def set(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the loop has closed (a listener that outlived its app's stop): nobody waits
            pass

    async def wait(self, seconds: float) -> None:
        """Until woken, or `seconds` at most."""
        with anyio.move_on_after(seconds):
            await self._event.wait()
        self._event.clear()


async def reload_forever(load: Callable[[], None], every: float, what: str, wakeup: Wakeup | None = None) -> None:
    """Call `load` (blocking: in a worker thread) every `every` seconds until cancelled, and soon after
    `wakeup` is set (at most every `MIN_GAP_SECONDS`: a burst of changes costs one read, not one
    each). A database that does not answer is logged, and the view already in memory keeps serving.
    `load` runs in a daemon thread of the loop's own: one still waiting on a silent database when the
    loop is cancelled does not hold the process's exit (threads.py)."""
    threads = DaemonThreads(1, f"taskproxy-reload-{what.replace(' ', '-')}")
    try:
        await _reload(threads, load, every, what, wakeup)
    finally:
        threads.close()


async def _reload(threads: DaemonThreads, load: Callable[[], None], every: float, what: str, wakeup: Wakeup | None) -> None:
    while True:
        if wakeup is None:
            await anyio.sleep(every)
        else:
            await wakeup.wait(every)
            await anyio.sleep(MIN_GAP_SECONDS)
        try:
            await threads.run(load)
        except SQLAlchemyError as exc:
            log.warning("could not reload %s: %s", what, exc.__class__.__name__)


def follow_changes(feed: ChangeFeed, keys: KeyStore, items: ItemCache) -> Callable[[], None]:
    """One pass over the change feed (blocking): the keys and items it names are re-read."""

    def follow() -> None:
        read = feed.read(utcnow())
        if read.everything:
            log.warning("the change feed was out of reach long enough to miss changes: keys and items are read afresh")
            keys.forget_all()
            items.forget_all()
        keys.refresh(read.of(changes.KEY))
        items.refresh(read.of(changes.ITEM))

    return follow
