"""The OpenAI routes through the app in-process, with the official `openai` SDK as the client."""

from __future__ import annotations

from urllib.parse import quote

import asyncio
import gc
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from refused_requests import REFUSED, Refused
from conftest import bundled_price_table, BOTH_DATABASES, PROVIDER_KEY, PROVIDER_URL, Proxy, make_settings, start_proxy, wait_until
from taskproxy.fake_provider import prompt_tokens_of
from taskproxy.timeutil import parse_iso
from taskproxy.errors import UpstreamError, UpstreamTimeout
from taskproxy.upstream.mock import MockProvider, MockResponse
from taskproxy.upstream.provider import ProviderRequest
from taskproxy.upstream.relay import ClientWatch

pytestmark = pytest.mark.anyio

ASK = [{"role": "user", "content": "Add retries with jitter to the webhook client."}]


@BOTH_DATABASES
async def test_non_streaming_usage_is_recorded_exactly_against_the_work_item(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    first = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "proj-7"})
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK * 3, extra_headers={"X-Work-Item": "PROJ-7"})

    await proxy.events(2, work_item="PROJ-7")
    item = await proxy.get("/api/work-items/PROJ-7")
    assert item["requests"] == 2
    assert item["prompt_tokens"] == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert item["completion_tokens"] == first.usage.completion_tokens + second.usage.completion_tokens
    assert item["total_tokens"] == first.usage.total_tokens + second.usage.total_tokens
    assert item["models"] == ["gpt-4o-mini"]
    assert item["status"] == "unverified"  # open mode registers unknown ids

    price = bundled_price_table()["gpt-4o-mini"]
    expected_cost = item["prompt_tokens"] * price["input_cost_per_token"] + item["completion_tokens"] * price["output_cost_per_token"]
    assert item["cost_usd"] == pytest.approx(expected_cost, rel=1e-9)

    events = await proxy.get("/api/usage/events", work_item="PROJ-7")
    assert {e["attribution_source"] for e in events} == {"header"}
    assert all(e["usage_source"] == "provider" and e["status"] == 200 and e["est_prompt_tokens"] > 0 for e in events)
    assert all(e["prompt_hash"] and "prompt_text" not in e for e in events)


