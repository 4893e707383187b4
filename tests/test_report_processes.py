"""Reports over a period run in a process of their own (reports/runner.py), through a real `taskproxy
serve` on PostgreSQL: the report's process is a child of the fork server, a client that hangs up
stops it, and a report whose process is killed answers 503 in the route's shape while the proxy goes
on serving. The report is held in its first query by a lock on the usage tables."""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from conftest import Proxy
from serve_helpers import ADMIN_KEY, FakeUpstream, running_server, write_config
from taskproxy.errors import ProviderError
from taskproxy.reports.runner import ReportRunner
from taskproxy.storage.db import ReportSession, make_engine, one_snapshot
from taskproxy.storage.failures import unavailable

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


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_for(condition, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class _Lock:
    def __init__(self, engine: Engine, holder: int) -> None:
        self._engine, self._holder = engine, holder

    def waiting(self) -> list[int]:
        """The database sessions whose queries wait for the lock: a report's, while it is held."""
        with self._engine.connect() as connection:
            query = text("SELECT pid FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))")
            return list(connection.execute(query, {"holder": self._holder}).scalars())


@contextmanager
def _rollup_locked(database_url: str) -> Iterator[_Lock]:
    """Reads of usage, raw or rolled up, wait until the block ends: a report stays held in its first query."""
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection, connection.begin():
            connection.execute(text("LOCK TABLE usage_events, usage_daily, usage_hourly, usage_key_daily, usage_team_daily, usage_item_totals IN ACCESS EXCLUSIVE MODE"))
            yield _Lock(engine, connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def server(tmp_path: Path, upstream: FakeUpstream, postgres_url: str):  # type: ignore[no-untyped-def]
    config = write_config(tmp_path, upstream.url, database_url=postgres_url)
    with running_server(config, tmp_path / "serve.log") as running:
        yield running


@pytest.mark.postgres
def test_a_report_whose_process_is_killed_answers_503_and_the_next_one_works(server, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    answers: list[httpx.Response] = []
    with _rollup_locked(postgres_url) as lock:
        asking = threading.Thread(target=lambda: answers.append(server.http.get("/api/reports/adoption", headers=ADMIN, timeout=30)))
        asking.start()
        [report] = _wait_for(lambda: _report_processes(server.process.pid), "the report's process")
        [query] = _wait_for(lock.waiting, "the report's query to wait for the lock")
        time.sleep(1)
        assert _report_processes(server.process.pid) == [report] and not answers, "the report was not held by the lock"
        os.kill(report, signal.SIGKILL)  # as the OOM killer does: the process cannot cancel its query
        asking.join(timeout=20)
        # The server sees the report's process gone and ends its query (the lock is still held).
        _wait_for(lambda: query not in lock.waiting(), "the killed report's query to end", timeout=5)
    assert answers, "the request did not end when its report's process was killed"
    assert answers[0].status_code == 503, answers[0].text
    error = answers[0].json()["error"]
    assert error["code"] == "service_unavailable" and "SIGKILL" in error["message"], error

    again = server.http.get("/api/reports/adoption", headers=ADMIN, timeout=30)  # a new process for the next report
    assert again.status_code == 200 and again.json()["overall"]["completed_items"] == 0, again.text
    assert server.http.get("/healthz").status_code == 200


@pytest.mark.postgres
def test_a_client_that_hangs_up_stops_its_report_and_its_query(server, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    with _rollup_locked(postgres_url) as lock:  # the report cannot finish on its own while this lasts
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(f"GET /api/reports/signals HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n".encode())
        [report] = _wait_for(lambda: _report_processes(server.process.pid), "the report's process")
        [query] = _wait_for(lock.waiting, "the report's query to wait for the lock")
        time.sleep(0.5)
        assert _report_processes(server.process.pid) == [report], "the report was not held by the lock"
        client.close()
        _wait_for(lambda: report not in _report_processes(server.process.pid), "the report's process to stop", timeout=10)
        # Its query is not left running in the database, outside the count of reports at once.
        _wait_for(lambda: query not in lock.waiting(), "the report's query to be cancelled", timeout=5)
    assert server.http.get("/api/reports/signals", headers=ADMIN, timeout=30).status_code == 200


@pytest.mark.postgres
def test_a_report_cut_by_the_servers_shutdown_answers_503_and_its_process_stops(tmp_path: Path, upstream: FakeUpstream,
                                                                                postgres_url: str) -> None:  # fmt: skip
    config = write_config(tmp_path, upstream.url, database_url=postgres_url, server={"shutdown_grace_seconds": 1})
    with running_server(config, tmp_path / "serve.log") as server, _rollup_locked(postgres_url) as lock:
        answers: list[httpx.Response] = []
        asking = threading.Thread(target=lambda: answers.append(server.http.get("/api/reports/adoption", headers=ADMIN, timeout=30)))
        asking.start()
        [report] = _wait_for(lambda: _report_processes(server.process.pid), "the report's process")
        _wait_for(lock.waiting, "the report's query to wait for the lock")
        server.sigterm()
        asking.join(timeout=20)
        assert server.process.wait(20) is not None
        _wait_for(lambda: _ended(report), "the report's process to stop", timeout=10)
        _wait_for(lambda: not lock.waiting(), "the report's query to be cancelled", timeout=5)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].json()["error"]["code"] == "service_unavailable"


def _provider_refuses(engine: Engine) -> None:
    raise ProviderError("The provider refused.", status=418)  # a keyword-only argument, which pickling alone loses


def _table_missing(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT * FROM no_such_table"))


class _NeedsItsKeyword(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


def _own_error(engine: Engine) -> None:
    raise _NeedsItsKeyword("something of its own", code=7)


@pytest.mark.anyio
async def test_a_reports_error_reaches_the_serving_process_whole_with_the_childs_traceback(tmp_path: Path) -> None:
    runner = ReportRunner(make_engine(f"sqlite:///{tmp_path / 'reports.db'}"))
    with pytest.raises(ProviderError) as refused:
        await runner.run(_provider_refuses)
    assert refused.value.status == 418 and refused.value.message == "The provider refused."
    with pytest.raises(OperationalError) as missing:
        await runner.run(_table_missing)
    notes = "\n".join(getattr(missing.value, "__notes__", []))
    assert "in the report's process" in notes and "_table_missing" in notes, notes
    with pytest.raises(RuntimeError, match="_NeedsItsKeyword: something of its own"):  # not a TypeError from unpickling it
        await runner.run(_own_error)


def _long_sqlite_query(engine: Engine, pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    with engine.connect() as connection:  # about a minute of SQLite's own work, no Python in between
        connection.execute(text("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 300000000) SELECT count(*) FROM n"))


@pytest.mark.anyio
async def test_a_report_on_sqlite_stops_at_once_when_its_client_leaves(tmp_path: Path) -> None:
    runner = ReportRunner(make_engine(f"sqlite:///{tmp_path / 'reports.db'}"))
    pid_file = tmp_path / "report.pid"
    with anyio.move_on_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: runner.run(_long_sqlite_query, pid_file=str(pid_file)))
            while not pid_file.exists() or not pid_file.read_text():
                await anyio.sleep(0.05)
            await anyio.sleep(0.5)  # in its query
            group.cancel_scope.cancel()  # as when the client hangs up
    report = int(pid_file.read_text())
    _wait_for(lambda: _ended(report), "the report's process to stop", timeout=2)  # not when SQLite's statement ends, a minute later


@pytest.mark.anyio
async def test_where_no_report_process_can_start_reports_run_in_a_thread_until_one_can(proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
                                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    def no_fork_server(*args: object) -> None:
        raise PermissionError("no fork here")

    start = ReportRunner._start
    monkeypatch.setattr(ReportRunner, "_start", no_fork_server)
    await proxy.openai(await proxy.new_key()).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Work-Item": "PROJ-1"}
    )
    await proxy.item("PROJ-1", requests=1)
    for _ in range(2):
        report = await proxy.get("/api/reports/adoption")
        assert report["overall"]["completed_items"] == 0 and report["teams"][0]["team"] == "payments"
    warnings = [r.getMessage() for r in caplog.records if "worker thread" in r.getMessage()]
    assert len(warnings) == 1 and "no fork here" in warnings[0], warnings

    started: list[int] = []  # the cause has passed (a full temporary directory emptied, say): the next report tries again
    monkeypatch.setattr(ReportRunner, "_start", lambda self, *args: started.append(1) or start(self, *args))
    assert (await proxy.get("/api/reports/adoption"))["overall"]["completed_items"] == 0
    assert started and any("in a process of their own again" in r.getMessage() for r in caplog.records)


def _sleeping_query(engine: Engine, pid_file: str) -> None:
    def stop_slowly(*_: object) -> None:  # a process whose query takes a second to cancel: close() must wait for it
        time.sleep(1.0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_slowly)
    Path(pid_file).write_text(str(os.getpid()))
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_sleep(60)"))


@pytest.mark.postgres
@pytest.mark.anyio
async def test_closing_the_runner_waits_for_the_reports_it_stops(tmp_path: Path, postgres_url: str) -> None:
    """At shutdown the keeper lets go of its snapshots' claims after the runner is closed: a report's
    process must have ended by then, or a claim it makes meanwhile is held by nobody until it runs out."""
    engine = make_engine(postgres_url)
    runner = ReportRunner(engine)
    pid_file = tmp_path / "report.pid"
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: runner.run(_sleeping_query, pid_file=str(pid_file)))
        while not pid_file.exists() or not pid_file.read_text():
            await anyio.sleep(0.05)
        await anyio.sleep(0.3)  # in its query
        group.cancel_scope.cancel()  # the server stopping cancels the keeper's task first
    report = int(pid_file.read_text())
    await anyio.to_thread.run_sync(runner.close)
    assert _ended(report), "close() returned while the report's process was still running"
    engine.dispose()


def _work_mem_seen(engine: Engine) -> tuple[str, str, str]:
    """work_mem in two of the report's transactions, and on the same connection outside them."""
    with engine.connect() as connection:
        first = connection.execute(text("SHOW work_mem")).scalar_one()
        connection.commit()
        second = connection.execute(text("SHOW work_mem")).scalar_one()
        connection.rollback()
        raw = connection.connection.dbapi_connection
        with raw.cursor() as cursor:  # no transaction of SQLAlchemy's: the server's own setting shows
            cursor.execute("SHOW work_mem")
            outside = cursor.fetchone()[0]
        raw.rollback()
    return first, second, outside


@pytest.mark.postgres
@pytest.mark.anyio
async def test_a_reports_queries_get_the_configured_work_mem_and_only_inside_their_transactions(postgres_url: str) -> None:
    """`reports.work_mem_mb`: at PostgreSQL's default 4 MB the period reports' groupings spill to disk.
    It is set for the report's transactions only (SET LOCAL), so that behind a pooler in transaction
    mode no other client's transaction inherits it, and the serving engine never has it."""
    serving = make_engine(postgres_url)
    with serving.connect() as connection:
        server_default = connection.execute(text("SHOW work_mem")).scalar_one()
    assert server_default != "96MB"
    runner = ReportRunner(serving, session=ReportSession(work_mem_mb=96))
    assert await runner.run(_work_mem_seen) == ("96MB", "96MB", server_default)
    assert await ReportRunner(serving).run(_work_mem_seen) == (server_default, server_default, server_default)
    with serving.connect() as connection:  # the serving engine's are untouched
        assert connection.execute(text("SHOW work_mem")).scalar_one() == server_default
    runner.close()
    serving.dispose()


def _collector_enabled(engine: Engine) -> bool:
    return gc.isenabled()


@pytest.mark.anyio
async def test_a_report_is_built_with_the_cyclic_collector_paused_in_its_process_only(tmp_path: Path) -> None:
    """A report's process builds it without the cyclic collector's passes over its millions of objects
    (memory.collector_paused); the serving process keeps its collector."""
    runner = ReportRunner(make_engine(f"sqlite:///{tmp_path / 'reports.db'}"))
    try:
        assert await runner.run(_collector_enabled) is False
        assert gc.isenabled()
    finally:
        await anyio.to_thread.run_sync(runner.close)


def _sleeping(engine: Engine, pid_folder: str) -> None:
    (Path(pid_folder) / str(os.getpid())).touch()
    time.sleep(30)


@pytest.mark.anyio
async def test_reports_whose_clients_leave_while_their_process_starts_leave_no_process_behind(tmp_path: Path) -> None:
    """A client leaving while its report's process was being started: the process went on, counted by
    nothing and stopped by nothing (10 abandoned adoption reports left 3 computing; 20 signals, 8)."""
    import asyncio
    import random

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    runner = ReportRunner(engine, at_once=4)
    pids = tmp_path / "pids"
    pids.mkdir()
    await runner.run(_touch, pid_folder=str(pids))  # the fork server up: starts take milliseconds from here
    rng = random.Random(7)
    for _ in range(30):
        task = asyncio.ensure_future(runner.run(_sleeping, pid_folder=str(pids)))
        await asyncio.sleep(rng.uniform(0, 0.02))  # now in the limiter, now starting the process, now waiting for its answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await anyio.sleep(8)  # a report process left behind has imported its module and begun by then
    started = [int(p.name) for p in pids.iterdir() if p.name.isdigit()]
    left = [pid for pid in started if not _ended(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(runner.close)
    engine.dispose()
    assert not left, f"{len(left)} report processes still running after their clients left"


def _touch(engine: Engine, pid_folder: str) -> None:
    (Path(pid_folder) / "ready").touch()


def _application_name(engine: Engine) -> str:
    with engine.connect() as connection:
        return str(connection.execute(text("SHOW application_name")).scalar_one())


def _slow_report(engine: Engine) -> str:
    """A report's shape: a long query, then arithmetic with its snapshot open, then another query."""
    with one_snapshot(engine) as connection:
        connection.execute(text("SELECT pg_sleep(0.6)"))
        time.sleep(0.5)
        return str(connection.execute(text("SHOW statement_timeout")).scalar_one())


@pytest.mark.postgres
@pytest.mark.anyio
async def test_a_report_outlives_the_servers_query_and_idle_timeouts_and_keeps_its_own(postgres_url: str) -> None:
    """A DBA's `statement_timeout` or `idle_in_transaction_session_timeout` (or a pooler's advice) ended
    every signals report at an organisation's size: a 500, every time. A report's transactions set their
    own limit (`reports.statement_timeout_seconds`, none by default); the serving engine keeps the server's."""
    guarded = f"{postgres_url}%20-cstatement_timeout%3D300%20-cidle_in_transaction_session_timeout%3D200"
    serving = make_engine(guarded)
    with pytest.raises(OperationalError), serving.connect() as connection:  # the server's guard, as the serving engine meets it
        connection.execute(text("SELECT pg_sleep(0.6)"))
    runner = ReportRunner(serving)
    assert await runner.run(_slow_report) == "0"
    with serving.connect() as connection:  # and a DBA tells them apart in pg_stat_activity
        assert connection.execute(text("SHOW application_name")).scalar_one().startswith("taskproxy-proxy ")
    assert (await runner.run(_application_name)).startswith("taskproxy-report ")
    limited = ReportRunner(serving, session=ReportSession(statement_timeout_seconds=0.4))
    with pytest.raises(OperationalError) as cancelled:
        await limited.run(_slow_report)
    assert "ran past a statement_timeout" in (unavailable(cancelled.value) or "")  # what the client is told, not a 500
    runner.close()
    limited.close()
    serving.dispose()
