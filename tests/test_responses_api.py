"""The Responses API's other routes, with the official `openai` SDK as the client: remote compaction
(billed to the work item), input_tokens (counted, nothing billed), a stored response read back by id
(the person who created it only, no work item needed), a background response billed once when it is
read back finished, a request without `model`, and `GET /v1/models/{id}`. In-process on SQLite and
PostgreSQL, then through a real `taskproxy serve` so the production HTTP client sends the GETs and
DELETEs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import BOTH_DATABASES, Proxy, make_settings, start_proxy
from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, wait_until, write_config
from taskproxy.fake_provider import FakeProvider, prompt_tokens_of
from taskproxy.upstream.mock import MockProvider, MockResponse

pytestmark = pytest.mark.anyio

INPUT = [{"role": "user", "content": "Summarise the retry policy of the refund worker."}]
ITEM = {"X-Work-Item": "PROJ-31"}


@BOTH_DATABASES
async def test_compaction_is_billed_to_the_work_item_and_needs_one(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    compacted = await client.responses.compact(model="gpt-4o-mini", input=INPUT, extra_headers=ITEM)
    assert compacted.object == "response.compaction" and compacted.output[0].type == "compaction"

    event = (await proxy.events(1, work_item="PROJ-31"))[0]
    assert event["route"] == "/v1/responses/compact" and event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (compacted.usage.input_tokens, compacted.usage.output_tokens)
    assert proxy.received[-1]["path"] == "/v1/responses/compact"

    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.compact(model="gpt-4o-mini", input=INPUT)
    assert refused.value.code == "work_item_required"


async def test_input_tokens_are_the_providers_count_and_bill_nothing(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    counted = await client.responses.input_tokens.count(model="gpt-4o-mini", input=INPUT, extra_headers={"X-Work-Item": "PROJ-32"})
    assert counted.input_tokens == prompt_tokens_of(proxy.received[-1]["body"])
    event = (await proxy.events(1, work_item="PROJ-32"))[0]
    assert event["route"] == "/v1/responses/input_tokens" and event["total_tokens"] == 0 and event["cost_usd"] in (0, None)


@BOTH_DATABASES
async def test_a_stored_response_is_read_back_by_its_creator_only(proxy: Proxy) -> None:
    dana, lee = await proxy.new_key(owner="dana"), await proxy.new_key(owner="lee")
    created = await proxy.openai(dana).responses.create(model="team-model", input="Plan the migration.", extra_headers={"X-Work-Item": "PROJ-33"})

    again = await proxy.openai(dana).responses.retrieve(created.id)  # no work item: reading generates nothing
    assert again.id == created.id and again.output_text == created.output_text
    assert proxy.received[-1]["path"] == f"/v1/responses/{created.id}"
    assert proxy.received[-1]["headers"]["authorization"] == "Bearer sk-provider-secret"  # the configured provider key
    items = await proxy.openai(dana).responses.input_items.list(created.id)
    assert items.data[0].content[0].text == "Plan the migration."

    with pytest.raises(openai.NotFoundError) as hidden:
        await proxy.openai(lee).responses.retrieve(created.id)
    assert created.id in str(hidden.value) and hidden.value.code == "not_found"
    with pytest.raises(openai.NotFoundError):
        await proxy.openai(dana).responses.retrieve("resp_never_made")

    await proxy.openai(dana).responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):  # the provider's own 404, relayed
        await proxy.openai(dana).responses.retrieve(created.id)
    events = await proxy.events(1, work_item="PROJ-33")
    assert len(events) == 1, "reading a stored response back was recorded as usage"


@BOTH_DATABASES
async def test_a_previous_response_id_with_a_control_character_is_refused_as_invalid(proxy: Proxy) -> None:
    """A NUL in the id made PostgreSQL refuse the lookup, answered as the database not answering: a 503
    the SDKs retry, counted as an outage (found by a review). No provider's id holds one."""
    key = await proxy.new_key()
    body = {"model": "team-model", "input": "Go on.", "previous_response_id": "resp_\u0000x"}
    refused = await proxy.http.post("/v1/responses", json=body, headers={"authorization": f"Bearer {key}", "x-work-item": "PROJ-38"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "previous_response_id", refused.text
    assert proxy.received == []


@BOTH_DATABASES
async def test_a_response_is_continued_only_by_its_creator(proxy: Proxy) -> None:
    """Every key shares the provider account: another person's `previous_response_id` had the provider
    continue that conversation (its input counted in the answer's usage, its text repeatable), though
    reading the response back was refused. Now refused alike on each route that takes one, before the
    provider; the creator's other key (its owner typed otherwise) may continue it."""
    dana, dana_laptop, lee = await proxy.new_key(owner="dana"), await proxy.new_key(owner="Dana "), await proxy.new_key(owner="lee")
    created = await proxy.openai(dana).responses.create(model="team-model", input="Plan the migration.", extra_headers={"X-Work-Item": "PROJ-36"})
    await proxy.events(1, work_item="PROJ-36")  # recorded: an id learnt from a log or a transcript comes later than that
    sent = len(proxy.received)

    other = proxy.openai(lee)
    for attempt in (
        lambda: other.responses.create(model="team-model", input="Go on.", previous_response_id=created.id, extra_headers={"X-Work-Item": "PROJ-37"}),
        lambda: other.responses.compact(model="gpt-4o-mini", input=INPUT, previous_response_id=created.id, extra_headers={"X-Work-Item": "PROJ-37"}),
        lambda: other.responses.input_tokens.count(model="gpt-4o-mini", input="Go on.", previous_response_id=created.id, extra_headers={"X-Work-Item": "PROJ-37"}),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            await attempt()
        assert refused.value.code == "not_found" and refused.value.param == "previous_response_id", refused.value
    assert len(proxy.received) == sent, "a refused continuation reached the provider"

    went_on = await proxy.openai(dana_laptop).responses.create(model="team-model", input="Go on.", previous_response_id=created.id, extra_headers={"X-Work-Item": "PROJ-36"})
    assert went_on.status == "completed" and proxy.received[-1]["body"]["previous_response_id"] == created.id
    assert len(await proxy.events(2, work_item="PROJ-36")) == 2
    # An id the proxy never recorded is no one's (or was created a moment ago on another replica): passed on, not waited for.
    started = time.monotonic()
    await proxy.openai(lee).responses.create(model="team-model", input="Go on.", previous_response_id="resp_not_through_the_proxy", extra_headers={"X-Work-Item": "PROJ-37"})
    assert proxy.received[-1]["body"]["previous_response_id"] == "resp_not_through_the_proxy" and time.monotonic() - started < 1.0


@BOTH_DATABASES
async def test_a_background_response_is_billed_once_when_read_back_finished(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-34"})
    assert queued.status == "queued" and queued.usage is None
    created = (await proxy.events(1, work_item="PROJ-34"))[0]
    assert created["usage_source"] == "deferred" and created["total_tokens"] == 0

    finished = await client.responses.retrieve(queued.id)
    assert finished.status == "completed" and finished.usage is not None
    for _ in range(3):  # polled again, and cancelled: billed once all the same
        await client.responses.retrieve(queued.id)
    await client.responses.cancel(queued.id)

    item = await proxy.item("PROJ-34", requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)
    events = await proxy.get("/api/usage/events", work_item="PROJ-34")
    assert sorted(e["usage_source"] for e in events) == ["deferred", "provider"]


@BOTH_DATABASES
async def test_a_background_response_read_only_as_a_stream_is_billed_once(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-35"})
    assert queued.status == "queued"

    for _ in range(2):  # read twice, to the end: billed once all the same
        async with await client.responses.retrieve(queued.id, stream=True) as stream:
            events = [event async for event in stream]
        assert proxy.received[-1]["query"] == "stream=true"
    finished = events[-1].response
    assert events[-1].type == "response.completed" and finished.usage is not None

    item = await proxy.item("PROJ-35", requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)
    events_stored = await proxy.get("/api/usage/events", work_item="PROJ-35")
    assert sorted(e["usage_source"] for e in events_stored) == ["deferred", "provider"]


@BOTH_DATABASES
async def test_a_background_stream_cut_before_its_end_bills_nothing_until_a_read_sees_the_end(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    queued = await client.responses.create(model="fake-cut", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-36"})
    with pytest.raises(openai.APIError):  # the provider cuts its stream halfway: the proxy says so in-band
        async with await client.responses.retrieve(queued.id, stream=True) as stream:
            async for _ in stream:
                pass
    await proxy.item("PROJ-36", requests=1)  # the deferred create alone
    assert [e["usage_source"] for e in await proxy.get("/api/usage/events", work_item="PROJ-36")] == ["deferred"]

    finished = await client.responses.retrieve(queued.id)
    item = await proxy.item("PROJ-36", requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)


@BOTH_DATABASES
async def test_a_background_create_whose_stream_is_cut_is_billed_whole_by_the_read_that_sees_it_finished(proxy: Proxy) -> None:
    """`background: true, stream: true`, the stream cut before its end (the connection to the provider
    lost): the provider goes on generating. The create was billed as the part relayed so far,
    estimated, and no read ever billed the rest; now it is deferred, and the read that sees the
    response finished bills all of it, once."""
    client = proxy.openai(await proxy.new_key())
    item = "PROJ-45"
    seen = []
    with pytest.raises(openai.APIError):  # the proxy says in-band that the provider cut it
        async with await client.responses.create(model="fake-cut", input=INPUT, background=True, stream=True,
                                                 extra_headers={"X-Work-Item": item}) as stream:  # fmt: skip
            async for event in stream:
                seen.append(event)
    [created] = await proxy.events(1, work_item=item)
    assert (created["usage_source"], created["completion_tokens"]) == ("deferred", 0), created

    finished = await client.responses.retrieve(seen[0].response.id)
    assert finished.status == "completed" and finished.usage is not None
    billed = await proxy.item(item, requests=2)
    assert (billed["prompt_tokens"], billed["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)
    await client.responses.retrieve(seen[0].response.id)
    assert len(await proxy.get("/api/usage/events", work_item=item)) == 2


async def test_a_background_response_read_cut_short_then_deleted_is_billed_by_the_delete(proxy: Proxy) -> None:
    """Read as a stream cut halfway, then deleted: no read could bill it afterwards, and its generation
    stayed unbilled for good. The delete reads it once first, and bills it, then deletes it."""
    client = proxy.openai(await proxy.new_key())
    queued = await client.responses.create(model="fake-cut", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-39"})
    with pytest.raises(openai.APIError):
        async with await client.responses.retrieve(queued.id, stream=True) as stream:
            async for _ in stream:
                pass
    deleted = await client.responses.delete(queued.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    assert proxy.received[-1]["method"] == "DELETE"
    item = await proxy.item("PROJ-39", requests=2)
    assert item["prompt_tokens"] > 0 and item["completion_tokens"] > 0
    assert sorted(e["usage_source"] for e in await proxy.get("/api/usage/events", work_item="PROJ-39")) == ["deferred", "provider"]


@BOTH_DATABASES
async def test_a_cancelled_background_response_is_billed_by_the_first_read_that_shows_its_usage(proxy: Proxy) -> None:
    assert proxy.fake is not None
    client = proxy.openai(await proxy.new_key())
    stopped = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-37"})
    cancelled = await client.responses.cancel(stopped.id)  # cancelled in time: the provider says nothing was made
    assert cancelled.status == "cancelled" and cancelled.usage is None
    assert (await client.responses.retrieve(stopped.id)).status == "cancelled"

    proxy.fake.cancels_lose_race = True
    raced = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-38"})
    assert (await client.responses.cancel(raced.id)).usage is None
    finished = await client.responses.retrieve(raced.id)  # the generation won the race: it finished after all
    assert finished.status == "completed" and finished.usage is not None

    item = await proxy.item("PROJ-38", requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)
    # The writer records in order: PROJ-37's reads, made before, would be written by now.
    assert [e["usage_source"] for e in await proxy.get("/api/usage/events", work_item="PROJ-37")] == ["deferred"]


ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}  # fmt: skip


@BOTH_DATABASES
async def test_a_read_bills_a_background_response_once_it_is_final_with_or_without_usage(proxy: Proxy) -> None:
    assert proxy.fake is not None
    client = proxy.openai(await proxy.new_key())
    queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-41"})
    stored = proxy.fake.stored[queued.id]
    finished_body = stored["response"]
    # A provider's body for a response still generating may carry a usage object of zeros: not its usage.
    stored["response"] = {**finished_body, "status": "in_progress", "output": [], "usage": ZERO_USAGE}
    assert (await client.responses.retrieve(queued.id)).status == "in_progress"
    stored["response"] = finished_body
    finished = await client.responses.retrieve(queued.id)
    assert finished.status == "completed" and finished.usage is not None and finished.usage.output_tokens > 0
    item = await proxy.item("PROJ-41", requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)

    # A response that completed, read from a provider that sends no usage, is billed all the same: by estimate.
    queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-42"})
    proxy.fake.stored[queued.id]["response"] = {**proxy.fake.stored[queued.id]["response"], "usage": None}
    finished = await client.responses.retrieve(queued.id)
    assert finished.status == "completed" and finished.usage is None
    item = await proxy.item("PROJ-42", requests=2)
    events = await proxy.get("/api/usage/events", work_item="PROJ-42")
    assert sorted(e["usage_source"] for e in events) == ["deferred", "estimated"]
    assert item["completion_tokens"] == len(finished.output_text.split()) > 0, item


LONG_INSTRUCTIONS = "Follow the repository's conventions. " * 3000  # ~110 KB, repeated in the response: more than a capture keeps


@BOTH_DATABASES
async def test_a_streamed_answer_whose_last_event_is_larger_than_the_kept_tail_is_billed_exactly(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    stream = await client.responses.create(model="gpt-4o-mini", input=INPUT, instructions=LONG_INSTRUCTIONS, stream=True,
                                           extra_headers={"X-Work-Item": "PROJ-38"})  # fmt: skip
    events = [event async for event in stream]
    finished = events[-1].response
    assert events[-1].type == "response.completed" and len(finished.model_dump_json()) > 100_000
    [event] = await proxy.events(1, work_item="PROJ-38")
    assert event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)


async def test_a_background_response_too_large_to_keep_is_billed_from_its_ends(tmp_path: Path, fake: FakeProvider) -> None:
    settings = make_settings(tmp_path, limits={"max_buffered_response_bytes": 4096})  # the finished response is relayed as it arrives
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        client = proxy.openai(await proxy.new_key())
        for item, streamed in (("PROJ-37", False), ("PROJ-40", True)):
            queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, instructions=LONG_INSTRUCTIONS, background=True,
                                                   extra_headers={"X-Work-Item": item})  # fmt: skip
            if streamed:
                async with await client.responses.retrieve(queued.id, stream=True) as stream:
                    finished = [event async for event in stream][-1].response
            else:
                # Still generating, its body carrying a usage object of zeros: relayed, and not billed.
                stored = fake.stored[queued.id]
                finished_body = stored["response"]
                stored["response"] = {**finished_body, "status": "in_progress", "output": [], "usage": ZERO_USAGE}
                assert (await client.responses.retrieve(queued.id)).status == "in_progress"
                stored["response"] = finished_body
                finished = await client.responses.retrieve(queued.id)
            assert finished.status == "completed" and len(finished.model_dump_json()) > 100_000
            billed = await proxy.item(item, requests=2)
            assert (billed["prompt_tokens"], billed["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)


async def test_a_finished_background_response_with_more_values_than_a_request_may_hold_is_read_and_billed(tmp_path: Path, fake: FakeProvider) -> None:
    """The check that a read settles a background response decoded its body with the limit of a
    request's JSON values: a finished response over it (large, `limits.max_json_nodes`) answered the
    client's read 413 and was never billed (found by a review). It is judged from its ends instead."""
    settings = make_settings(tmp_path, limits={"max_json_nodes": 20})  # a request here holds ~10; the response ~30
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        client = proxy.openai(await proxy.new_key())
        queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, instructions="x" * 300_000, background=True,
                                               extra_headers={"X-Work-Item": "PROJ-47"})  # fmt: skip
        finished = await client.responses.retrieve(queued.id)
        assert finished.status == "completed" and finished.usage is not None
        billed = await proxy.item("PROJ-47", requests=2)
        assert (billed["prompt_tokens"], billed["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)


async def test_a_request_without_model_is_refused_with_what_to_send(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(input="hello", extra_headers=ITEM)  # type: ignore[call-overload]
    assert refused.value.code == "invalid_request" and refused.value.param == "model"
    assert "gpt-4o-mini" in refused.value.message and "responses.default_model" in refused.value.message
    assert not proxy.received


async def test_responses_default_model_takes_a_request_without_model(tmp_path: Path, fake: FakeProvider) -> None:
    settings = make_settings(tmp_path, responses={"default_model": "team-model"})
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        response = await proxy.openai(await proxy.new_key()).responses.create(input="hello", extra_headers=ITEM)  # type: ignore[call-overload]
        assert response.status == "completed"
        assert proxy.received[-1]["body"]["model"] == "gpt-4.1"  # team-model's upstream name
        assert (await proxy.events(1, work_item="PROJ-31"))[0]["model"] == "team-model"


def test_default_model_must_be_a_configured_openai_compatible_model(tmp_path: Path) -> None:
    from taskproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="responses.default_model"):
        make_settings(tmp_path, responses={"default_model": "nope"})


async def test_models_are_listed_and_retrieved_by_id(proxy: Proxy) -> None:
    client = proxy.openai(await proxy.new_key())
    model = await client.models.retrieve("team-model")
    assert (model.id, model.object) == ("team-model", "model")
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.models.retrieve("gpt-9")
    assert unknown.value.code == "model_not_found" and "team-model" in unknown.value.message
    with pytest.raises(openai.AuthenticationError):
        await proxy.openai("tp-wrong").models.retrieve("team-model")


async def test_stored_chat_completions_are_refused_with_a_reason(proxy: Proxy) -> None:
    headers = {"authorization": f"Bearer {await proxy.new_key()}"}
    listing = await proxy.http.get("/v1/chat/completions", headers=headers)
    assert listing.status_code == 405 and "stored chat completions" in listing.json()["error"]["message"]
    one = await proxy.http.get("/v1/chat/completions/chatcmpl-1/messages", headers=headers)
    assert one.status_code == 404 and "stored chat completions" in one.json()["error"]["message"]


def _background_response(status: str, usage: dict | None = None) -> MockResponse:
    return MockResponse.json({"id": "resp_bg", "object": "response", "created_at": 1, "status": status, "background": True, "model": "gpt-4o-mini",
                              "output": [], "usage": usage})  # fmt: skip


async def _delete_after_create(tmp_path: Path, answer: Callable[[Any], Any], item: str) -> AsyncIterator[tuple[httpx.Response, float, Proxy]]:
    """A background response created through a proxy of `answer` (`max_response_seconds` 1), then
    deleted: the delete's answer, how long it took, and the proxy (still running: used inside)."""
    models = [{"name": "gpt-4o-mini", "base_url": "http://provider.test/v1", "api_key_env": "TEST_PROVIDER_KEY", "max_response_seconds": 1}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider(answer)):
        key = await proxy.new_key()
        queued = await proxy.openai(key).responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": item})
        await proxy.events(1, work_item=item)
        started = time.monotonic()
        deleted = await proxy.http.delete(f"/v1/responses/{queued.id}", headers={"authorization": f"Bearer {key}"})
        yield deleted, time.monotonic() - started, proxy


async def test_a_delete_that_reads_its_response_first_answers_within_twice_max_response_seconds(tmp_path: Path) -> None:
    """A delete of a background response not yet billed reads it first, within `max_response_seconds`,
    then deletes it within as long again, whatever the read did: a provider that never answers holds
    the client twice that at most, and still gets the delete. (Cutting the read at half the time to
    keep within one deadline deleted finished responses slow to come unbilled: a review found it.)"""
    asked: list[str] = []

    async def answer(request: Any) -> MockResponse:
        asked.append(request.method)
        if request.method == "POST":
            return _background_response("queued")
        await asyncio.sleep(30)  # its status and headers never come in time
        return MockResponse.json({"id": "resp_bg", "object": "response.deleted", "deleted": True})

    async for deleted, took, _ in _delete_after_create(tmp_path, answer, "PROJ-44"):
        assert deleted.status_code == 504 and deleted.json()["error"]["code"] == "upstream_timeout" and 1.9 < took < 2.5, (deleted.status_code, took)
        assert asked == ["POST", "GET", "DELETE"]  # read first, then the delete all the same


async def test_a_finished_response_slow_to_come_is_billed_before_its_delete(tmp_path: Path) -> None:
    """The read before a delete gets the model's whole `max_response_seconds`: a finished background
    response that took 0.6 s of 1 to come was deleted unbilled when the read had half (found by a review)."""

    async def answer(request: Any) -> MockResponse:
        if request.method == "POST":
            return _background_response("queued")
        if request.method == "GET":
            await asyncio.sleep(0.6)
            return _background_response("completed", {"input_tokens": 900, "output_tokens": 100, "total_tokens": 1000})
        return MockResponse.json({"id": "resp_bg", "object": "response.deleted", "deleted": True})

    async for deleted, _, proxy in _delete_after_create(tmp_path, answer, "PROJ-45"):
        assert deleted.status_code == 200, deleted.text
        item = await proxy.item("PROJ-45", requests=2)
        assert item["total_tokens"] == 1000


# -- through a real `taskproxy serve`: the production client sends GET, POST and DELETE -------------


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("responses")
    config = write_config(folder, upstream.url, models=[{"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"}])
    with running_server(config, folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as running:
        yield running


@pytest.mark.serve
def test_stored_routes_through_a_real_server(server: ServerProcess, upstream: FakeUpstream) -> None:
    client = server.openai(server.new_key(owner="ari"), default_headers={"X-Work-Item": "PROJ-35"})
    queued = client.responses.create(model="gpt-4o-mini", input="Write the changelog.", background=True)
    finished = client.responses.retrieve(queued.id)
    assert finished.status == "completed" and finished.usage is not None
    assert client.responses.cancel(queued.id).status == "cancelled"
    assert client.responses.delete(queued.id) is None
    # read (and billed), cancelled, deleted: a delete reads a background response first only while its usage is owed
    assert [(r["method"], r["path"]) for r in upstream.received[-3:]] == [("GET", f"/v1/responses/{queued.id}"), ("POST", f"/v1/responses/{queued.id}/cancel"),
                                                                          ("DELETE", f"/v1/responses/{queued.id}")]  # fmt: skip
    item = server.work_item("PROJ-35", expected_requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)


@pytest.mark.serve
def test_a_background_response_read_as_a_stream_through_a_real_server_is_billed(server: ServerProcess) -> None:
    client = server.openai(server.new_key(owner="ari"), default_headers={"X-Work-Item": "PROJ-39"})
    queued = client.responses.create(model="gpt-4o-mini", input="Write the release notes.", background=True)
    with client.responses.retrieve(queued.id, stream=True) as stream:
        events = list(stream)
    finished = events[-1].response
    assert events[-1].type == "response.completed" and finished.usage is not None
    item = server.work_item("PROJ-39", expected_requests=2)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (finished.usage.input_tokens, finished.usage.output_tokens)


def _one_background_response(read: Callable[[], MockResponse], seen: list[str]) -> MockProvider:
    """A provider holding one background response, queued when created: each read of it answers `read()`
    (which may raise, as a failing transport does), a delete deletes it; `seen` gets each method."""

    def answer(request: Any) -> MockResponse:
        seen.append(request.method)
        if request.method == "POST":
            return MockResponse.json({"id": "resp_bg", "object": "response", "created_at": 1, "status": "queued", "background": True,
                                      "model": "gpt-4o-mini", "output": [], "usage": None})  # fmt: skip
        if request.method == "GET":
            return read()
        return MockResponse.json({"id": "resp_bg", "object": "response.deleted", "deleted": True})

    return MockProvider(answer)


@pytest.mark.parametrize("failure", ["connection", "timeout"])
async def test_a_delete_goes_through_when_the_read_before_it_fails(tmp_path: Path, failure: str) -> None:
    """The read that bills a background response before its delete is best effort: a provider whose
    read fails still gets the delete, and the client its answer."""
    from taskproxy.errors import UpstreamError, UpstreamTimeout

    def fails() -> MockResponse:
        raise UpstreamError("the provider cut the connection") if failure == "connection" else UpstreamTimeout("the provider did not answer")

    seen: list[str] = []
    async for proxy in start_proxy(make_settings(tmp_path), _one_background_response(fails, seen)):
        client = proxy.openai(await proxy.new_key())
        queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-43"})
        await proxy.events(1, work_item="PROJ-43")  # its origin recorded
        await client.responses.delete(queued.id)
    assert seen == ["POST", "GET", "DELETE"]


async def test_a_stored_response_read_a_byte_at_a_time_is_cut_at_max_response_seconds(tmp_path: Path) -> None:
    """Reading a stored response back, a provider that sends it a byte at a time held the client as long
    as it went on (only the gap between two reads was bounded): it is cut at `max_response_seconds`, 504,
    and a delete's read before it is bounded too."""
    async def dribble() -> Any:
        for byte in b'{"id": "resp_bg", "status": "completed"' * 100:
            await asyncio.sleep(0.05)
            yield bytes([byte])

    def read() -> MockResponse:
        return MockResponse(200, [("content-type", "application/json")], chunks=dribble())

    seen: list[str] = []
    models = [{"name": "gpt-4o-mini", "base_url": "http://provider.test/v1", "api_key_env": "TEST_PROVIDER_KEY", "max_response_seconds": 0.5}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), _one_background_response(read, seen)):
        key = await proxy.new_key()
        client = proxy.openai(key)
        queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-44"})
        await proxy.events(1, work_item="PROJ-44")
        started = time.monotonic()
        read = await proxy.http.get(f"/v1/responses/{queued.id}", headers={"authorization": f"Bearer {key}"})
        assert read.status_code == 504 and read.json()["error"]["code"] == "upstream_timeout", read.text
        started_delete = time.monotonic()
        deleted = await proxy.http.delete(f"/v1/responses/{queued.id}", headers={"authorization": f"Bearer {key}"})
        assert deleted.status_code == 200, deleted.text
        assert started_delete - started < 3 and time.monotonic() - started_delete < 3
    assert seen == ["POST", "GET", "GET", "DELETE"]


@pytest.mark.serve
def test_a_stored_response_whose_provider_stalls_its_headers_is_cut_at_max_response_seconds(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The stored-response routes waited for the provider's status and headers without limit (only the
    body was bounded): a provider sending them a byte every 0.3 s, each within the read timeout, held
    the client of a model with max_response_seconds 1 for 12 s, and clients that gave up left their
    requests open at the provider. The whole exchange is within max_response_seconds (504
    upstream_timeout), and a client that hangs up before its answer starts ends the provider's request."""
    base = f"{upstream.url}/v1"
    models = [{"name": "stalled", "base_url": base, "upstream_model": "fake-stalled-read", "max_response_seconds": 1, "read_timeout_seconds": 30},
              {"name": "stalled-long", "base_url": base, "upstream_model": "fake-stalled-read", "max_response_seconds": 60}]  # fmt: skip
    config = write_config(tmp_path, upstream.url, models=models)
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
        key = server.new_key()
        client = server.openai(key, default_headers={"X-Work-Item": "PROJ-45"})
        cut, held = (client.responses.create(model=model, input="Write the changelog.").id for model in ("stalled", "stalled-long"))
        auth = {"authorization": f"Bearer {key}"}
        for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/input_items"), ("DELETE", "")):
            started = time.monotonic()
            answer = httpx.request(method, f"{server.url}/v1/responses/{cut}{path}", headers=auth, timeout=15, trust_env=False)
            took = time.monotonic() - started
            assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout", (method, path, answer.text)
            assert took < 2.5, (method, path, round(took, 1))
        wait_until(lambda: upstream.fake.active, lambda active: active == 0, 2, what="the provider's timed-out reads ended")
        for _ in range(5):  # pollers giving up after 0.5 s, long before max_response_seconds (60)
            with pytest.raises(httpx.TimeoutException):
                httpx.get(f"{server.url}/v1/responses/{held}", headers=auth, timeout=0.5, trust_env=False)
        wait_until(lambda: upstream.fake.active, lambda active: active == 0, 1.5, what="the provider's reads ended when their clients left")
