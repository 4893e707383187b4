"""The guard's views of the database (keys, work items, spend) are read again on a timer, so the
request path never waits for the database. One loop serves them all."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from sqlalchemy.exc import SQLAlchemyError

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
