"""An answer that fails part-way through its relay, seen by the official SDKs: the provider resets the
connection, stalls past its read timeout or `max_stream_seconds`, or the server shuts down, after
whole events and half of one more. The client gets the whole events and then the route's error, which
its SDK raises as an API error; the half event is dropped. An answer too large to keep that is not an
event stream gets no event appended: its connection is cut."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from conftest import ADMIN_KEY, make_settings, start_proxy, wait_until
from taskproxy.app import create_app
from taskproxy.errors import UpstreamError, UpstreamTimeout
from taskproxy.localserver import serve_in_thread
from taskproxy.upstream.mock import MockProvider, MockResponse
from taskproxy.upstream.provider import ProviderRequest

pytestmark = pytest.mark.anyio

ASK = [{"role": "user", "content": "Add retries with jitter to the webhook client."}]
CLAUDE = {"name": "claude", "provider": "anthropic", "base_url": "http://provider.test", "upstream_model": "claude-sonnet-4-5"}
GPT = {"name": "gpt-4o-mini", "base_url": "http://provider.test/v1"}
# How the answer fails after its half event, and the error it is recorded with.
FAILURES = {"reset": "upstream_error", "read_timeout": "upstream_timeout", "max_stream_seconds": "upstream_timeout", "shutdown": "proxy_shutdown"}


def _chat_events() -> list[bytes]:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini"}
    return [b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}], "usage": None}) + b"\n\n"
            for word in ("Retries", " with", " jitter", " added.")]  # fmt: skip


def _messages_events() -> list[bytes]:
    def named(name: str, data: dict) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    message = {"id": "m", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [], "stop_reason": None,
               "stop_sequence": None, "usage": {"input_tokens": 20, "output_tokens": 1}}  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " added."}}
    return [named("message_start", {"type": "message_start", "message": message}),
            named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Retries"}}),
            named("content_block_delta", delta)]  # fmt: skip


def _failing(events: list[bytes], failure: str) -> Any:
    """Three whole events and half of the fourth, then `failure`."""

    async def chunks() -> AsyncIterator[bytes]:
        for event in events[:3]:
            yield event
        yield events[3][: len(events[3]) // 2]
        if failure == "reset":
            raise UpstreamError("Could not reach the provider (ClientPayloadError).")
        if failure == "read_timeout":
            raise UpstreamTimeout("Timed out waiting for the provider.")
        if failure == "shutdown":  # the server cancels the task serving each answer still going on
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        await asyncio.sleep(3600)

    return lambda request: MockResponse.sse(chunks())


def _settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path, models=[{**GPT, "max_stream_seconds": 0.5}, {**CLAUDE, "max_stream_seconds": 0.5}])


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_chat_stream_with_usage_cut_mid_event_ends_in_an_error_the_openai_sdk_raises(tmp_path: Path, failure: str) -> None:
    """The error event was glued onto the half event (`…"choices": [{data: {"error":…}}`): the SDK
    raised JSONDecodeError, not the error (found by a review). The splitter held half events back only
    for a client that had not asked for usage."""
    async for proxy in start_proxy(_settings(tmp_path), MockProvider(_failing(_chat_events(), failure))):
        client = proxy.openai(await proxy.new_key())
        words = []
        with pytest.raises(openai.APIError) as ended:
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True, stream_options={"include_usage": True},
                                                          extra_headers={"X-Work-Item": "CUT-1"})  # fmt: skip
            async for chunk in stream:
                words.extend(c.delta.content for c in chunk.choices)
        assert words == ["Retries", " with", " jitter"] and type(ended.value) is openai.APIError, ended.value
        event = (await proxy.events(1, work_item="CUT-1"))[0]
        assert (event["status"], event["error"], event["stream"]) == (200, FAILURES[failure], True), event


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_messages_stream_cut_mid_event_ends_in_an_error_the_anthropic_sdk_raises(tmp_path: Path, failure: str) -> None:
    async with served(create_app(_settings(tmp_path), provider=MockProvider(_failing(_messages_events(), failure)))) as (url, key, events):
        client = anthropic.AsyncAnthropic(api_key=key, base_url=url, max_retries=0, default_headers={"X-Work-Item": "CUT-2"})
        text: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as ended:
            async with client.messages.stream(model="claude", max_tokens=50, messages=ASK) as stream:
                async for piece in stream.text_stream:
                    text.append(piece)
        await client.close()
        assert text == ["Retries"] and ended.value.body["type"] == "error", ended.value.body  # type: ignore[index]
        event = (await events("CUT-2", 1))[0]
        assert (event["status"], event["error"], event["route"]) == (200, FAILURES[failure], "/v1/messages"), event


async def test_an_event_stream_whose_content_type_is_not_lower_case_is_relayed_as_one(tmp_path: Path) -> None:
    """Media types are case-insensitive: `Text/Event-Stream` was taken for a body, kept whole, its
    usage-only chunk passed to a client that had not asked for it, and its usage estimated."""
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini"}
    events = [*_chat_events(), b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n", b"data: [DONE]\n\n"]

    def answer(request: ProviderRequest) -> MockResponse:
        return MockResponse(200, [("Content-Type", "Text/Event-Stream; charset=utf-8")], chunks=events)

    async for proxy in start_proxy(make_settings(tmp_path), MockProvider(answer)):
        client = proxy.openai(await proxy.new_key())
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True, extra_headers={"X-Work-Item": "CASE-1"})
        chunks = [chunk async for chunk in stream]
        assert len(chunks) == 4 and all(chunk.choices for chunk in chunks)
        event = (await proxy.events(1, work_item="CASE-1"))[0]
        assert (event["usage_source"], event["prompt_tokens"], event["completion_tokens"]) == ("provider", 9, 4), event


async def test_a_body_too_large_to_keep_cut_part_way_is_a_broken_answer_not_a_200_with_an_event_appended(tmp_path: Path) -> None:
    """Past `max_buffered_response_bytes` a body is relayed as it arrives; cut after that, it got
    `data: {"error"…}` appended to megabytes of JSON, sent as a whole 200 (found by a review). Its
    connection is cut instead: the client sees an answer that did not end."""
    piece = b" " * (1 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "'
        for _ in range(5):
            yield piece
        raise UpstreamError("Could not reach the provider (ClientPayloadError).")

    app = create_app(make_settings(tmp_path), provider=MockProvider(lambda request: MockResponse(200, [("content-type", "application/json")], chunks=chunks())))
    async with served(app) as (url, key, events), httpx.AsyncClient(base_url=url, timeout=10) as http:
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK},
                                   headers={"authorization": f"Bearer {key}", "X-Work-Item": "CUT-3"}) as answer:  # fmt: skip
                assert answer.status_code == 200
                async for chunk in answer.aiter_raw():
                    received += chunk
        assert len(received) > 5 << 20 and b"data:" not in received and b'"error"' not in received
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, default_headers={"X-Work-Item": "CUT-3"})
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
        await client.close()
        assert [(e["status"], e["error"]) for e in await events("CUT-3", 2)] == [(200, "upstream_error")] * 2


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[tuple[str, str, Callable[[str, int], Awaitable[list[dict]]]]]:
    """`app` served by uvicorn on 127.0.0.1: its URL, a developer's key, and the events recorded for a work item."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with serve_in_thread(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            key = (await http.post("/api/keys", json={"owner": "dana", "team": "payments", "role": "developer"}, headers=admin)).json()["key"]

            async def events(work_item: str, expected: int) -> list[dict]:
                return await wait_until(lambda: _json(http.get("/api/usage/events", params={"work_item": work_item}, headers=admin)),
                                        lambda found: len(found) >= expected)  # fmt: skip

            yield url, key, events


async def _json(response: Awaitable[httpx.Response]) -> Any:
    return (await response).json()
