"""A real `taskproxy serve` process on 127.0.0.1, driven by the official openai SDK, raw HTTP and
raw sockets, in front of the fake provider served from this test process (DESIGN §2-§6, §10)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from refused_requests import REFUSED, Refused
from serve_helpers import (
    FakeUpstream,
    ServerProcess,
    assert_openai_error,
    child_env,
    quoted,
    running_server,
    wait_until,
    write_config,
)
from taskproxy.fake_provider import prompt_tokens_of
from taskproxy.storage.db import current_revision, head_revision, make_engine

pytestmark = pytest.mark.serve

ASK = [{"role": "user", "content": "Add retries with jitter to the payment webhook client."}]


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("serve")
    with running_server(write_config(folder, upstream.url), folder / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return server.new_key(owner="dana", team="payments")


def chat_body(**extra: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": ASK, **extra}


def auth(key: str, work_item: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    if work_item is not None:
        headers["x-work-item"] = work_item
    return headers


# -- 1. the provider's usage, recorded per work item ------------------------------------------------


def test_sdk_requests_are_recorded_with_the_providers_token_counts(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    client = server.openai(key, default_headers={"X-Work-Item": "Acme/Web#7"})
    replies = [
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK),
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK + [{"role": "user", "content": "and log them"}], max_tokens=3),
    ]
    before = len(upstream.received)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True, max_tokens=5)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    sent = upstream.received[before:]
    assert len(sent) == 1
    # What the provider billed for the stream: its prompt (the fake's deterministic count) and one token per piece.
    stream_prompt, stream_completion = prompt_tokens_of(sent[0]["body"]), len(pieces)
    assert stream_completion == 5
    assert "x-work-item" not in sent[0]["headers"] and "authorization" not in sent[0]["headers"]

    item = server.work_item("acme/web#7", expected_requests=3)
    expected_prompt = sum(r.usage.prompt_tokens for r in replies) + stream_prompt
    expected_completion = sum(r.usage.completion_tokens for r in replies) + stream_completion
    assert item["id"] == "acme/web#7"
    assert item["requests"] == 3
    assert item["prompt_tokens"] == expected_prompt
    assert item["completion_tokens"] == expected_completion
    assert item["total_tokens"] == expected_prompt + expected_completion
    assert item["models"] == ["gpt-4o-mini"]

    events = server.events("acme/web#7", expected=3)
    assert sorted(e["usage_source"] for e in events) == ["provider"] * 3
    assert sorted(e["stream"] for e in events) == [False, False, True]
    assert {e["attribution_source"] for e in events} == {"header"}


# -- 2. the usage-only chunk is withheld from clients that did not ask for it -------------------------


def test_stream_usage_chunk_only_for_clients_that_asked(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    client = server.openai(key)

    before = len(upstream.received)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True, extra_headers={"X-Work-Item": "USG-1"}))
    assert chunks, "the stream was empty"
    assert all(c.choices for c in chunks), "a usage-only chunk reached a client that did not ask for it"
    assert all(c.usage is None for c in chunks)
    assert upstream.received[before]["body"]["stream_options"] == {"include_usage": True}

    before = len(upstream.received)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, stream=True, stream_options={"include_usage": True}, extra_headers={"X-Work-Item": "USG-2"}
        )
    )
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    usage = usage_chunks[0].usage
    assert usage.prompt_tokens == prompt_tokens_of(upstream.received[before]["body"])
    assert usage.completion_tokens == sum(1 for c in chunks if c.choices and c.choices[0].delta.content)

    # A client that says `include_usage: false` is still metered: the proxy asks upstream anyway.
    before = len(upstream.received)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, stream=True, stream_options={"include_usage": False}, extra_headers={"X-Work-Item": "USG-3"}
        )
    )
    assert chunks and all(c.choices for c in chunks)
    assert upstream.received[before]["body"]["stream_options"] == {"include_usage": True}

    # All three are recorded with the provider's usage, whether the client saw it or not.
    for item_id in ("USG-1", "USG-2", "USG-3"):
        item = server.work_item(item_id, expected_requests=1)
        assert item["requests"] == 1
        assert item["prompt_tokens"] == usage.prompt_tokens
        assert item["completion_tokens"] == usage.completion_tokens
        assert server.events(item_id, expected=1)[0]["usage_source"] == "provider"


# -- 3. the client hangs up mid-stream ------------------------------------------------------------------


def test_client_disconnect_mid_stream_is_recorded_as_estimated(server: ServerProcess, key: str) -> None:
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(model="fake-hang", stream=True), headers=auth(key, "HANG-1")) as response:
            assert response.status_code == 200
            first = next(response.iter_raw())
            assert first.startswith(b"data: ")
    # The client is gone; the relay notices without waiting for the provider's next chunk (it never comes).
    events = server.events("HANG-1", expected=1, timeout=5)
    assert len(events) == 1, events
    event = events[0]
    assert event["error"] == "client_disconnected"
    assert event["usage_source"] == "estimated"
    assert event["completion_tokens"] > 0
    assert event["stream"] is True
    assert time.monotonic() - started < 10
    assert server.http.get("/healthz").status_code == 200


# -- 4. the provider cuts the stream ------------------------------------------------------------------------


def test_provider_cutting_the_stream_raises_in_the_sdk_and_is_recorded(server: ServerProcess, key: str) -> None:
    client = server.openai(key, default_headers={"X-Work-Item": "CUT-1"})
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(model="fake-cut", messages=ASK, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received, "the part of the stream sent before the cut should reach the client"
    assert isinstance(raised.value.body, dict) and raised.value.body.get("code") == "upstream_error"

    events = server.events("CUT-1", expected=1)
    assert len(events) == 1, events
    assert events[0]["error"] == "upstream_error"
    assert events[0]["usage_source"] == "estimated"
    assert events[0]["completion_tokens"] > 0


# -- 5. provider failures -------------------------------------------------------------------------------------


def test_provider_500_is_passed_through(server: ServerProcess, key: str) -> None:
    client = server.openai(key, default_headers={"X-Work-Item": "FAIL-500"})
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="fake-500", messages=ASK)
    assert raised.value.status_code == 500
    # The provider's own error body, unchanged (the SDK exposes its `error` object).
    assert raised.value.body == {"message": "fake provider failure", "type": "server_error", "param": None, "code": None}
    events = server.events("FAIL-500", expected=1)
    assert [e["status"] for e in events] == [500]


def test_provider_429_is_passed_through(server: ServerProcess, key: str) -> None:
    client = server.openai(key, default_headers={"X-Work-Item": "FAIL-429"})
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="fake-429", messages=ASK)
    assert raised.value.status_code == 429
    assert raised.value.body == {"message": "rate limited", "type": "rate_limit_error", "param": None, "code": "rate_limit"}
    events = server.events("FAIL-429", expected=1)
    assert [e["status"] for e in events] == [429]


def test_provider_timeout_is_504_upstream_timeout(server: ServerProcess, key: str) -> None:
    started = time.monotonic()
    response = server.http.post("/v1/chat/completions", json=chat_body(model="fake-slow"), headers=auth(key, "FAIL-504"))
    assert_openai_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 1.9, "the read timeout (0.5 s) should end the wait before the provider answers (2 s)"
    events = server.events("FAIL-504", expected=1)
    assert [(e["status"], e["error"]) for e in events] == [(504, "upstream_timeout")]


def test_provider_silent_mid_stream_times_out_in_band(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    client = server.openai(key, default_headers={"X-Work-Item": "STALL-1"})
    before = len(upstream.received)
    started = time.monotonic()
    with pytest.raises(openai.APIError) as raised:
        for _ in client.chat.completions.create(model="hang-short", messages=ASK, stream=True):
            pass
    assert time.monotonic() - started < 5, "read_timeout_seconds (0.5 s) bounds the silence between two chunks"
    assert isinstance(raised.value.body, dict) and raised.value.body.get("code") == "upstream_timeout"
    assert upstream.received[before]["body"]["model"] == "fake-hang"  # upstream_model was sent
    events = server.events("STALL-1", expected=1)
    assert [(e["error"], e["usage_source"], e["model"], e["upstream_model"]) for e in events] == [("upstream_timeout", "estimated", "hang-short", "fake-hang")]


def test_unreachable_provider_is_502_upstream_error(server: ServerProcess, key: str) -> None:
    client = server.openai(key, default_headers={"X-Work-Item": "FAIL-502"})
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="dead", messages=ASK)
    assert raised.value.status_code == 502
    assert isinstance(raised.value.body, dict) and raised.value.body.get("code") == "upstream_error"
    events = server.events("FAIL-502", expected=1)
    assert [(e["status"], e["error"]) for e in events] == [(502, "upstream_error")]


# -- 6. hostile input -------------------------------------------------------------------------------------------


def raw_request(port: int, head: str, body: Iterable[bytes] = (), timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes; return the status and the JSON body of the response. The body is sent from a
    thread while the response is read: a server may answer (and close) before it has all of it, and
    the client must still see that answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))

        def upload() -> None:
            with contextlib.suppress(OSError):  # the server closed its side: the rest is not wanted
                for piece in body:
                    sock.sendall(piece)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
        sock.shutdown(socket.SHUT_RDWR)
        uploader.join(timeout)
    return status, json.loads(rest[:length])


def _post_head(key: str, item: str, framing: str) -> str:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nX-Work-Item: {item}\r\n{framing}\r\n\r\n")  # fmt: skip


def test_oversized_body_is_refused_on_its_declared_length(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    before = len(upstream.received)
    # Only the headers: the server must answer without waiting for the 64 MiB it was promised.
    status, body = raw_request(server.port, _post_head(key, "BIG-1", f"Content-Length: {64 * 1024 * 1024}"), timeout=5)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert len(upstream.received) == before
    assert server.http.get("/healthz").status_code == 200


MIB = b"x" * (1024 * 1024)


def test_oversized_body_sent_in_full_is_refused(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    before = len(upstream.received)
    start, end = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "', b'"}]}'
    size = len(start) + 64 * len(MIB) + len(end)
    status, body = raw_request(server.port, _post_head(key, "BIG-2", f"Content-Length: {size}"), [start, *[MIB] * 64, end], timeout=30)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert len(upstream.received) == before
    assert server.http.get("/healthz").status_code == 200


def test_oversized_chunked_body_is_refused(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    # No Content-Length: the server counts while reading and stops at the limit (32 MiB by default).
    def chunked(*pieces: bytes) -> Iterator[bytes]:
        for piece in pieces:
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    before = len(upstream.received)
    pieces = (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "', *[MIB] * 33, b'"}]}')
    status, body = raw_request(server.port, _post_head(key, "BIG-3", "Transfer-Encoding: chunked"), chunked(*pieces), timeout=30)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert len(upstream.received) == before
    assert server.http.get("/healthz").status_code == 200


@pytest.mark.parametrize("refused", REFUSED)
def test_hostile_proxy_requests_are_refused_before_the_provider(server: ServerProcess, upstream: FakeUpstream, key: str, refused: Refused) -> None:
    before = len(upstream.received)
    response = server.http.post("/v1/chat/completions", headers={**auth(key), **refused.headers}, **refused.request())
    assert_openai_error(response, refused.status, refused.code)
    assert len(upstream.received) == before


def test_missing_or_unknown_key_is_401(server: ServerProcess, upstream: FakeUpstream) -> None:
    before = len(upstream.received)
    assert_openai_error(server.http.post("/v1/chat/completions", json=chat_body(), headers={"x-work-item": "AUTH-1"}), 401, "invalid_api_key")
    response = server.http.post("/v1/chat/completions", json=chat_body(), headers=auth("tp-not-a-real-key", "AUTH-1"))
    assert_openai_error(response, 401, "invalid_api_key")
    assert len(upstream.received) == before


def test_hostile_paths_and_methods(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    before = len(upstream.received)
    assert_openai_error(server.http.get(f"/api/work-items/{quoted('../../etc/passwd')}", headers=server.admin_headers), 400, "work_item_invalid")
    assert_openai_error(server.http.post("/v1/no/such/route", json=chat_body(), headers=auth(key, "PATH-1")), 404, "not_found")
    assert_openai_error(server.http.get("/v1/chat/completions", headers=auth(key, "PATH-1")), 405, "method_not_allowed")
    assert_openai_error(server.http.delete("/v1/models", headers=auth(key)), 405, "method_not_allowed")
    # A raw `..` path (httpx would normalize it away) must not escape the routes.
    status, body = raw_request(server.port, "GET /v1/../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert len(upstream.received) == before


def test_requests_the_http_parser_refuses_get_the_error_shape(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    """A request uvicorn's parser cannot read (bytes HTTP forbids in a header, a broken request line) is
    answered before any route sees it: in the API's error shape too, not as a line of plain text."""
    before = len(upstream.received)
    for head in (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nX-Work-Item: PAY\x01-1\r\n\r\n",
        "DELETE /api/me/work-item HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad\x7f: 1\r\n\r\n",
        "GET /api/keys HTTP/9\r\nHost: 127.0.0.1\r\n\r\n",
    ):
        status, body = raw_request(server.port, head)
        assert status == 400, (head, status, body)
        assert set(body) == {"error"} and body["error"]["code"] == "invalid_request", body
        assert {"message", "type", "param", "code"} == set(body["error"]) and body["error"]["message"], body
    assert len(upstream.received) == before


