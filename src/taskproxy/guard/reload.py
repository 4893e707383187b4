"""The guard's views of the database (keys, work items, spend) are kept fresh on a timer, so the
request path never waits for the database. One loop serves them all; what each pass reads is what
changed since the last (the change feed, the spend counters), never the whole tables."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.guard.auth import KeyStore
from taskproxy.guard.items import ItemCache
from taskproxy.storage import changes
from taskproxy.storage.changes import ChangeFeed
from taskproxy.timeutil import utcnow

log = logging.getLogger("taskproxy.guard")


async def reload_forever(load: Callable[[], None], every: float, what: str) -> None:
    """Call `load` (blocking: in a worker thread) every `every` seconds until cancelled. A database
    that does not answer is logged, and the view already in memory keeps serving."""
    while True:
        await anyio.sleep(every)
        try:
            await anyio.to_thread.run_sync(load)
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
