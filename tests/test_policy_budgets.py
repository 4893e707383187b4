"""Policy modes, budgets (and their bound under concurrency), the audit log and privacy rules."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text

from conftest import BOTH_DATABASES, Proxy, make_settings, start_proxy, wait_until
from taskproxy.registry import register_work_item
from taskproxy.settings import DEFAULT_ID_PATTERNS
from taskproxy.storage import leases
from taskproxy.storage.db import make_engine
from taskproxy.upstream.mock import MockProvider
from taskproxy.upstream.provider import ProviderRequest
from taskproxy.workitems import WorkItemIds

pytestmark = pytest.mark.anyio
HI = [{"role": "user", "content": "hi"}]
TOKENS_PER_REQUEST = (7 + 2) + 2  # the fake bills 7 + a token per word ("user", "hi"), and max_tokens=2


async def _running(tmp_path: Path, fake: Any, **overrides: Any):  # type: ignore[no-untyped-def]
    return start_proxy(make_settings(tmp_path, **overrides), MockProvider.asgi(fake.app()), fake)


async def _ask(proxy: Proxy, key: str, item: str, user: str = "dana") -> httpx.Response:
    return await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 2, "user": user},
                                 headers={"authorization": f"Bearer {key}", "X-Work-Item": item})  # fmt: skip


async def test_known_mode_refuses_unregistered_items_until_they_are_registered(tmp_path: Path, fake: Any) -> None:
    settings = make_settings(tmp_path, work_items={"mode": "known", "refresh_seconds": 60})
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        key = await proxy.new_key()
        refused = await _ask(proxy, key, "PAY-1")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "work_item_unknown"
        assert "taskproxy items add PAY-1" in refused.json()["error"]["message"] and proxy.received == []
        created = await proxy.http.post("/api/work-items", json={"id": "PAY-1"}, headers=proxy.admin_headers)
        assert created.status_code == 201
        assert (await _ask(proxy, key, "PAY-1")).status_code == 200  # at once: this process registered it

        # Registered by another process (the CLI), long before this one reloads: an id not in memory
        # costs one lookup, so it is known at once.
        other_process = make_engine(settings.database_url)
        register_work_item(other_process, WorkItemIds(DEFAULT_ID_PATTERNS), {"id": "PAY-2"}, source="cli")
        other_process.dispose()
        assert (await _ask(proxy, key, "PAY-2")).status_code == 200
        # Recorded in the background, within the writer's interval.
        report = await wait_until(lambda: proxy.get("/api/reports/tasks"), lambda r: r["rejected_requests"], what="the refusal recorded")
        assert report["rejected_requests"] == {"work_item_unknown": 1}


async def test_active_mode_refuses_completed_and_closed_items(tmp_path: Path, fake: Any) -> None:
    async for proxy in await _running(tmp_path, fake, work_items={"mode": "active"}):
        key = await proxy.new_key()
        for item, action in (("PAY-3", "complete"), ("PAY-4", "close")):
            await proxy.http.post("/api/work-items", json={"id": item}, headers=proxy.admin_headers)
            assert (await _ask(proxy, key, item)).status_code == 200
            resolved = await proxy.http.post(f"/api/work-items/{item}/{action}", headers=proxy.admin_headers)
            assert resolved.status_code == 200
            refused = await _ask(proxy, key, item)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "work_item_closed"
        reopened = await proxy.http.patch("/api/work-items/PAY-3", json={"status": "in_progress"}, headers=proxy.admin_headers)
        assert reopened.status_code == 200 and reopened.json()["completed_at"] is None
        assert (await _ask(proxy, key, "PAY-3")).status_code == 200


@BOTH_DATABASES
async def test_a_budget_is_overshot_only_by_the_requests_in_flight_when_it_was_reached(tmp_path: Path, fake: Any, database_url: str) -> None:
    limit, in_flight = 1000, 6
    held = asyncio.Event()
    answer = MockProvider.asgi(fake.app())
    burst_forwarded = 0

    async def provider(request: ProviderRequest) -> Any:
        nonlocal burst_forwarded
        if b'"burst"' in request.content:
            burst_forwarded += 1
            await held.wait()  # the burst's requests stay in flight until all of them were admitted
        return await answer.send(request)

    async for proxy in start_proxy(make_settings(tmp_path, database_url=database_url), MockProvider(provider), fake):
        created = await proxy.http.post("/api/work-items", json={"id": "PAY-5", "budget_tokens": limit}, headers=proxy.admin_headers)
        assert created.status_code == 201
        key = await proxy.new_key()
        before = (limit - 10) // TOKENS_PER_REQUEST  # spend all but a few tokens of the 1,000
        for _ in range(before):
            assert (await _ask(proxy, key, "PAY-5")).status_code == 200
        burst = [asyncio.create_task(_ask(proxy, key, "PAY-5", user="burst")) for _ in range(in_flight)]
        await wait_until(lambda: asyncio.sleep(0, burst_forwarded), lambda n: n == in_flight, what="the whole burst forwarded")
        late = await _ask(proxy, key, "PAY-5")  # admitted too: the spend is still below the limit while they run
        held.set()
        answers = await asyncio.gather(*burst)
        assert late.status_code == 200 and [r.status_code for r in answers] == [200] * in_flight

        after = await _ask(proxy, key, "PAY-5")  # the first request after the spend reached the limit
        assert after.status_code == 429 and after.json()["error"]["code"] == "budget_exceeded"
        item = await proxy.item("PAY-5", requests=before + in_flight + 1)
        spent = item["total_tokens"]
        assert spent == (before + in_flight + 1) * TOKENS_PER_REQUEST
        # The bound: over the limit by at most the requests admitted while the spend was below it and in flight.
        assert limit <= spent <= (limit - 1) + (in_flight + 1) * TOKENS_PER_REQUEST
        message = after.json()["error"]["message"]
        assert "1,000 tokens" in message and f"{spent:,}" not in message  # the budget, not what was spent


async def test_a_client_sending_one_request_after_another_is_refused_on_the_first_after_the_limit(tmp_path: Path, fake: Any) -> None:
    # The writer records only once a second here: the budget must not wait for it.
    settings = make_settings(tmp_path, recording={"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 1.0})
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        await proxy.http.post("/api/work-items", json={"id": "PAY-10", "budget_tokens": 100}, headers=proxy.admin_headers)
        key = await proxy.new_key()
        statuses = [(await _ask(proxy, key, "PAY-10")).status_code for _ in range(12)]
        within = -(-100 // TOKENS_PER_REQUEST)  # 10 requests of 11 tokens: the 10th reaches 110, the 11th is refused
        assert statuses == [200] * within + [429] * (12 - within)


async def test_usd_and_team_budgets_and_config_defaults(tmp_path: Path, fake: Any) -> None:
    budgets = {"work_item_usd": 0.000003, "teams": {"payments": {"tokens": 30}}}
    async for proxy in await _running(tmp_path, fake, budgets=budgets):
        key = await proxy.new_key(team="payments")
        # gpt-4o-mini: 9 × 0.15 + 2 × 0.60 per million = $0.00000255 a request: after two, over $0.000003
        assert (await _ask(proxy, key, "PAY-6")).status_code == 200
        await proxy.item("PAY-6", requests=1)
        assert (await _ask(proxy, key, "PAY-6")).status_code == 200
        await proxy.item("PAY-6", requests=2)
        over = await _ask(proxy, key, "PAY-6")
        message = over.json()["error"]["message"]
        # The budget, not the spend: any key may name the item, and the spend less its own would be the others'.
        assert over.status_code == 429 and message == "The work item PAY-6 has spent all of its budget of $0.00000300. Ask an admin to raise it."
        # The team's monthly budget (30 tokens): 22 spent on PAY-6, one request more on PAY-7, then refused.
        assert (await _ask(proxy, key, "PAY-7")).status_code == 200
        await proxy.item("PAY-7", requests=1)
        team_over = await _ask(proxy, key, "PAY-8")
        assert team_over.status_code == 429
        assert team_over.json()["error"]["message"] == "The team payments this month has used all of its budget of 30 tokens. Ask an admin to raise it."
        other_team = await proxy.new_key(owner="ola", team="data")
        assert (await _ask(proxy, other_team, "PAY-8")).status_code == 200


async def test_a_budget_stored_past_the_largest_is_read_as_the_largest(tmp_path: Path, fake: Any) -> None:
    """Budgets too large to count (stored before the API refused them) do not break the item's requests."""
    async for proxy in await _running(tmp_path, fake, work_items={"mode": "known"}):
        key = await proxy.new_key()
        engine = make_engine(proxy.settings.database_url)
        register_work_item(engine, WorkItemIds(DEFAULT_ID_PATTERNS), {"id": "PAY-20"}, source="cli")
        register_work_item(engine, WorkItemIds(DEFAULT_ID_PATTERNS), {"id": "PAY-21"}, source="cli")
        with engine.begin() as connection:  # as an older version let them be stored
            connection.execute(text("UPDATE work_items SET budget_usd = 1e300 WHERE id = 'PAY-20'"))
            connection.execute(text("UPDATE work_items SET budget_usd = 1e20, budget_tokens = 9000000000000000000 WHERE id = 'PAY-21'"))
        engine.dispose()
        for item in ("PAY-20", "PAY-21"):
            for _ in range(3):  # the first on credit, then on leased slices
                answer = await _ask(proxy, key, item)
                assert answer.status_code == 200, answer.text
        await proxy.item("PAY-21", requests=3)