def test_server_still_works_after_hostile_input(server: ServerProcess, upstream: FakeUpstream, key: str) -> None:
    for param in REFUSED:  # all of it, here, whatever ran before: nothing it sends breaks the process
        (refused,) = param.values
        assert server.http.post("/v1/chat/completions", headers={**auth(key), **refused.headers}, **refused.request()).status_code == refused.status
    status, _ = raw_request(server.port, _post_head(key, "BIG-4", f"Content-Length: {64 * 1024 * 1024}"), timeout=5)
    assert status == 413
    assert server.process.poll() is None
    assert server.http.get("/healthz").status_code == 200
    reply = server.openai(key).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "AFTER-1"})
    assert reply.choices[0].message.content
    item = server.work_item("AFTER-1", expected_requests=1)
    assert item["requests"] == 1 and item["total_tokens"] == reply.usage.total_tokens
    assert not any(t["work_item"].startswith(("BAD-", "BIG-")) for t in server.admin_get("/api/reports/tasks").json()["tasks"])


def test_refused_requests_are_counted_per_reason_not_as_usage(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key(owner="refused-only", team="payments")
    before = len(upstream.received)
    server.http.post("/v1/chat/completions", content=b"{not json", headers=auth(key, "REF-1"))
    server.http.post("/v1/chat/completions", json=chat_body(), headers=auth(key, "1; DROP TABLE usage_events;--"))
    server.http.post("/v1/chat/completions", json=chat_body(), headers=auth(key))
    server.http.post("/v1/chat/completions", json=chat_body(), headers=auth(key))
    assert len(upstream.received) == before

    def mine() -> dict:
        response = server.http.get("/api/me/usage", headers=auth(key))
        assert response.status_code == 200, response.text
        return response.json()

    expected = {"invalid_request": 1, "work_item_invalid": 1, "work_item_required": 2}
    usage = wait_until(mine, lambda data: data["rejected_requests"] == expected)
    assert usage["rejected_requests"] == expected
    assert usage["work_items"] == [] and usage["recent_events"] == []
    with closing(sqlite3.connect(server.config.parent / "t.db")) as db:  # the SQL-ish id was data, never SQL
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'usage_events'").fetchone() == (1,)


# -- 7. graceful shutdown drains the writer --------------------------------------------------------------------


def test_sigterm_drains_every_accepted_requests_usage(upstream: FakeUpstream, tmp_path: Path) -> None:
    # A long flush interval: at SIGTERM the events are still queued in the writer, not yet committed.
    config = write_config(tmp_path, upstream.url, recording={"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 1.0})
    count = 30
    with running_server(config, tmp_path / "server.log") as server:
        key = server.new_key(owner="erin", team="payments")
        client = server.openai(key, default_headers={"X-Work-Item": "DRAIN-1"})

        def one(i: int) -> int:
            return client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {i}"}]).usage.total_tokens

        with ThreadPoolExecutor(max_workers=10) as pool:
            totals = list(pool.map(one, range(count)))
        server.sigterm()
        try:
            code = server.process.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("taskproxy serve did not exit within 20 s of SIGTERM:\n" + server.log())
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit too.
        assert code in (0, -signal.SIGTERM), server.log()
        assert "Application shutdown complete" in server.log()

    with closing(sqlite3.connect(tmp_path / "t.db")) as db:
        rows = db.execute("SELECT count(*), sum(total_tokens) FROM usage_events WHERE work_item = 'DRAIN-1'").fetchone()
    assert rows == (count, sum(totals))
    assert list(tmp_path.glob("spool*")) == []  # nothing left waiting in any spool file


def test_an_idle_server_dates_each_answer_and_stops_as_soon_as_it_is_told(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The server's main loop wakes once a second (process.QuietServer): the Date header still moves on
    with the clock, and SIGTERM is acted on at once, not at the next wake-up."""
    config = write_config(tmp_path, upstream.url, recording={"spool_path": str(tmp_path / "spool.jsonl")})
    with running_server(config, tmp_path / "server.log") as server:
        # Idle, the event loop sleeps: its thread gives up the CPU a few times in 3 s, not thirty
        # (uvicorn's own loop wakes every 100 ms).
        loop_thread = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/status")

        def sleeps() -> int:
            return int(next(line for line in loop_thread.read_text().splitlines() if line.startswith("voluntary_ctxt_switches")).split()[1])

        time.sleep(1.0)
        before = sleeps()
        time.sleep(3.0)
        assert sleeps() - before < 15, f"the idle event loop woke {sleeps() - before} times in 3 s"
        dates = []
        for _ in range(3):
            reply = server.http.get("/healthz")
            dates.append(parsedate_to_datetime(reply.headers["date"]))
            time.sleep(1.3)
        assert dates == sorted(set(dates)), dates  # a new second in each answer
        assert abs((datetime.now(UTC) - dates[-1]).total_seconds()) < 3.5
        # Right after a wake-up (the header just changed), the loop has most of a second left to sleep.
        seen = server.http.get("/healthz").headers["date"]
        while server.http.get("/healthz").headers["date"] == seen:
            time.sleep(0.01)
        told = time.monotonic()
        server.sigterm()
        while "Shutting down" not in server.log():
            assert time.monotonic() - told < 0.6, "the server went on sleeping after SIGTERM:\n" + server.log()
            time.sleep(0.01)
        assert server.process.wait(20) in (0, -signal.SIGTERM), server.log()


# -- several workers ------------------------------------------------------------------------------------------


def test_several_workers_share_one_database(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = write_config(tmp_path, upstream.url)
    # The schema is created first (`db upgrade`): see the next test for a fresh database.
    upgraded = subprocess.run([sys.executable, "-m", "taskproxy", "db", "upgrade", "--config", str(config)], capture_output=True, text=True, timeout=30, env=child_env())
    assert upgraded.returncode == 0, upgraded.stderr
    with running_server(config, tmp_path / "server.log", extra_args=("--workers", "2")) as server:
        key = server.new_key(owner="kim", team="payments")
        client = server.openai(key, default_headers={"X-Work-Item": "WORKERS-1"})
        with ThreadPoolExecutor(max_workers=6) as pool:
            totals = list(pool.map(lambda i: client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"n {i}"}]).usage.total_tokens, range(12)))
        item = server.work_item("WORKERS-1", expected_requests=12)
        assert item["requests"] == 12 and item["total_tokens"] == sum(totals)
        assert server.process.poll() is None
        assert "Application startup failed" not in server.log()


def test_processes_starting_together_on_a_fresh_database_all_start(tmp_path: Path) -> None:
    # Separate processes (replicas, a CLI command while the server starts) preparing one new SQLite file
    # at the same moment: the migration runs once, the others wait for it and find the schema ready.
    script = (
        "import sys; from taskproxy.storage.db import make_engine, prepare_schema; "
        f"prepare_schema(make_engine('sqlite:///{tmp_path / 'race.db'}')); print('ready')"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()) for _ in range(4)]
    results = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], [err[-400:] for _, err in results]
    engine = make_engine(f"sqlite:///{tmp_path / 'race.db'}")
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    engine.dispose()
