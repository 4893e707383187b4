"""The tuning `taskproxy serve` applies to its process (process.py): startup's objects frozen out of
the garbage collector once the lifespan has started, and glibc's malloc arenas capped."""

from __future__ import annotations

import asyncio
import gc
import platform
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message

from taskproxy.localserver import serve_in_thread
from taskproxy.process import FreezeAfterStartup, limit_malloc_arenas


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process must not keep its objects out of the collector


def frozen_count_app(seen: dict[str, int], *, fail_startup: bool = False) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        seen["during_startup"] = gc.get_freeze_count()
        if fail_startup:
            raise RuntimeError("the database is away")
        yield

    async def frozen(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(gc.get_freeze_count()))

    return Starlette(routes=[Route("/frozen", frozen)], lifespan=lifespan)


@pytest.mark.usefixtures("unfrozen")
def test_objects_made_at_startup_are_frozen_once_startup_completes() -> None:
    seen: dict[str, int] = {}
    with serve_in_thread(FreezeAfterStartup(frozen_count_app(seen))) as url:
        answer = httpx.get(f"{url}/frozen", timeout=10)
    assert answer.status_code == 200
    assert seen["during_startup"] == 0  # nothing is frozen while the app is still starting
    assert int(answer.text) > 1000  # by the first request, what startup left is out of the collector's way


async def lifespan_startup(app: FreezeAfterStartup) -> list[Message]:
    """Drive the ASGI lifespan protocol's startup as a server does; the messages the app sent."""
    incoming = [{"type": "lifespan.startup"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else await asyncio.Event().wait()  # type: ignore[func-returns-value]

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.failed":
            raise RuntimeError(message["message"])

    with pytest.raises(RuntimeError):
        await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send), 10)
    return sent


@pytest.mark.usefixtures("unfrozen")
def test_a_failed_startup_is_reported_and_nothing_is_frozen() -> None:
    seen: dict[str, int] = {}
    sent = asyncio.run(lifespan_startup(FreezeAfterStartup(frozen_count_app(seen, fail_startup=True))))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "the database is away" in sent[0]["message"]
    assert seen["during_startup"] == 0
    assert gc.get_freeze_count() == 0


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_malloc_arenas_are_capped_on_glibc() -> None:
    assert limit_malloc_arenas() is True
