"""The server process: how `taskproxy serve` runs the app, and the process-wide tuning it applies
once (in each of its worker processes too), never at import and never by `create_app`: tests and the
demo build many apps in one process, and these settings are process-wide.

`serve` runs uvicorn with taskproxy's bounded connections (connections.py), the graceful shutdown
the settings give, and the open-file limit raised to its hard limit.

Both were chosen by measurement (bench/, docs/performance.md):

- **Two malloc arenas instead of eight per core.** glibc gives each thread that contends for the
  heap an arena of its own. The proxy's threads (the event loop, the recording thread, the periodic
  reloads in worker threads) each left freed memory stranded in theirs: after 2 × 30,000 requests
  the process kept 3–14 MiB more resident with the default (three runs each). Instructions
  per request did not change (1.28 M against 1.29 M for a non-streaming request).
- **Blocks of 64 KiB and more in mappings of their own, and freed memory handed back when idle.**
  After 500 streams of 1 MiB in flight at once, the heap kept tens of MiB it no longer used
  (bench/streams_memory.py); `malloc_trim` runs when requests were served and none is in progress,
  after a full garbage collection: an idle process runs none on its own, and what reference cycles
  the requests left stays resident until one does.
- **The server's loop looks at its exit flag once a second, not ten times.** uvicorn's main loop wakes
  every 100 ms to see whether a signal asked it to stop (and, every tenth time, to renew the `Date`
  header): on an idle replica those wake-ups were the event loop's only work, and a third to a half
  of the process's CPU while idle (docs/scale-runs.md, "Idle CPU"). `QuietServer` renews the header
  on every one of its wake-ups, once a second, and a stop signal wakes it at once. (`--workers N`
  runs uvicorn's own server in each worker.)
- **Startup's objects frozen out of the garbage collector.** Once the app has started, the modules,
  settings, encodings and caches it built live as long as the process. Left in the collector's
  oldest generation, each full collection walked all of them again: 85–185 ms with the event loop
  stopped (measured with gc.callbacks). `gc.freeze()` moves them to a permanent generation that
  collections skip; objects made afterwards are collected as before. A module imported later
  (litellm, imported beside startup or at the first translated request) is frozen at the next idle
  check.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

from functools import partial
from types import FrameType

import uvicorn

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskproxy.memory import release_freed_memory, tune_allocator
from taskproxy.connections import BoundedHttpProtocol, BoundedWebSocketProtocol, ConnectionLimits, default_max_connections, raise_open_file_limit
from taskproxy.settings import Settings

log = logging.getLogger("taskproxy")

IDLE_CHECK_SECONDS = 5.0
TICK_SECONDS = 1.0  # how often the server's main loop wakes when nothing asks it to stop


class ProcessTuning:
    """ASGI wrapper: once the wrapped app reports its lifespan startup complete, collect the garbage
    startup left and freeze what remains; afterwards, whenever requests were served since the last
    look and none is in progress, collect the garbage and hand freed memory back to the system (see
    the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.active = 0
        self.served = 0
        self._trimmer: asyncio.Task[None] | None = None
        self._modules_frozen = 0  # how many modules were imported when the last freeze ran

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._on_lifespan(send))
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self.served += 1

    def _on_lifespan(self, send: Send) -> Send:
        async def send_and_tune(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
                self._modules_frozen = len(sys.modules)
                log.debug("%d objects made at startup frozen out of the garbage collector", gc.get_freeze_count())
                self._trimmer = asyncio.get_running_loop().create_task(self._trim_when_idle())
            elif message["type"].startswith("lifespan.shutdown") and self._trimmer is not None:
                self._trimmer.cancel()
            await send(message)

        return send_and_tune

    async def _trim_when_idle(self) -> None:
        trimmed_at = 0
        while True:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            if len(sys.modules) != self._modules_frozen and self.active == 0:
                # A module imported since (litellm beside startup or at the first translated request, the
                # dashboard's Jinja2) lives as long as the process, as startup's did: out of the walks too.
                # litellm left ~370,000 objects that each full collection below walked, ~0.8 s of the loop.
                # Collected first, and with no request in progress, so that no garbage, nor a request's
                # objects, is frozen with it: this one collection walks them once more.
                gc.collect()
                gc.freeze()
                self._modules_frozen = len(sys.modules)
            if self.served != trimmed_at and self.active == 0:
                trimmed_at = self.served
                gc.collect()  # cyclic garbage the requests left, which an idle process may not collect for long
                await asyncio.to_thread(release_freed_memory)


class QuietServer(uvicorn.Server):
    """uvicorn's server, its main loop woken once a second or by a stop signal (module docstring)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stop_asked: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop, self._stop_asked = asyncio.get_running_loop(), asyncio.Event()
        ticks = 0
        should_exit = await self.on_tick(ticks)
        while not should_exit:
            try:
                await asyncio.wait_for(self._stop_asked.wait(), TICK_SECONDS)
            except TimeoutError:
                pass
            ticks = (ticks + 10) % 864_000  # uvicorn renews the Date header on every tenth of its ticks: on each of these
            should_exit = await self.on_tick(ticks)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._stop_asked is not None:
            self._loop.call_soon_threadsafe(self._stop_asked.set)


def prepare_serving(app: ASGIApp) -> ASGIApp:
    """The app as `taskproxy serve` runs it, in a process tuned for serving."""
    tune_allocator()
    return ProcessTuning(app)


def serving_app(settings: Settings) -> ASGIApp:
    """The app factory uvicorn calls in the serving process (in each worker with `--workers N`: the
    settings travel to them with uvicorn's config, so every worker serves the same configuration)."""
    from taskproxy.app import create_app  # the routes and their dependencies load in the serving process only

    return prepare_serving(create_app(settings))


def serve(settings: Settings, *, host: str, port: int, workers: int, log_level: str, access_log: bool) -> None:
    """Run uvicorn on the app `settings` describe, in `workers` processes, until stopped."""
    from uvicorn.supervisors import Multiprocess

    server = settings.server
    raise_open_file_limit()
    config = uvicorn.Config(
        partial(serving_app, settings), host=host, port=port, workers=workers, factory=True, log_level=log_level, access_log=access_log,
        http=BoundedHttpProtocol, ws=BoundedWebSocketProtocol, ws_max_size=settings.limits.max_body_bytes,  # the Responses WebSocket (Codex)
        ws_per_message_deflate=False,  # connections.py: inflating costs the event loop, and 1,000 bytes inflate to 1 MB
        timeout_keep_alive=server.keep_alive_seconds,  # type: ignore[arg-type]
        timeout_graceful_shutdown=server.shutdown_grace_seconds,  # type: ignore[arg-type]
    )  # fmt: skip
    config.connection_limits = ConnectionLimits(  # type: ignore[attr-defined]  (carried to worker processes with the config)
        header_timeout=server.header_timeout_seconds, body_timeout=server.body_timeout_seconds,
        max_connections=server.max_connections or default_max_connections(), send_timeout=server.send_timeout_seconds,
        max_header_bytes=settings.limits.max_header_bytes,
    )  # fmt: skip
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        QuietServer(config).run()
