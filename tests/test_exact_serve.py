"""An exact measure on a bad day, against a real `taskproxy serve` (SQLite, and PostgreSQL where the case
is PostgreSQL's): hostile ids, token counts past 32 bits, floods of unauthenticated requests, answers cut
short by the client or ended by the provider's error, and what the production HTTP client relays."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

import webhook_payloads as hooks
from conftest import postgres_schema
from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, write_config
from taskproxy.fake_provider import HUGE_PROMPT, OVERLOADED_CACHE_READ, prompt_tokens_of
from taskproxy.metering.pricing import Price
from taskproxy.money import usd

pytestmark = pytest.mark.serve

ASK = [{"role": "user", "content": "Explain the retry policy of the refund worker."}]
HOSTILE_ID = "ﬃ" * 70 + "-1"  # 72 characters that upper-case to 212
PRICING = {"input_per_million": 3.0, "output_per_million": 15.0, "cached_input_per_million": 0.3}


def _models(upstream: FakeUpstream) -> list[dict]:
    v1 = f"{upstream.url}/v1"
    return [
        {"name": "gpt-4o-mini", "base_url": v1},
        {"name": "huge", "base_url": v1, "upstream_model": "fake-huge"},
        {"name": "failing-responses", "base_url": v1, "upstream_model": "fake-failed"},
        {"name": "claude", "provider": "anthropic", "base_url": upstream.url, "upstream_model": "claude-sonnet-4-5"},
        {"name": "claude-overloaded", "provider": "anthropic", "base_url": upstream.url, "upstream_model": "fake-overloaded", "pricing": PRICING},
        {"name": "claude-hang", "provider": "anthropic", "base_url": upstream.url, "upstream_model": "fake-hang"},
        {"name": "claude-refused", "provider": "anthropic", "base_url": upstream.url, "upstream_model": "fake-overloaded-first", "pricing": PRICING},
        {"name": "slow", "base_url": v1, "upstream_model": "fake-slow"},
    ]


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("exact")
    config = write_config(folder, upstream.url, models=_models(upstream), trackers={"jira": {"secret_env": "JIRA"}})
    with running_server(config, folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY, JIRA=hooks.JIRA_SECRET)) as running:
        yield running


@pytest.fixture(scope="module")
def pg_server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("exact-pg")
    with postgres_schema() as url:
        config = write_config(folder, upstream.url, models=_models(upstream), database_url=url, trackers={"jira": {"secret_env": "JIRA"}})
        with running_server(config, folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY, JIRA=hooks.JIRA_SECRET)) as running:
            yield running


def _claude(server: ServerProcess, key: str, item: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, default_headers={"X-Work-Item": item}, max_retries=0)


@pytest.mark.postgres
def test_a_hostile_id_is_refused_everywhere_and_costs_no_one_elses_usage(pg_server: ServerProcess) -> None:
    dana, eve = pg_server.new_key("dana", "payments"), pg_server.new_key("eve", "web")
    answered: list[int] = []

    def honest() -> None:
        client = pg_server.openai(dana, default_headers={"X-Work-Item": "PAY-77"})
        for _ in range(60):
            answered.append(client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=2).usage.total_tokens)

    worker = threading.Thread(target=honest)
    worker.start()
    hostile = pg_server.openai(eve)
    for _ in range(10):  # mixed into the same batches as dana's: in the header (raw UTF-8) and in the body
        sent = pg_server.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK},
                                   headers={"authorization": f"Bearer {eve}", "X-Work-Item": HOSTILE_ID.encode()})  # fmt: skip
        assert sent.status_code == 400 and sent.json()["error"]["code"] == "work_item_invalid"
        with pytest.raises(openai.BadRequestError) as refused:
            hostile.chat.completions.create(model="gpt-4o-mini", messages=ASK, metadata={"work_item": HOSTILE_ID})
        assert refused.value.body["code"] == "work_item_invalid"
    worker.join(60)
    bound = pg_server.http.put("/api/me/work-item", json={"work_item": HOSTILE_ID}, headers={"authorization": f"Bearer {eve}"})
    assert bound.status_code == 400 and bound.json()["error"]["code"] == "work_item_invalid"
    body = hooks.dumps(hooks.jira_issue("jira:issue_updated", HOSTILE_ID, category="done"))
    delivered = pg_server.http.post("/webhooks/jira", content=body, headers=hooks.jira_headers(body))
    assert delivered.status_code == 200 and delivered.json()["status"] == "ignored"  # not tracked, and no 500

    item = pg_server.work_item("PAY-77", expected_requests=60)
    assert (item["requests"], item["total_tokens"]) == (60, sum(answered))
    assert "set_aside" not in pg_server.log() and "Traceback" not in pg_server.log()


@pytest.mark.postgres
def test_token_counts_past_32_bits_are_recorded_as_reported(pg_server: ServerProcess) -> None:
    reply = pg_server.openai(pg_server.new_key()).chat.completions.create(
        model="huge", messages=ASK, max_tokens=3, extra_headers={"X-Work-Item": "BIG-1"}
    )
    assert reply.usage.prompt_tokens == HUGE_PROMPT
    event = pg_server.events("BIG-1", 1)[0]
    assert (event["prompt_tokens"], event["total_tokens"], event["usage_source"]) == (HUGE_PROMPT, HUGE_PROMPT + 3, "provider")
    item = pg_server.work_item("BIG-1", expected_requests=1)
    assert item["prompt_tokens"] == HUGE_PROMPT


def test_a_flood_of_unauthenticated_requests_is_counted_not_written_row_by_row(server: ServerProcess) -> None:
    from sqlalchemy import func, select

    from taskproxy.storage.db import make_engine
    from taskproxy.storage.models import Rejection

    flood = 3000
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n in range(flood):
            headers = {} if n % 2 else {"authorization": f"Bearer tp-{n:043d}"}  # none, or made up
            assert client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK}, headers=headers).status_code == 401
    report = server.admin_get("/api/reports/tasks").json()
    deadline = time.monotonic() + 5
    while report["rejected_requests"].get("invalid_api_key", 0) < flood and time.monotonic() < deadline:
        time.sleep(0.2)
        report = server.admin_get("/api/reports/tasks").json()
    assert report["rejected_requests"]["invalid_api_key"] == flood
    engine = make_engine(server.database_url)
    with engine.connect() as connection:
        rows = connection.execute(select(func.count()).select_from(Rejection).where(Rejection.reason == "invalid_api_key")).scalar_one()
    engine.dispose()
    assert rows <= 60  # a row per minute, route and flush (at most once a second), not 3,000


def test_an_anthropic_stream_the_client_hangs_up_on_keeps_the_providers_input_and_cache_figures(server: ServerProcess) -> None:
    client = _claude(server, server.new_key(), "CUT-1")
    with client.messages.stream(model="claude-hang", max_tokens=50, messages=ASK) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break  # Esc in Claude Code: the client hangs up mid-answer
    event = server.events("CUT-1", 1)[0]
    assert event["error"] == "client_disconnected" and event["usage_source"] == "estimated"
    assert event["estimated_fields"] == "completion_tokens"  # only what the provider had not reported yet
    assert event["prompt_tokens"] == prompt_tokens_of({"messages": ASK}) and event["completion_tokens"] >= 1


def test_an_error_the_provider_sends_inside_a_stream_is_recorded_as_an_error_with_its_figures(server: ServerProcess) -> None:
    client = _claude(server, server.new_key(), "OVER-1")
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client.messages.stream(model="claude-overloaded", max_tokens=20, messages=ASK) as stream:
            stream.get_final_message()
    assert "overloaded" in str(failed.value).lower()
    event = server.events("OVER-1", 1)[0]
    assert (event["status"], event["error"], event["provider_error"]) == (502, "upstream_error", "overloaded_error")
    # message_start's figures, as reported: input and the cache reads (20,143), never an estimate of the whole prompt
    assert (event["prompt_tokens"], event["cached_tokens"]) == (prompt_tokens_of({"messages": ASK}) + OVERLOADED_CACHE_READ, OVERLOADED_CACHE_READ)
    assert event["estimated_fields"] == "completion_tokens"
    # Priced as such: cache reads at their own rate, the prompt not billed at full price as if unknown.
    price = Price(3e-6, 15e-6, cached_input=0.3e-6)
    assert event["cost_usd"] == usd(price.nanos(event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"]))


def test_a_stream_the_provider_refuses_in_band_before_generating_anything_bills_nothing(server: ServerProcess) -> None:
    """Anthropic answering 200 and, as its first event, `overloaded_error`: nothing was generated and
    nothing reported, as when it answers 529. It was billed a tiktoken estimate of the whole prompt
    (found by a review)."""
    client = _claude(server, server.new_key(), "REFUSED-1")
    with pytest.raises(anthropic.APIStatusError):
        with client.messages.stream(model="claude-refused", max_tokens=20, messages=ASK) as stream:
            stream.get_final_message()
    event = server.events("REFUSED-1", 1)[0]
    assert (event["status"], event["error"], event["provider_error"]) == (502, "upstream_error", "overloaded_error")
    assert (event["prompt_tokens"], event["completion_tokens"], event["cost_usd"]) == (0, 0, 0)


def test_a_failed_responses_stream_is_recorded_with_the_usage_it_reported(server: ServerProcess) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "RESP-1"})
    kinds = [event.type for event in client.responses.create(model="failing-responses", input="Summarize the refund worker.", stream=True)]
    assert kinds[-1] == "response.failed"  # the SDK hands the failure over as the stream's last event
    event = server.events("RESP-1", 1)[0]
    assert (event["error"], event["provider_error"], event["usage_source"]) == ("upstream_error", "server_error", "provider")
    assert event["prompt_tokens"] == prompt_tokens_of({"input": "Summarize the refund worker."})


def test_a_failed_responses_stream_larger_than_the_tail_kept_is_still_recorded_as_failed(server: ServerProcess) -> None:
    """`response.failed` repeats the request's instructions (Codex sends tens of KiB): an event larger
    than the tail kept of a stream was recorded as answered, status 200 and no error (found by a review)."""
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "RESP-2"})
    instructions = "Follow the repository's conventions. " * 2_000  # 74 KB, more than the 32-64 KiB tail
    kinds = [event.type for event in client.responses.create(model="failing-responses", input="Summarize it.", instructions=instructions, stream=True)]
    assert kinds[-1] == "response.failed"
    event = server.events("RESP-2", 1)[0]
    assert (event["status"], event["error"], event["provider_error"], event["usage_source"]) == (502, "upstream_error", "server_error", "provider")
    assert event["prompt_tokens"] == prompt_tokens_of({"input": "Summarize it.", "instructions": instructions})


def test_the_production_client_relays_repeated_headers_and_the_query_string(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key()
    response = httpx.post(
        f"{server.url}/v1/messages?beta=true", json={"model": "claude", "max_tokens": 3, "messages": ASK},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "X-Work-Item": "HDR-1"},
    )  # fmt: skip
    assert response.status_code == 200
    assert response.headers.get_list("vary") == ["Origin", "Accept-Encoding"]  # two headers, as the provider sent them
    assert upstream.received[-1]["path"] == "/v1/messages" and upstream.received[-1]["query"] == "beta=true"
    streamed = httpx.post(
        f"{server.url}/v1/chat/completions?api-version=2024-10-21", json={"model": "gpt-4o-mini", "messages": ASK, "stream": True},
        headers={"authorization": f"Bearer {key}", "X-Work-Item": "HDR-1"},
    )  # fmt: skip
    assert streamed.headers.get_list("vary") == ["Origin", "Accept-Encoding"] and upstream.received[-1]["query"] == "api-version=2024-10-21"


def test_a_client_that_hangs_up_before_a_non_streamed_answer_cancels_the_providers_request(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key()
    body = b'{"model": "slow", "messages": [{"role": "user", "content": "hi"}]}'  # the provider takes 2 s to answer
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\nx-work-item: GONE-1\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.3)
    started = time.monotonic()
    event = server.events("GONE-1", 1, timeout=1.5)[0]  # recorded when the client left, not when the provider would have answered
    assert (event["status"], event["error"]) == (499, "client_disconnected") and time.monotonic() - started < 1.5


def test_a_provider_sending_its_headers_a_byte_at_a_time_is_timed_out_streamed_or_not(upstream: FakeUpstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each byte within the read timeout, the headers never done: a non-streamed request got its 504 at
    max_response_seconds, a streamed one (HTTP or the WebSocket) waited as long as the provider went
    on. The wait for a stream's status and headers is bounded by max_stream_seconds."""
    from websockets.sync.client import connect

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def dribble(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.5):
                try:
                    conn.sendall(b"a")
                except OSError:
                    return

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=dribble, args=(conn,), daemon=True).start()

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    slow = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    models = [{"name": "dribble", "base_url": slow, "read_timeout_seconds": 5, "max_response_seconds": 2, "max_stream_seconds": 2}]
    config = write_config(tmp_path, upstream.url, models=models)
    try:
        with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
            key = server.new_key()
            headers = {"authorization": f"Bearer {key}", "X-Work-Item": "SLOW-1"}
            for stream in (False, True):
                started = time.monotonic()
                reply = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=15,
                                   json={"model": "dribble", "messages": [{"role": "user", "content": "hi"}], "stream": stream})  # fmt: skip
                assert reply.status_code == 504 and reply.json()["error"]["code"] == "upstream_timeout", (stream, reply.text)
                assert time.monotonic() - started < 5, stream
            with connect(server.url.replace("http://", "ws://") + "/v1/responses", additional_headers=headers, open_timeout=5) as socket_:
                socket_.send('{"type": "response.create", "model": "dribble", "input": "hi"}')
                error = httpx.Response(200, content=socket_.recv(10)).json()
            assert error["type"] == "error" and error["error"]["code"] == "upstream_timeout", error
            events = server.events("SLOW-1", 3)
            assert sorted(e["error"] for e in events) == ["upstream_timeout"] * 3
    finally:
        stop.set()
        server_thread.join(5)  # out of accept() first: closed under it, its descriptor's number went to the next test's socket
        listener.close()


def test_an_answer_the_proxy_cannot_relay_as_the_apis_is_a_502_not_an_answered_request(upstream: FakeUpstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the production client: a provider answering gzip-compressed though none was asked for
    reached the client as binary without its Content-Encoding (the SDK failed decoding it), and a 200
    HTML page passed as an answer; both were recorded as answered, making the item AI-assisted with
    nothing generated. Both are now the provider's error (502 upstream_error), recorded as such."""
    base = f"{upstream.url}/v1"
    config = write_config(tmp_path, upstream.url, models=[{"name": "fake-gzip", "base_url": base}, {"name": "fake-html", "base_url": base}])
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
        client = server.openai(server.new_key())
        for model in ("fake-gzip", "fake-html"):
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Work-Item": "ENC-1"})
            assert caught.value.status_code == 502 and caught.value.code == "upstream_error", (model, caught.value)
        events = server.events("ENC-1", 2)
    assert sorted((e["model"], e["status"], e["error"]) for e in events) == [("fake-gzip", 502, "upstream_error"), ("fake-html", 502, "upstream_error")]
