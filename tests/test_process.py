"""The tuning `taskproxy serve` applies to its process (process.py, memory.py): startup's objects frozen
out of the garbage collector once the lifespan has started, glibc's allocator tuned, and freed memory
handed back once requests were served and none is in progress."""

from __future__ import annotations

import asyncio
import gc
import platform
import sys
import threading
import time
import types
import weakref
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
from taskproxy import process
from taskproxy.process import ProcessTuning


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
    with serve_in_thread(ProcessTuning(frozen_count_app(seen))) as url:
        answer = httpx.get(f"{url}/frozen", timeout=10)
    assert answer.status_code == 200
    assert seen["during_startup"] == 0  # nothing is frozen while the app is still starting
    assert int(answer.text) > 1000  # by the first request, what startup left is out of the collector's way


async def lifespan_startup(app: ProcessTuning) -> list[Message]:
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
    sent = asyncio.run(lifespan_startup(ProcessTuning(frozen_count_app(seen, fail_startup=True))))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "the database is away" in sent[0]["message"]
    assert seen["during_startup"] == 0
    assert gc.get_freeze_count() == 0


FRAGMENTED_HEAP = """
import sys
from taskproxy.memory import release_freed_memory, tune_allocator

def resident() -> float:
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

if sys.argv[1] == "tuned":
    tune_allocator()
blocks, keep = [], []
for _ in range(2000):  # 100 KiB blocks, each followed by a small object that stays: the heap cannot shrink
    blocks.append(bytearray(100 * 1024))
    keep.append(bytearray(600))
full = resident()
del blocks
freed = resident()
release_freed_memory()
print(round(full - freed), round(full - resident()))
"""


def _freed(mode: str) -> tuple[int, int]:
    """MiB handed back to the system by freeing 200 MiB of 100 KiB blocks (then after malloc_trim)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP, mode], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the allocator's tuning is glibc's")
def test_large_blocks_go_back_to_the_system_when_freed_and_the_rest_when_trimmed() -> None:
    tuned_at_once, _ = _freed("tuned")
    default_at_once, default_trimmed = _freed("default")
    assert tuned_at_once > 150  # in mappings of their own: unmapped when freed
    assert default_at_once < 50  # stranded in the heap between the small objects ...
    assert default_trimmed > 150  # ... until malloc_trim hands the free pages back


class _Cyclic:
    def __init__(self) -> None:
        self.itself = self


def test_garbage_cycles_requests_left_are_collected_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle process may not run a full collection for a long time; what cycles hold stays resident
    until one runs, so the idle check runs it."""
    monkeypatch.setattr(process, "IDLE_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(process, "release_freed_memory", lambda: None)
    left: list[weakref.ref[_Cyclic]] = []
    entered, release = threading.Event(), threading.Event()

    async def cyclic(request: Request) -> PlainTextResponse:
        left.append(weakref.ref(_Cyclic()))
        return PlainTextResponse("done")

    async def hold(request: Request) -> PlainTextResponse:  # a request in progress: the process is not idle
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return PlainTextResponse("held")

    gc.disable()  # as if no automatic collection came
    try:
        with serve_in_thread(ProcessTuning(Starlette(routes=[Route("/cyclic", cyclic), Route("/hold", hold)]))) as url:
            holding = threading.Thread(target=httpx.get, args=(f"{url}/hold",), kwargs={"timeout": 10})
            holding.start()
            assert entered.wait(5)
            assert httpx.get(f"{url}/cyclic", timeout=10).status_code == 200
            time.sleep(0.3)  # six idle checks, each with a request still in progress
            assert left[0]() is not None  # the cycle outlives its request
            release.set()
            holding.join(10)
            time.sleep(0.3)
            assert left[0]() is None  # idle: collected
    finally:
        gc.enable()
        gc.unfreeze()


def test_freed_memory_is_handed_back_once_requests_were_served_and_none_is_running(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(process, "IDLE_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(process, "release_freed_memory", lambda: trims.append(1))
    gate = threading.Event()

    async def slow(request: Request) -> PlainTextResponse:
        while not gate.is_set():
            await asyncio.sleep(0.01)
        return PlainTextResponse("done")

    tuned = ProcessTuning(Starlette(routes=[Route("/slow", slow)]))
    try:
        with serve_in_thread(tuned) as url:
            time.sleep(0.3)
            assert trims == []  # nothing served yet: nothing to hand back
            answer: list[httpx.Response] = []
            client = threading.Thread(target=lambda: answer.append(httpx.get(f"{url}/slow", timeout=10)))
            client.start()
            time.sleep(0.3)
            assert trims == [] and tuned.active == 1  # a request in progress: not now
            gate.set()
            client.join(10)
            time.sleep(0.3)
            assert answer[0].status_code == 200 and trims == [1]  # served, and idle: once
            time.sleep(0.2)
            assert trims == [1]  # nothing new served since: not again
    finally:
        gc.unfreeze()


def test_a_started_app_holds_none_of_the_modules_only_reports_and_migrations_use(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A serving process's resident memory is mostly what it imports (docs/scale-runs.md): the ORM (5.6 MiB,
    which the tables do not need: they are Core), the report modules (computed in processes of their
    own), Jinja2 (the dashboard's first page) and alembic (a migration) stay out of it until used."""
    import subprocess
    import sys

    from serve_helpers import child_env

    from taskproxy.storage.db import make_engine, upgrade_schema

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    upgrade_schema(engine)  # as `taskproxy db upgrade` does, in a process of its own
    engine.dispose()
    code = """
import asyncio, sys
from taskproxy.app import create_app
from taskproxy.config import settings_from_mapping
settings = settings_from_mapping({"database_url": "sqlite:///%s"}, {})
app = create_app(settings)
async def main():
    async with app.router.lifespan_context(app):
        pass
asyncio.run(main())
unused = ("sqlalchemy.orm", "sqlmodel", "alembic", "jinja2", "taskproxy.reports.adoption", "taskproxy.reports.signals", "taskproxy.dashboard.data")
print(sorted(name for name in sys.modules if name in unused or name.startswith(tuple(u + "." for u in unused))))
""" % (tmp_path / "t.db")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_modules_imported_after_startup_are_frozen_at_the_next_idle_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm is imported beside startup, or at the first translated request, after startup's freeze:
    its ~370,000 objects stayed in the collector's walks, and each idle check's full collection
    stopped the event loop for ~0.8 s, every 5 s (found by a review). A module imported since (here
    one holding 50,000 objects) is frozen at the next idle check."""
    monkeypatch.setattr(process, "IDLE_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(process, "release_freed_memory", lambda: None)
    name = "taskproxy_test_late_module"
    gc.disable()  # as if no automatic collection came
    try:
        with serve_in_thread(ProcessTuning(frozen_count_app({}))) as url:
            time.sleep(0.2)
            frozen = int(httpx.get(f"{url}/frozen", timeout=10).text)
            garbage = weakref.ref(_Cyclic())  # a cycle a request left, unreachable when the module comes
            late = types.ModuleType(name)
            late.tables = [[] for _ in range(50_000)]  # type: ignore[attr-defined]
            sys.modules[name] = late
            time.sleep(0.3)
            assert int(httpx.get(f"{url}/frozen", timeout=10).text) >= frozen + 50_000
            assert garbage() is None  # collected before the freeze, not frozen with the module for good
    finally:
        gc.enable()
        sys.modules.pop(name, None)
        gc.unfreeze()
