"""A failover that leaves the proxy on a standby: the database answers reads and refuses every write
(read-only). Requests are answered and their usage waits in the spool; writes a client asked for get
a 503 it can retry, not a 500 that calls it a bug; a writable database gets everything."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import postgres_schema, read_only
from serve_helpers import fake_upstream, run_cli, running_server, write_config
from sqlalchemy import func, select
from starlette.requests import Request
from webhook_payloads import GITHUB_SECRET, github_headers, github_issue

from taskproxy.app import _database_error
from taskproxy.storage.db import make_engine
from taskproxy.storage.models import UsageEvent

pytestmark = [pytest.mark.serve, pytest.mark.postgres]


def test_on_a_read_only_database_requests_are_answered_and_spooled_and_writes_asked_for_get_503(tmp_path: Path) -> None:
    with postgres_schema() as writable_url, fake_upstream() as upstream:
        recording = {"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 0.05}
        trackers = {"github": {"secret": GITHUB_SECRET}}
        writable = write_config(tmp_path, upstream.url, database_url=writable_url, recording=recording, trackers=trackers)
        standby = write_config(tmp_path, upstream.url, name="standby.yaml", recording=recording, trackers=trackers,
                               database_url=read_only(writable_url))  # fmt: skip
        assert run_cli("db", "upgrade", config=writable).returncode == 0
        with running_server(writable, tmp_path / "before.log") as server:
            key = server.new_key()
        with running_server(standby, tmp_path / "standby.log") as server:
            client = server.openai(key)
            for _ in range(3):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Work-Item": "RO-1"})
            refused = server.http.post("/api/keys", json={"owner": "eli", "team": "payments"}, headers=server.admin_headers)
            body = json.dumps(github_issue("closed", 7)).encode()
            delivery = httpx.post(f"{server.url}/webhooks/github", content=body, headers=github_headers(body, "issues"))
        for answer in (refused, delivery):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "service_unavailable"
            assert "read-only" in answer.json()["error"]["message"]
        log = (tmp_path / "standby.log").read_text()
        assert "the database cannot serve it" in log  # a warning line says so ...
        assert "Traceback" not in log and "Exception in ASGI application" not in log  # ... not a bug's traceback, once per request
        engine = make_engine(writable_url)
        try:
            with running_server(writable, tmp_path / "after.log"):  # replays the standby's spool
                deadline, recorded = time.monotonic() + 10, 0
                while recorded < 3 and time.monotonic() < deadline:
                    with engine.connect() as connection:
                        recorded = connection.execute(select(func.count()).select_from(UsageEvent).where(UsageEvent.work_item == "RO-1")).scalar_one()
                    time.sleep(0.1)
            assert recorded == 3
        finally:
            engine.dispose()


def test_only_the_databases_own_state_is_a_503_a_bug_keeps_its_500(tmp_path: Path) -> None:
    """`unavailable` reads real errors of both databases: what a retry may cure gets a reason, what is
    the request's own or a bug (a missing table) gets None, and stays a 500 with its traceback."""
    import sqlite3

    from serve_helpers import closed_port
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    from taskproxy.storage.failures import unavailable

    def error_of(engine: Any, statement: str) -> DBAPIError:
        with pytest.raises(DBAPIError) as caught, engine.connect() as connection:
            connection.execute(text(statement))
        return caught.value

    lite = create_engine(f"sqlite:///{tmp_path / 'f.db'}", connect_args={"timeout": 0.1})
    assert unavailable(error_of(lite, "SELECT * FROM missing")) is None
    with lite.begin() as connection:
        connection.execute(text("CREATE TABLE t (x int)"))
    holder = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert "cannot be reached" in (unavailable(error_of(lite, "INSERT INTO t VALUES (1)")) or "")
    finally:
        holder.close()
        lite.dispose()
    gone = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test")
    assert "cannot be reached" in (unavailable(error_of(gone, "SELECT 1")) or "")
    with postgres_schema() as url:
        standby = make_engine(read_only(url))
        try:
            assert "read-only" in (unavailable(error_of(standby, "CREATE TABLE t (x int)")) or "")
            assert unavailable(error_of(standby, "SELECT * FROM missing")) is None
            # A query past its timeout: a 503 that says so, and no Retry-After (a retry meets the same timeout).
            timed_out = error_of(standby, "SET LOCAL statement_timeout = 1; SELECT pg_sleep(0.2)")
            answer = asyncio.run(_database_error(Request({"type": "http", "method": "GET", "path": "/api/reports/signals", "headers": []}), timed_out))
            assert answer.status_code == 503 and "retry-after" not in answer.headers
            assert "statement_timeout" in json.loads(answer.body)["error"]["message"]
        finally:
            standby.dispose()