@BOTH_DATABASES
async def test_stream_without_include_usage_withholds_the_usage_chunk_but_records_it(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True, extra_headers={"X-Work-Item": "PROJ-8"})
    chunks = [chunk async for chunk in stream]

    assert chunks and all(chunk.choices for chunk in chunks), "a usage-only chunk reached a client that did not ask for it"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    sent = proxy.received[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    event = (await proxy.events(1, work_item="PROJ-8"))[0]
    assert event["stream"] is True and event["usage_source"] == "provider"
    assert event["prompt_tokens"] == prompt_tokens_of(sent)
    assert event["completion_tokens"] == len(text.split())


async def test_stream_with_include_usage_passes_the_usage_chunk(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=ASK, stream=True, stream_options={"include_usage": True}, extra_headers={"X-Work-Item": "PROJ-9"}
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    item = await proxy.item("PROJ-9", requests=1)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


async def test_metadata_is_stripped_keys_swapped_and_model_rewritten(proxy: Proxy) -> None:
    key = await proxy.new_key()
    client = proxy.openai(key)
    await client.chat.completions.create(model="team-model", messages=ASK, extra_body={"metadata": {"work_item": "acme/Web#12"}})
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=ASK, extra_body={"metadata": {"work_item": "ENG-1", "purpose": "review"}},
        extra_headers={"X-Git-Branch": "feature/ENG-99-x"},
    )  # fmt: skip

    first, second = proxy.received[-2:]
    assert "metadata" not in first["body"]
    assert first["body"]["model"] == "gpt-4.1"
    assert second["body"]["metadata"] == {"purpose": "review"}
    for request in (first, second):
        headers = request["headers"]
        assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert key not in orjson.dumps(headers).decode()
        assert "x-work-item" not in headers and "x-git-branch" not in headers
    events = await proxy.events(2)
    assert {(e["work_item"], e["attribution_source"]) for e in events} == {("acme/web#12", "body"), ("ENG-1", "body")}
    assert {e["upstream_model"] for e in events} == {"gpt-4.1", "gpt-4o-mini"}


async def test_branch_header_and_key_binding_attribute_requests(proxy: Proxy) -> None:
    key = await proxy.new_key()
    client = proxy.openai(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Git-Branch": "feature/pay-117-refunds"})
    bound = await proxy.http.put("/api/me/work-item", json={"work_item": "https://linear.app/acme/issue/ENG-7/retry"}, headers={"authorization": f"Bearer {key}"})
    assert bound.status_code == 200 and bound.json()["work_item"] == "ENG-7"
    await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PAY-1"})  # header wins

    events = await proxy.events(3)
    assert sorted((e["work_item"], e["attribution_source"]) for e in events) == [("ENG-7", "binding"), ("PAY-1", "header"), ("PAY-117", "branch")]

    cleared = await proxy.http.delete("/api/me/work-item", headers={"authorization": f"Bearer {key}"})
    assert cleared.json()["work_item"] is None
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert refused.value.body["code"] == "work_item_required"


async def test_binding_expires(tmp_path: Path, fake) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, work_items={"binding_ttl_hours": 0.2 / 3600})
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        key = await proxy.new_key()
        await proxy.http.put("/api/me/work-item", json={"work_item": "PROJ-1"}, headers={"authorization": f"Bearer {key}"})
        await asyncio.sleep(0.3)
        with pytest.raises(openai.BadRequestError) as refused:
            await proxy.openai(key).chat.completions.create(model="gpt-4o-mini", messages=ASK)
        assert refused.value.body["code"] == "work_item_required"


@pytest.mark.parametrize("refused", REFUSED)
@BOTH_DATABASES
async def test_rejections_are_clear_counted_and_never_forwarded(proxy: Proxy, refused: Refused) -> None:
    key = await proxy.new_key()
    response = await proxy.http.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}", **refused.headers}, **refused.request())
    assert response.status_code == refused.status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == refused.code and error["message"]
    assert proxy.received == []
    report = await wait_until(lambda: proxy.get("/api/reports/tasks"), lambda r: r["rejected_requests"])
    assert report["rejected_requests"] == {refused.code: 1}
    assert report["tasks"] == []