async def test_a_lease_failing_on_a_bug_is_not_asked_again_in_a_loop(tmp_path: Path, fake: Any, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A lease that fails with an error no one expected falls back to the process's own count, as a
    database error does: before, each request asked again at once, in a loop, for its whole second's wait."""
    calls = 0

    def broken(*args: Any) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    monkeypatch.setattr(leases, "take", broken)
    async for proxy in await _running(tmp_path, fake, budgets={"teams": {"payments": {"tokens": 1_000_000}}}):  # shared: leased
        key = await proxy.new_key()
        for _ in range(3):
            started = asyncio.get_running_loop().time()
            assert (await _ask(proxy, key, "PAY-22")).status_code == 200
            assert asyncio.get_running_loop().time() - started < 0.9  # not the second's wait for a slice
        assert 1 <= calls <= 2, calls
        assert sum("leasing from the budget" in record.getMessage() for record in caplog.records) == calls


async def test_openai_sdk_raises_rate_limit_on_budget(proxy: Proxy) -> None:
    await proxy.http.post("/api/work-items", json={"id": "PAY-9", "budget_tokens": 0}, headers=proxy.admin_headers)
    with pytest.raises(openai.RateLimitError) as over:
        await proxy.openai(await proxy.new_key()).chat.completions.create(model="gpt-4o-mini", messages=HI, extra_headers={"X-Work-Item": "PAY-9"})
    assert over.value.body["code"] == "budget_exceeded"
    assert proxy.received == []


@BOTH_DATABASES
async def test_admin_reads_of_per_key_data_are_audited_and_developers_see_only_their_own(proxy: Proxy) -> None:
    ann, bob = await proxy.new_key("ann", "web"), await proxy.new_key("bob", "web")
    await _ask(proxy, ann, "WEB-1")
    await _ask(proxy, bob, "WEB-2")
    await proxy.events(2)
    audit = await proxy.get("/api/audit")
    reads = [(entry["action"], entry["actor_owner"]) for entry in audit]
    assert ("GET /api/usage/events", "admin") in reads and ("GET /api/keys", "admin") not in reads
    await proxy.get("/api/keys")
    await wait_until(lambda: proxy.get("/api/audit"), lambda audit: "GET /api/keys" in [entry["action"] for entry in audit], what="the read audited")

    for path in ("/api/audit", "/api/usage/events", "/api/usage", f"/api/usage/events?key_id={ann}"):
        assert (await proxy.http.get(path, headers={"authorization": f"Bearer {bob}"})).status_code == 403
    mine = (await proxy.http.get("/api/me/usage", headers={"authorization": f"Bearer {bob}"})).json()
    assert [w["work_item"] for w in mine["work_items"]] == ["WEB-2"] and {e["owner"] for e in mine["recent_events"]} == {"bob"}


async def test_the_audit_log_names_the_key_read_however_the_query_is_padded(proxy: Proxy) -> None:
    """The query was kept as sent, cut at 320 characters: a padding parameter in front hid the key whose
    events were read, and of a repeated `key_id` the log showed the first while the route read the last."""
    ann, bob = await proxy.new_key("ann", "web"), await proxy.new_key("bob", "web")
    ann_id, bob_id = [k["id"] for k in await proxy.get("/api/keys") if k["owner"] in ("ann", "bob")]
    padded = await proxy.http.get("/api/usage/events", params=[("x", "y" * 330), ("key_id", ann_id)], headers=proxy.admin_headers)
    repeated = await proxy.http.get("/api/usage/events", params=[("key_id", bob_id), ("key_id", ann_id)], headers=proxy.admin_headers)
    assert padded.status_code == repeated.status_code == 200
    audit = await wait_until(lambda: proxy.get("/api/audit"), lambda a: sum(e["action"] == "GET /api/usage/events" for e in a) >= 2, what="the reads audited")
    targets = [e["target"] for e in audit if e["action"] == "GET /api/usage/events"]
    assert all(t.startswith(f"key_id={ann_id}&") or t == f"key_id={ann_id}" for t in targets), targets


async def test_rate_limit_per_key(tmp_path: Path, fake: Any) -> None:
    async for proxy in await _running(tmp_path, fake, limits={"requests_per_minute": 3}):
        ann, bob = await proxy.new_key("ann"), await proxy.new_key("bob")
        await _start_of_a_minute()
        replies = [await _ask(proxy, ann, "PAY-1") for _ in range(6)]
        statuses = [reply.status_code for reply in replies]
        # The limit, plus at most one slice (here 1 request) admitted on credit before the process learns it is spent.
        answered = statuses.count(200)
        assert 3 <= answered <= 4 and statuses == [200] * answered + [429] * (6 - answered), [r.text for r in replies]
        limited = await _ask(proxy, ann, "PAY-1")
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert (await _ask(proxy, bob, "PAY-1")).status_code == 200  # per key
        assert len(proxy.received) == answered + 1
        report = await wait_until(lambda: proxy.get("/api/reports/tasks"), lambda r: r["rejected_requests"].get("rate_limited") == 7 - answered)
        assert report["rejected_requests"] == {"rate_limited": 7 - answered}


async def _start_of_a_minute() -> None:
    """Counting is per calendar minute: start where the minute has time left, so the test stays in one."""
    from datetime import UTC, datetime

    if datetime.now(UTC).second >= 45:
        await asyncio.sleep(61 - datetime.now(UTC).second)


@pytest.mark.postgres
async def test_more_budgeted_items_than_a_statement_can_bind_still_start_and_hold(tmp_path: Path, fake: Any, postgres_url: str) -> None:
    """PostgreSQL binds at most 65,535 parameters a statement: spend is read for budgeted items in chunks."""
    from sqlalchemy import insert

    from taskproxy.storage.db import prepare_schema
    from taskproxy.storage.models import WorkItem
    from taskproxy.timeutil import utcnow

    engine = make_engine(postgres_url)
    prepare_schema(engine)
    now = utcnow()
    rows = [{"id": f"BIG-{n}", "source": "manual", "status": "open", "created_at": now, "budget_tokens": 20} for n in range(70_000)]
    with engine.begin() as connection:
        connection.execute(insert(WorkItem.__table__), rows)
    engine.dispose()
    async for proxy in start_proxy(make_settings(tmp_path, database_url=postgres_url), MockProvider.asgi(fake.app()), fake):
        key = await proxy.new_key()
        assert [(await _ask(proxy, key, "BIG-69999")).status_code for _ in range(3)] == [200, 200, 429]
