"""Reports over a period run in a process of their own (reports/runner.py), through a real `taskproxy
serve` on PostgreSQL: the report's process is a child of the fork server, a client that hangs up
stops it, and a report whose process is killed answers 503 in the route's shape while the proxy goes
on serving. The report is held in its first query by a lock on the usage tables."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from serve_helpers import ADMIN_KEY, FakeUpstream, running_server, write_config

pytestmark = pytest.mark.postgres

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _report_processes(server_pid: int) -> list[int]:
    """The processes the fork server (the serve process's child) has forked: the reports running."""
    return [grandchild for child in _children(server_pid) for grandchild in _children(child)]


def _wait_for(condition, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _rollup_locked(database_url: str) -> Iterator[None]:
    """Reads of usage, raw or rolled up, wait until the block ends: a report stays held in its first query."""
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection, connection.begin():
            connection.execute(text("LOCK TABLE usage_events, usage_daily, usage_hourly, usage_key_daily, usage_team_daily IN ACCESS EXCLUSIVE MODE"))
            yield
    finally:
        engine.dispose()


@pytest.fixture
def server(tmp_path: Path, upstream: FakeUpstream, postgres_url: str):  # type: ignore[no-untyped-def]
    config = write_config(tmp_path, upstream.url, database_url=postgres_url)
    with running_server(config, tmp_path / "serve.log") as running:
        yield running


def test_a_report_whose_process_is_killed_answers_503_and_the_next_one_works(server, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    answers: list[httpx.Response] = []
    with _rollup_locked(postgres_url):
        asking = threading.Thread(target=lambda: answers.append(server.http.get("/api/reports/adoption", headers=ADMIN, timeout=30)))
        asking.start()
        [report] = _wait_for(lambda: _report_processes(server.process.pid), "the report's process")
        time.sleep(1)
        assert _report_processes(server.process.pid) == [report] and not answers, "the report was not held by the lock"
        os.kill(report, signal.SIGKILL)
        asking.join(timeout=20)
    assert answers, "the request did not end when its report's process was killed"
    assert answers[0].status_code == 503, answers[0].text
    error = answers[0].json()["error"]
    assert error["code"] == "service_unavailable" and "SIGKILL" in error["message"], error

    again = server.http.get("/api/reports/adoption", headers=ADMIN, timeout=30)  # a new process for the next report
    assert again.status_code == 200 and again.json()["overall"]["completed_items"] == 0, again.text
    assert server.http.get("/healthz").status_code == 200


def test_a_client_that_hangs_up_stops_its_report(server, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    with _rollup_locked(postgres_url):  # the report cannot finish on its own while this lasts
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(f"GET /api/reports/signals HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n".encode())
        [report] = _wait_for(lambda: _report_processes(server.process.pid), "the report's process")
        time.sleep(1)
        assert _report_processes(server.process.pid) == [report], "the report was not held by the lock"
        client.close()
        _wait_for(lambda: report not in _report_processes(server.process.pid), "the report's process to stop", timeout=10)
    assert server.http.get("/api/reports/signals", headers=ADMIN, timeout=30).status_code == 200
