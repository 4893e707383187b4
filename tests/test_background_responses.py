"""A background response (Responses API, `background: true`) that no client reads back is read by the
proxy itself and billed once it is finished (background.Collector, `recording.collect_background_after_seconds`):
before, it stayed unbilled for good, a client that crashed after its create leaving the whole
generation out of the measure. In-process on SQLite and PostgreSQL with the official `openai` SDK
as the client and the fake provider behind `MockProvider`; two replicas on one database share the
reads."""

from __future__ import annotations

import asyncio
import functools
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import BOTH_DATABASES, PROVIDER_KEY, Proxy, make_settings, start_proxy, wait_until
from taskproxy.fake_provider import FakeProvider
from taskproxy.storage.db import make_engine
from taskproxy.storage.models import BackgroundResponse
from taskproxy.upstream.mock import MockProvider

pytestmark = pytest.mark.anyio

INPUT = [{"role": "user", "content": "Draft the migration plan for the ledger tables."}]
AFTER = 0.3  # seconds after its create before the proxy reads a response itself


def _settings(tmp_path: Path, database_url: str, after: float | None = AFTER) -> Any:
    recording = {**make_settings(tmp_path).recording.model_dump(), "collect_background_after_seconds": after}
    return make_settings(tmp_path, database_url=database_url, recording=recording)


def _reads(fake: FakeProvider, response_id: str) -> list[dict]:
    return [r for r in fake.received if r.get("method") == "GET" and r["path"] == f"/v1/responses/{response_id}"]


async def _owed(proxy: Proxy) -> list[str]:
    """The responses the database says are owed."""

    def read() -> list[str]:
        with _engine(proxy.settings.database_url).connect() as connection:
            return list(connection.execute(select(BackgroundResponse.response_id)).scalars())

    return await asyncio.to_thread(read)


async def _read_count(fake: FakeProvider, response_id: str) -> int:
    return len(_reads(fake, response_id))


@functools.cache
def _engine(url: str) -> Any:
    return make_engine(url)


async def _create(proxy: Proxy, item: str) -> Any:
    client = proxy.openai(await proxy.new_key())
    return await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": item})