async def test_malformed_json_is_invalid_request_after_key_and_work_item(proxy: Proxy) -> None:
    key = await proxy.new_key()
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe{}", b"[" * 100_000, b""):
        response = await proxy.http.post("/v1/chat/completions", content=raw, headers={"authorization": f"Bearer {key}", "X-Work-Item": "PROJ-1"})
        assert response.status_code == 400, raw[:10]
        assert response.json()["error"]["code"] == "invalid_request"
    no_key = await proxy.http.post("/v1/chat/completions", content=b"{not json")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert proxy.received == []


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": None, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": None}),
    ("/v1/embeddings", {"model": None, "input": "hi"}),
    ("/v1/messages", {"model": None, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages/count_tokens", {"model": None, "messages": [{"role": "user", "content": "hi"}]}),
])  # fmt: skip
async def test_a_required_field_sent_as_null_is_invalid_request_in_the_routes_shape(proxy: Proxy, path: str, body: dict) -> None:
    """`"model": null` reached the model lookup and was answered 500 `internal_error`."""
    key = await proxy.new_key()
    response = await proxy.http.post(path, json=body, headers={"authorization": f"Bearer {key}", "X-Work-Item": "PROJ-1"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.get("code", error.get("type")) in ("invalid_request", "invalid_request_error") and "null" in error["message"], error
    assert proxy.received == []


@pytest.mark.parametrize(
    ("header", "one", "other", "again"),
    [("x-work-item", "PROJ-1", "PROJ-2", "proj-1"),
     # as with X-Work-Item, the first of two X-Git-Branch headers was taken, silently (found by a review)
     ("x-git-branch", "feature/PROJ-1-a", "feature/PROJ-2-b", "fix/proj-1-b")],
)  # fmt: skip
async def test_two_work_item_headers_naming_different_items_are_refused(proxy: Proxy, header: str, one: str, other: str, again: str) -> None:
    """The first of two X-Work-Item (or X-Git-Branch) headers was taken, silently; the same item twice is one."""
    key = await proxy.new_key()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    two = await proxy.http.post("/v1/chat/completions", json=body, headers=[("authorization", f"Bearer {key}"), (header, one), (header, other)])
    assert two.status_code == 400 and two.json()["error"]["code"] == "work_item_invalid" and "PROJ-1, PROJ-2" in two.json()["error"]["message"]
    assert proxy.received == []
    same = await proxy.http.post("/v1/chat/completions", json=body, headers=[("authorization", f"Bearer {key}"), (header, one), (header, again)])
    assert same.status_code == 200, same.text


async def test_a_work_item_header_with_a_control_character_python_strips_is_refused_not_dropped(proxy: Proxy) -> None:
    """HTTP passes bytes 0x80-0xff in a header: NEL (0x85) and the separators 0x1c-0x1f are control
    characters, but Python's strip() takes them as spaces, so `PAY-1<NEL>` was billed to PAY-1 and a
    header of NEL alone counted as absent, the body's item taken instead (found by a review)."""
    key = (await proxy.new_key()).encode()
    for header, item in ((b"PAY-1\x85", None), (b"\x85", "PAY-2"), (b"PAY-1\x1f", None)):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **({"metadata": {"work_item": item}} if item else {})}
        refused = await proxy.http.post("/v1/chat/completions", json=body, headers=[(b"authorization", b"Bearer " + key), (b"x-work-item", header)])
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "work_item_invalid", (header, refused.text)
    assert proxy.received == []


async def test_a_work_item_that_is_a_malformed_url_is_refused_as_invalid_not_a_500(proxy: Proxy) -> None:
    """`https://[::1/browse/PAY-1` made urlsplit raise: a 500 wherever an id is read, and the refusal
    not counted (found by a review)."""
    key = await proxy.new_key()
    for bad in ("https://[::1/browse/PAY-1", "http://[zz]/browse/PAY-1"):
        for extra in ({"headers": {"x-work-item": bad}}, {"json_metadata": bad}):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            if "json_metadata" in extra:
                body["metadata"] = {"work_item": bad}
            headers = {"authorization": f"Bearer {key}", **extra.get("headers", {})}
            refused = await proxy.http.post("/v1/chat/completions", json=body, headers=headers)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "work_item_invalid", refused.text
        registered = await proxy.http.post("/api/work-items", json={"id": bad, "status": "open"}, headers=proxy.admin_headers)
        assert registered.status_code == 400, registered.text
        looked_up = await proxy.http.get("/api/work-items/" + quote(bad, safe=""), headers=proxy.admin_headers)
        assert looked_up.status_code in (400, 404), looked_up.text
    assert proxy.received == []


async def test_a_content_part_whose_type_is_not_a_string_is_counted_not_a_500(proxy: Proxy) -> None:
    """`{"type": {}}` is unhashable: counting the prompt raised, so an answer without the provider's
    usage was billed no prompt at all, and count_tokens answered 500 (found by a review)."""
    key = await proxy.new_key()
    headers = {"authorization": f"Bearer {key}", "x-work-item": "PROJ-77"}
    text = {"type": "text", "text": "hello there " * 50}
    counts = []
    for extra in ([], [{"type": {}}], [{"type": ["image_url"]}]):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [text, *extra]}]}
        counted = await proxy.http.post("/v1/messages/count_tokens", json=body, headers=headers)
        assert counted.status_code == 200, counted.text
        counts.append(counted.json()["input_tokens"])
    assert counts[0] > 100 and counts[1] > counts[0] and counts[2] > counts[0]  # the odd part counted as the JSON it is


