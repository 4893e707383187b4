"""Faults and abuse against a real `taskproxy serve`: a stream that never ends, headers no client
library would send, secrets kept out of logs, and what kill -9 can lose."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, start_server, write_config

pytestmark = pytest.mark.serve
PROVIDER_SECRET = "sk-provider-SECRET-do-not-log-0042"


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("faults")
    models = [
        {"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1", "api_key_env": "T_PROVIDER"},
        {"name": "trickle", "base_url": f"{upstream.url}/v1", "upstream_model": "fake-trickle", "max_stream_seconds": 1},
    ]
    config = write_config(folder, upstream.url, models=models)
    env = child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY, T_PROVIDER=PROVIDER_SECRET)
    with running_server(config, folder / "server.log", env=env, extra_args=("--access-log", "--log-level", "debug")) as running:
        yield running


def raw_request(server: ServerProcess, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and len(b"".join(chunks)) > 12:
                break
        return b"".join(chunks)


def test_a_stream_that_never_ends_is_cut_and_recorded(server: ServerProcess) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "FAULT-1"})
    started = time.monotonic()
    pieces = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in client.chat.completions.create(model="trickle", messages=[{"role": "user", "content": "go"}], stream=True):
            pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert time.monotonic() - started < 5 and pieces  # the bytes so far, then a clear error
    assert "max_stream_seconds" in str(ended.value)
    event = server.events("FAULT-1", 1)[0]
    assert (event["error"], event["usage_source"]) == ("upstream_timeout", "estimated") and event["completion_tokens"] > 0
    assert server.http.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Work-Item: PROJ-1\x01\r\nContent-Length: 2\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Work-Item: PROJ-1\rX-Evil: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Work-Item: " + b"A" * 200_000 + b"\r\nContent-Length: 2\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ],
    ids=["control-char", "bare-cr", "200k-header", "not-http", "absurd-length"],
)
def test_headers_no_client_library_would_send_get_4xx(server: ServerProcess, upstream: FakeUpstream, head: bytes) -> None:
    before = len(upstream.received)
    answer = raw_request(server, head, b"{}")
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert len(upstream.received) == before
    assert server.http.get("/healthz").status_code == 200


def test_secrets_never_reach_the_logs(server: ServerProcess) -> None:
    key = server.new_key()
    client = server.openai(key, default_headers={"X-Work-Item": "FAULT-2"})
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    wrong = "tp-" + "x" * 43
    httpx.post(f"{server.url}/v1/chat/completions", json={}, headers={"authorization": f"Bearer {wrong}"}, trust_env=False)
    httpx.post(f"{server.url}/v1/messages", json={}, headers={"x-api-key": key}, trust_env=False)
    server.events("FAULT-2", 1)
    log = server.log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in log  # the access log is on, and says what happened...
    for secret in (key, key[3:], wrong, PROVIDER_SECRET, ADMIN_KEY):
        assert secret not in log  # ...without any key in it


def test_kill_9_loses_at_most_the_last_batch_interval(upstream: FakeUpstream, tmp_path: Path) -> None:
    flush = 0.25
    config = write_config(tmp_path, upstream.url, recording={"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": flush})
    server = start_server(config, tmp_path / "server.log")
    try:
        client = server.openai(server.new_key(), default_headers={"X-Work-Item": "KILL-1"})

        def ask(_: int) -> float:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            return time.monotonic()

        with ThreadPoolExecutor(max_workers=8) as pool:
            early = list(pool.map(ask, range(40)))
        time.sleep(4 * flush)  # these have had time to be committed
        with ThreadPoolExecutor(max_workers=8) as pool:
            late = list(pool.map(ask, range(40)))
        os.kill(server.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        server.process.wait(10)
    finally:
        server.stop()
    with sqlite3.connect(tmp_path / "t.db") as db:
        recorded = db.execute("SELECT count(*) FROM usage_events WHERE work_item = 'KILL-1'").fetchone()[0]
    lost = len(early) + len(late) - recorded
    assert recorded >= len(early), "events answered well before the kill were lost"
    answered_last_interval = sum(1 for t in late if killed_at - t <= flush + 0.1)
    assert lost <= answered_last_interval + 8  # at most the last interval (and the requests in flight)
    print(f"\nkill -9 right after 40 answers: {lost} of {len(late)} lost (answered in the last {flush} s: {answered_last_interval})")


def test_kill_9_while_another_process_holds_sqlites_write_lock_loses_nothing_answered_before_the_write_wait(
        upstream: FakeUpstream, tmp_path: Path) -> None:  # fmt: skip
    """A backup or a `taskproxy db` command holds SQLite's write lock while the proxy answers; the proxy
    is then killed. What it answered more than the write wait (2 s) before is in its spool, and the
    next process writes it once the lock is free (before: the writer waited out the 30 s busy timeout
    with every answer in memory, and the kill lost them all)."""
    config = write_config(tmp_path, upstream.url, recording={"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 0.1})
    server = start_server(config, tmp_path / "server.log")
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    try:
        client = server.openai(server.new_key(), default_headers={"X-Work-Item": "LOCKED-1"})
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "before"}])
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as another process takes it
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda _: client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]), range(30)))
        time.sleep(5.0)  # well past the write wait: everything answered is on disk by now
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        server.stop()
    with running_server(config, tmp_path / "after.log") as after:  # it replays the spool the killed process left
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / "t.db") as db:
                recorded = db.execute("SELECT count(*) FROM usage_events WHERE work_item = 'LOCKED-1'").fetchone()[0]
            if recorded >= 31:
                break
            time.sleep(0.2)
        assert after.process.poll() is None
    assert recorded == 31, f"{31 - recorded} of 31 answered requests were lost"