@BOTH_DATABASES
async def test_a_background_response_nobody_reads_back_is_read_and_billed_by_the_proxy(tmp_path: Path, fake: FakeProvider,
                                                                                         database_url: str) -> None:  # fmt: skip
    async for proxy in start_proxy(_settings(tmp_path, database_url), MockProvider.asgi(fake.app()), fake):
        queued = await _create(proxy, "PROJ-61")
        assert queued.status == "queued"
        finished = fake.stored[queued.id]["response"]
        item = await proxy.item("PROJ-61", requests=2, timeout=10)  # the deferred create, then its usage
        usage = finished["usage"]
        assert (item["prompt_tokens"], item["completion_tokens"]) == (usage["input_tokens"], usage["output_tokens"]) and usage["output_tokens"] > 0
        events = await proxy.get("/api/usage/events", work_item="PROJ-61")
        assert sorted(e["usage_source"] for e in events) == ["deferred", "provider"]
        [read] = _reads(fake, queued.id)  # one read, with the provider's key, not the client's
        assert read["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
        await wait_until(lambda: _owed(proxy), lambda owed: not owed, what="nothing owed")
        await asyncio.sleep(4 * AFTER)
        assert len(_reads(fake, queued.id)) == 1 and len(await proxy.get("/api/usage/events", work_item="PROJ-61")) == 2


@BOTH_DATABASES
async def test_reads_of_a_finished_response_count_its_usage_once_toward_the_budget(tmp_path: Path, fake: FakeProvider, database_url: str) -> None:
    """Each read that saw it finished before its usage was recorded counted that usage again in this
    process's budgets and metrics, though the database had it once: four reads of a response, a budget
    of one and a half times its tokens, and the item's next request was refused (found by a review)."""
    settings = _settings(tmp_path, database_url, after=None)
    settings = settings.model_copy(update={"recording": settings.recording.model_copy(update={"flush_interval_seconds": 1.0})})
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        client = proxy.openai(await proxy.new_key())
        queued = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-66"})
        tokens = fake.stored[queued.id]["response"]["usage"]["total_tokens"]
        budget = await proxy.http.post("/api/work-items", json={"id": "PROJ-66", "budget_tokens": tokens + tokens // 2}, headers=proxy.admin_headers)
        assert budget.status_code in (200, 201), budget.text
        await asyncio.gather(*(client.responses.retrieve(queued.id) for _ in range(3)))
        await client.responses.retrieve(queued.id)  # one more, before the writer's next flush
        item = await proxy.item("PROJ-66", requests=2, timeout=10)
        assert item["total_tokens"] == tokens
        again = await client.responses.create(model="gpt-4o-mini", input=INPUT, background=True, extra_headers={"X-Work-Item": "PROJ-66"})
        assert again.status == "queued"  # spent: its tokens, under the budget


@BOTH_DATABASES
async def test_an_unfinished_response_is_read_again_until_it_finishes(tmp_path: Path, fake: FakeProvider, database_url: str) -> None:
    async for proxy in start_proxy(_settings(tmp_path, database_url), MockProvider.asgi(fake.app()), fake):
        queued = await _create(proxy, "PROJ-62")
        stored = fake.stored[queued.id]
        finished = stored["response"]
        stored["response"] = {**finished, "status": "in_progress", "output": [], "usage": None}
        await wait_until(lambda: _read_count(fake, queued.id), lambda n: n >= 2, timeout=10, what="two reads while it generates")
        assert [e["usage_source"] for e in await proxy.get("/api/usage/events", work_item="PROJ-62")] == ["deferred"]
        stored["response"] = finished
        item = await proxy.item("PROJ-62", requests=2, timeout=10)
        assert item["completion_tokens"] == finished["usage"]["output_tokens"]


@BOTH_DATABASES
async def test_a_response_the_client_read_back_is_not_read_again(tmp_path: Path, fake: FakeProvider, database_url: str) -> None:
    async for proxy in start_proxy(_settings(tmp_path, database_url, after=1.0), MockProvider.asgi(fake.app()), fake):
        queued = await _create(proxy, "PROJ-63")
        client = proxy.openai(await proxy.new_key())
        assert (await client.responses.retrieve(queued.id)).status == "completed"
        await proxy.item("PROJ-63", requests=2)
        await wait_until(lambda: _owed(proxy), lambda owed: not owed, what="settled by the client's read")
        await asyncio.sleep(2.5)
        assert len(_reads(fake, queued.id)) == 1


@BOTH_DATABASES
async def test_a_response_the_provider_no_longer_holds_is_given_up_on(tmp_path: Path, fake: FakeProvider, database_url: str) -> None:
    async for proxy in start_proxy(_settings(tmp_path, database_url), MockProvider.asgi(fake.app()), fake):
        queued = await _create(proxy, "PROJ-64")
        await proxy.events(1, work_item="PROJ-64")
        del fake.stored[queued.id]  # 404 from now on
        await wait_until(lambda: _read_count(fake, queued.id), timeout=10, what="a read")
        await wait_until(lambda: _owed(proxy), lambda owed: not owed, what="given up")
        await asyncio.sleep(4 * AFTER)
        assert len(_reads(fake, queued.id)) == 1
        assert [e["usage_source"] for e in await proxy.get("/api/usage/events", work_item="PROJ-64")] == ["deferred"]


@BOTH_DATABASES
async def test_two_replicas_read_each_owed_response_once(tmp_path: Path, fake: FakeProvider, database_url: str) -> None:
    """The responses owed are claimed: two processes on one database read each once, and bill it once."""
    settings = _settings(tmp_path, database_url, after=None)  # created with the proxy's own reads off, read by the two below
    ids = []
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        for n in range(12):
            ids.append((await _create(proxy, f"PROJ-{70 + n}")).id)
        await proxy.events(12)
    collecting = _settings(tmp_path, database_url)
    async for first in start_proxy(collecting, MockProvider.asgi(fake.app()), fake):
        async for second in start_proxy(collecting, MockProvider.asgi(fake.app()), fake):
            await wait_until(lambda: _owed(second), lambda owed: not owed, timeout=15, what="every response billed")
            await first.events(24, timeout=5)
    assert sorted(len(_reads(fake, i)) for i in ids) == [1] * 12


async def test_with_the_setting_off_only_clients_reads_bill(tmp_path: Path, fake: FakeProvider) -> None:
    async for proxy in start_proxy(_settings(tmp_path, f"sqlite:///{tmp_path / 'taskproxy.db'}", after=None), MockProvider.asgi(fake.app()), fake):
        queued = await _create(proxy, "PROJ-65")
        await proxy.events(1, work_item="PROJ-65")
        await asyncio.sleep(1.0)
        assert not _reads(fake, queued.id) and await _owed(proxy) == [queued.id]


@BOTH_DATABASES
def test_the_writer_keeps_what_is_owed_and_the_migration_finds_what_was_owed_before_it(database_url: str) -> None:
    """The writer adds a deferred create to what is owed and removes it with the event that settles it,
    in one batch or two, replayed or not; migration 0024 fills the table from the deferred creates of
    the last day that nothing settled (older ones the provider may no longer hold)."""
    import random

    from alembic import command
    from alembic.config import Config
    from test_rollup import event

    from taskproxy.storage import repo
    from taskproxy.storage.background import deferred_event_id
    from taskproxy.storage.db import MIGRATIONS, head_revision, upgrade_schema
    from taskproxy.timeutil import utcnow

    engine = make_engine(database_url)
    upgrade_schema(engine)
    rng, now = random.Random(7), utcnow()

    def create(response_id: str, ago: timedelta) -> dict:
        return event(rng, now - ago, response_id=response_id, usage_source="deferred", route="/v1/responses", status=200, total_tokens=0)

    def settle(created: dict) -> dict:
        return {**event(rng, created["ts"], response_id=created["response_id"], route="/v1/responses", status=200),
                "id": deferred_event_id(created["response_id"]), "work_item": created["work_item"]}  # fmt: skip

    def owed() -> set[str]:
        with engine.connect() as connection:
            return set(connection.execute(select(BackgroundResponse.response_id)).scalars())

    settled_later, settled_at_once, open_one = (create(f"resp_{n}", timedelta(minutes=n + 1)) for n in range(3))
    old_one = create("resp_old", timedelta(days=2))
    answered = event(rng, now, response_id="resp_plain", route="/v1/responses", status=200)  # an ordinary create: never owed
    repo.write_batch(engine, events=[settled_later, settled_at_once, settle(settled_at_once), open_one, old_one, answered], rejections=[], new_items=[])
    assert owed() == {"resp_0", "resp_2", "resp_old"}
    repo.write_batch(engine, events=[settle(settled_later)], rejections=[], new_items=[])
    assert owed() == {"resp_2", "resp_old"}

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0023")
    assert upgrade_schema(engine) == ("0023", head_revision())
    assert owed() == {"resp_2"}
    engine.dispose()


@pytest.mark.serve
def test_through_a_real_server_the_production_client_reads_and_bills_a_response_nobody_read(upstream: Any, tmp_path: Path) -> None:
    """The same through `taskproxy serve`: its collector's read goes through the production client
    (aiohttp) to the fake provider on loopback, with the provider's key."""
    from serve_helpers import ADMIN_KEY, child_env, running_server, write_config

    recording = {"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 0.05, "collect_background_after_seconds": AFTER}
    config = write_config(tmp_path, upstream.url, models=[{"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"}], recording=recording)
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
        client = server.openai(server.new_key(owner="ari"), default_headers={"X-Work-Item": "PROJ-66"})
        queued = client.responses.create(model="gpt-4o-mini", input="Write the migration notes.", background=True)
        assert queued.status == "queued"
        item = server.work_item("PROJ-66", expected_requests=2)  # the deferred create, then its usage, read by the proxy
        assert item["completion_tokens"] > 0
        reads = [r for r in upstream.received if r.get("method") == "GET" and r["path"] == f"/v1/responses/{queued.id}"]
        assert len(reads) == 1