async def test_sdk_errors_for_bad_and_missing_keys(proxy: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError) as bad:
        await proxy.openai("tp-not-a-real-key").chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-1"})
    assert bad.value.body["code"] == "invalid_api_key"
    missing = await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK})
    assert missing.status_code == 401 and "Bearer" in missing.json()["error"]["message"]
    assert proxy.received == []


async def test_oversized_bodies_are_refused_without_reading_them(proxy: Proxy) -> None:
    key = await proxy.new_key()
    headers = {"authorization": f"Bearer {key}", "X-Work-Item": "PROJ-1"}
    limit = proxy.settings.limits.max_body_bytes
    sent: list[int] = []

    async def chunks(count: int):  # each MiB is handed over only when the proxy reads it
        for _ in range(count):
            sent.append(1)
            yield b"x" * (1024 * 1024)

    mib = limit // (1024 * 1024) + 8
    declared = await proxy.http.post("/v1/chat/completions", content=chunks(mib), headers={**headers, "content-length": str(mib * 1024 * 1024)})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    assert len(sent) == 0  # refused on its Content-Length: not one byte of the body read

    streamed = await proxy.http.post("/v1/chat/completions", content=chunks(mib), headers=headers)  # no Content-Length
    assert streamed.status_code == 413
    assert len(sent) == limit // (1024 * 1024) + 1  # read up to the first MiB past the limit, and no further
    assert proxy.received == []
    assert (await proxy.http.get("/healthz")).status_code == 200


@BOTH_DATABASES
async def test_concurrent_requests_on_several_items_give_exact_totals(proxy: Proxy) -> None:
    keys = [await proxy.new_key(owner=f"dev{i}") for i in range(3)]
    items = ["PROJ-1", "PROJ-2", "acme/api#3"]

    async def one(i: int) -> tuple[str, int]:
        client = proxy.openai(keys[i % 3])
        item = items[i % len(items)]
        messages = [{"role": "user", "content": "word " * (i + 1)}]
        if i % 2:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}, max_tokens=i % 7 + 1,
                extra_headers={"X-Work-Item": item},
            )  # fmt: skip
            usage = [c async for c in stream][-1].usage
        else:
            usage = (await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=i % 5 + 1, extra_headers={"X-Work-Item": item})).usage
        return item, usage.total_tokens

    results = await asyncio.gather(*(one(i) for i in range(60)))
    await proxy.events(60, limit=1000)
    for item in items:
        expected = [tokens for name, tokens in results if name == item]
        summary = await proxy.item(item, requests=len(expected))
        assert summary["total_tokens"] == sum(expected)


@BOTH_DATABASES
async def test_event_ids_are_unique_and_start_with_their_time(proxy: Proxy) -> None:
    """Ids begin with their request's time in milliseconds (ids.py), so the primary key's index grows at
    one edge instead of on a random page per insert."""
    client = proxy.openai(await proxy.new_key())
    for _ in range(5):
        await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-9"})
        await asyncio.sleep(0.002)
    events = await proxy.events(5, work_item="PROJ-9")
    ids = [e["id"] for e in events]
    assert len(set(ids)) == 5 and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    for event in events:
        millis = (parse_iso(event["ts"]) - datetime(1970, 1, 1)) // timedelta(milliseconds=1)
        assert int(event["id"][:12], 16) == millis
    assert [e["id"] for e in sorted(events, key=lambda e: e["ts"])] == sorted(ids)


async def test_provider_errors_pass_through_and_are_recorded(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="fake-500", messages=ASK, extra_headers={"X-Work-Item": "PROJ-5"})
    assert failed.value.status_code == 500
    assert failed.value.body["message"] == "fake provider failure"  # the provider's own body, unchanged
    event = (await proxy.events(1, work_item="PROJ-5"))[0]
    assert (event["status"], event["total_tokens"], event["usage_source"]) == (500, 0, "estimated")


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [(UpstreamError("refused"), 502, "upstream_error"), (UpstreamTimeout("slow"), 504, "upstream_timeout")],
)  # fmt: skip
async def test_transport_failures_become_502_and_504(tmp_path: Path, failure: Exception, status: int, code: str) -> None:
    def fail(request: ProviderRequest) -> MockResponse:
        raise failure

    async for proxy in start_proxy(make_settings(tmp_path), MockProvider(fail)):
        response = await proxy.http.post(
            "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK},
            headers={"authorization": f"Bearer {await proxy.new_key()}", "X-Work-Item": "PROJ-6"},
        )  # fmt: skip
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
        event = (await proxy.events(1, work_item="PROJ-6"))[0]
        assert (event["status"], event["error"]) == (status, code)


