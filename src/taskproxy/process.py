"""Tuning of the server process, applied once by `taskproxy serve` (and by each of its worker
processes), never at import and never by `create_app`: tests and the demo build many apps in one
process, and these settings are process-wide.

Both were chosen by measurement (bench/, docs/performance.md):

- **Two malloc arenas instead of eight per core.** glibc gives each thread that contends for the
  heap an arena of its own. The proxy's threads (the event loop, the recording thread, the periodic
  reloads in worker threads) each left freed memory stranded in theirs: after 2 × 30,000 requests
  the process kept 3–14 MiB more resident with the default (three runs each). Instructions
  per request did not change (1.28 M against 1.29 M for a non-streaming request).
- **Startup's objects frozen out of the garbage collector.** Once the app has started, the modules,
  settings, encodings and caches it built live as long as the process. Left in the collector's
  oldest generation, each full collection walked all of them again: 85–185 ms with the event loop
  stopped (measured with gc.callbacks). `gc.freeze()` moves them to a permanent generation that
  collections skip; objects made afterwards are collected as before.
"""

from __future__ import annotations

import ctypes
import gc
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("taskproxy")

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas; call before the process starts threads. False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left as it is
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


class FreezeAfterStartup:
    """ASGI wrapper: once the wrapped app reports its lifespan startup complete, collect the garbage
    startup left and freeze what remains (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_and_freeze(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
                log.debug("%d objects made at startup frozen out of the garbage collector", gc.get_freeze_count())
            await send(message)

        await self.app(scope, receive, send_and_freeze)


def prepare_serving(app: ASGIApp) -> ASGIApp:
    """The app as `taskproxy serve` runs it, in a process tuned for serving."""
    limit_malloc_arenas()
    return FreezeAfterStartup(app)
