"""`/readyz`'s database ping (readiness.py): probes share one ping, and one stuck on a dead connection
does not keep the process unready once the database answers again."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from taskproxy import readiness
from taskproxy.readiness import Readiness

pytestmark = pytest.mark.anyio


async def test_probes_share_one_ping_and_a_stuck_one_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()
    pings: list[int] = []

    def ping(engine: Any) -> None:
        pings.append(1)
        if len(pings) == 1:  # the first, on a connection the database dropped: stuck until its TCP timeout
            released.wait(10)

    monkeypatch.setattr(readiness, "ping", ping)
    ready = Readiness(engine=None)  # type: ignore[arg-type]
    try:
        with pytest.raises(TimeoutError):
            await asyncio.gather(*(ready.check(0.3) for _ in range(20)))
        assert len(pings) == 1  # twenty probes, one ping
        await ready.check(0.3)  # the stuck one is passed over: another ping, on another connection, answers
        assert len(pings) == 2
        for _ in range(10):  # and serves the probes of the next second
            await ready.check(0.3)
        assert len(pings) == 2
    finally:
        released.set()
        ready.close()


async def test_no_more_than_two_pings_at_once_however_long_they_are_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()
    started: list[int] = []

    def ping(engine: Any) -> None:
        started.append(1)
        released.wait(10)

    monkeypatch.setattr(readiness, "ping", ping)
    ready = Readiness(engine=None)  # type: ignore[arg-type]
    try:
        for _ in range(5):
            with pytest.raises(TimeoutError):
                await ready.check(0.1)
        assert len(started) == 2
    finally:
        released.set()
        ready.close()