async def test_refused_connection_on_loopback_is_502(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = make_settings(tmp_path, provider_url=f"http://127.0.0.1:{port}/v1")
    async for proxy in start_proxy(settings, provider=None):  # the production client
        with pytest.raises(openai.APIStatusError) as failed:
            await proxy.openai(await proxy.new_key()).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-2"})
        assert failed.value.status_code == 502 and failed.value.body["code"] == "upstream_error"


ACCOUNT_HEADERS = [
    (b"x-ratelimit-limit-tokens", b"2000000"), (b"x-ratelimit-remaining-tokens", b"1998240"), (b"x-ratelimit-remaining-requests", b"4999"),
    (b"x-ratelimit-reset-tokens", b"52ms"), (b"anthropic-ratelimit-tokens-remaining", b"79000"), (b"openai-organization", b"org-the-company"),
    (b"openai-project", b"proj_the-company"), (b"anthropic-organization-id", b"0c1e9e1d"), (b"x-request-id", b"req_123"), (b"openai-processing-ms", b"7"),
]  # fmt: skip


async def test_the_provider_accounts_rate_limits_are_not_relayed(tmp_path: Path, fake: Any) -> None:
    """Every key shares the provider account: its remaining tokens, read before and after another
    person's request, were that person's tokens. Dropped, with the account's organization and
    project, by the production client; the request's own headers still pass."""
    from taskproxy.localserver import serve_in_thread

    inner = fake.app()

    async def with_account_headers(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *ACCOUNT_HEADERS]}
            await send(message)

        await inner(scope, receive, sending)

    with serve_in_thread(with_account_headers) as url:
        async for proxy in start_proxy(make_settings(tmp_path, provider_url=f"{url}/v1"), provider=None):  # the production client
            client = proxy.openai(await proxy.new_key())
            for stream in (False, True):
                raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ASK, stream=stream,
                                                                             extra_headers={"X-Work-Item": "PROJ-5"})  # fmt: skip
                names = set(raw.headers.keys())
                assert not {n for n in names if "ratelimit" in n or n in ("openai-organization", "openai-project", "anthropic-organization-id")}, names
                assert raw.headers["x-request-id"] == "req_123" and raw.headers["openai-processing-ms"] == "7"
                if stream:
                    async for _ in raw.parse():
                        pass


@pytest.mark.parametrize("stream", [False, True])
async def test_a_providers_huge_response_headers_are_cut_to_a_bound_and_the_answer_stays_readable(tmp_path: Path, stream: bool) -> None:
    """A provider answering with a hundred 8 KB headers (~800 KB, under aiohttp's own limits) had them
    all relayed: the client's HTTP library gave up on the answer (httpx over a socket: "Receive buffer
    too long"), and the request was recorded as answered (found by a review). At most 16 KiB of a
    provider's headers go to the client, its content type always."""
    reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}  # fmt: skip
    huge = [(f"x-trace-{n}", "v" * 8000) for n in range(100)]
    chunk = b"data: " + orjson.dumps({**reply, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hi."}}]}) + b"\n\n"

    def answer(request: Any) -> MockResponse:
        if stream:
            return MockResponse.sse([chunk, b"data: " + orjson.dumps({**reply, "object": "chat.completion.chunk", "choices": []}) + b"\n\n",
                                     b"data: [DONE]\n\n"], headers=[*huge, ("x-request-id", "req_9")])  # fmt: skip
        return MockResponse.json(reply, headers=[*huge, ("x-request-id", "req_9")])

    async for proxy in start_proxy(make_settings(tmp_path), MockProvider(answer)):
        client = proxy.openai(await proxy.new_key())
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ASK, stream=stream,
                                                                     extra_headers={"X-Work-Item": "PROJ-3"})  # fmt: skip
        relayed = sum(len(name) + len(value) + 4 for name, value in raw.headers.raw if name.lower().startswith(b"x-trace-"))
        assert 0 < relayed <= 16 * 1024 and raw.headers["content-type"].startswith("text/event-stream" if stream else "application/json")
        if stream:
            async for _ in raw.parse():
                pass
        else:
            assert raw.parse().choices[0].message.content == "Hi."


async def test_usage_is_estimated_when_the_provider_reports_none(tmp_path: Path) -> None:
    reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world, twice: hello world."}, "finish_reason": "stop"}]}  # fmt: skip
    async for proxy in start_proxy(make_settings(tmp_path), MockProvider(lambda request: MockResponse.json(reply))):
        await proxy.openai(await proxy.new_key()).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-3"})
        event = (await proxy.events(1, work_item="PROJ-3"))[0]
        import tiktoken

        encoding = tiktoken.get_encoding("o200k_base")
        assert event["usage_source"] == "estimated"
        assert event["completion_tokens"] == len(encoding.encode("Hello world, twice: hello world."))
        # OpenAI's chat rule: 3 tokens per message + the role and content, + 3 to prime the reply
        assert event["prompt_tokens"] == event["est_prompt_tokens"] == 3 + 1 + len(encoding.encode(ASK[0]["content"])) + 3


async def test_completions_embeddings_and_models(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    completion = await client.completions.create(model="gpt-4o-mini", prompt="Say hi", extra_headers={"X-Work-Item": "PROJ-4"})
    embedding = await client.embeddings.create(model="gpt-4o-mini", input=["one two", "three"], extra_headers={"X-Work-Item": "PROJ-4"})
    assert len(embedding.data) == 2
    item = await proxy.item("PROJ-4", requests=2)
    assert item["prompt_tokens"] == completion.usage.prompt_tokens + embedding.usage.prompt_tokens
    assert item["completion_tokens"] == completion.usage.completion_tokens
    models = await client.models.list()
    assert [m.id for m in models.data][:2] == ["gpt-4o-mini", "team-model"]


async def test_unknown_price_is_null_never_zero(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    await client.chat.completions.create(model="unpriced", messages=ASK, extra_headers={"X-Work-Item": "PROJ-10"})
    item = await proxy.item("PROJ-10", requests=1)
    assert item["cost_usd"] is None and item["unpriced_attempts"] == 1 and item["total_tokens"] > 0


async def test_config_price_override_is_used(tmp_path: Path, fake) -> None:  # type: ignore[no-untyped-def]
    models = [{"name": "gpt-4o-mini", "base_url": PROVIDER_URL, "pricing": {"input_per_million": 1.0, "output_per_million": 2.0}}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider.asgi(fake.app()), fake):
        reply = await proxy.openai(await proxy.new_key()).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-11"})
        item = await proxy.item("PROJ-11", requests=1)
        assert item["cost_usd"] == pytest.approx(reply.usage.prompt_tokens * 1e-6 + reply.usage.completion_tokens * 2e-6)


async def test_a_finished_request_leaves_nothing_for_the_garbage_collector(proxy: Proxy) -> None:
    """What relaying a request builds is freed when it ends, not left in reference cycles: an idle
    server may not run a full collection for a long time, and what cycles hold stays resident (it
    held ~2 MiB after a load test before the client watch stopped making one)."""
    client = proxy.openai(await proxy.new_key())
    await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-40"})
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-40"})
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True, extra_headers={"X-Work-Item": "PROJ-40"})
            assert [chunk async for chunk in stream]
        await asyncio.sleep(0.1)  # the watchers' cancellations run
        left = [o for o in gc.get_objects() if isinstance(o, ClientWatch)]
    finally:
        gc.enable()
    assert left == []
