"""Policy modes, budgets (and their bound under concurrency), the audit log and privacy rules."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import BOTH_DATABASES, Proxy, make_settings, start_proxy, wait_until
from taskproxy.registry import register_work_item
from taskproxy.upstream.mock import MockProvider

pytestmark = pytest.mark.anyio
HI = [{"role": "user", "content": "hi"}]
TOKENS_PER_REQUEST = (7 + 2) + 2  # the fake bills 7 + a token per word ("user", "hi"), and max_tokens=2


async def _running(tmp_path: Path, fake: Any, **overrides: Any):  # type: ignore[no-untyped-def]
    return start_proxy(make_settings(tmp_path, **overrides), MockProvider.asgi(fake.app()), fake)


async def _ask(proxy: Proxy, key: str, item: str) -> httpx.Response:
    return await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 2},
                                 headers={"authorization": f"Bearer {key}", "X-Work-Item": item})  # fmt: skip


async def test_known_mode_refuses_unregistered_items_until_they_are_registered(tmp_path: Path, fake: Any) -> None:
    async for proxy in await _running(tmp_path, fake, work_items={"mode": "known", "refresh_seconds": 0.2}):
        key = await proxy.new_key()
        refused = await _ask(proxy, key, "PAY-1")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "work_item_unknown"
        assert "taskproxy items add PAY-1" in refused.json()["error"]["message"] and proxy.received == []
        created = await proxy.http.post("/api/work-items", json={"id": "PAY-1"}, headers=proxy.admin_headers)
        assert created.status_code == 201
        assert (await _ask(proxy, key, "PAY-1")).status_code == 200  # at once: this process registered it

        # Registered by another process (the CLI): known after at most work_items.refresh_seconds.
        register_work_item(proxy.app.state.services.engine, proxy.app.state.services.attribution.ids, {"id": "PAY-2"}, source="cli")
        await asyncio.sleep(0.3)
        assert (await _ask(proxy, key, "PAY-2")).status_code == 200
        # Recorded in the background: within the writer's interval, or once tiktoken's encoding is loaded.
        for _ in range(100):
            report = await proxy.get("/api/reports/tasks")
            if report["rejected_requests"]:
                break
            await asyncio.sleep(0.05)
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
async def test_item_budget_refuses_once_spent_and_the_overshoot_is_bounded_by_requests_in_flight(proxy: Proxy) -> None:
    limit = 1000
    created = await proxy.http.post("/api/work-items", json={"id": "PAY-5", "budget_tokens": limit}, headers=proxy.admin_headers)
    assert created.status_code == 201
    key = await proxy.new_key()
    before = (limit - 10) // TOKENS_PER_REQUEST  # spend all but a few tokens of the 1,000
    for _ in range(before):
        assert (await _ask(proxy, key, "PAY-5")).status_code == 200
    await proxy.item("PAY-5", requests=before)

    burst = await asyncio.gather(*(_ask(proxy, key, "PAY-5") for _ in range(50)))
    admitted = sum(r.status_code == 200 for r in burst)
    refused = [r for r in burst if r.status_code == 429]
    assert admitted + len(refused) == 50 and admitted >= 1
    print(f"burst of 50 at {before * TOKENS_PER_REQUEST} of {limit} tokens: {admitted} admitted")
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)

    item = await proxy.item("PAY-5", requests=before + admitted)
    spent = item["total_tokens"]
    assert spent == (before + admitted) * TOKENS_PER_REQUEST
    # The bound: only requests admitted before the spend reached the limit, all in flight at once, go over it.
    assert spent - limit <= admitted * TOKENS_PER_REQUEST
    after = await _ask(proxy, key, "PAY-5")
    assert after.status_code == 429
    message = after.json()["error"]["message"]
    assert f"{spent:,} tokens" in message and "1,000 tokens" in message


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
        assert over.status_code == 429 and "PAY-6" in message and "$0.000005" in message and "$0.000003" in message
        # The team's monthly budget (30 tokens): 22 spent on PAY-6, one request more on PAY-7, then refused.
        assert (await _ask(proxy, key, "PAY-7")).status_code == 200
        await proxy.item("PAY-7", requests=1)
        team_over = await _ask(proxy, key, "PAY-8")
        assert team_over.status_code == 429 and "team payments" in team_over.json()["error"]["message"]
        other_team = await proxy.new_key(owner="ola", team="data")
        assert (await _ask(proxy, other_team, "PAY-8")).status_code == 200


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
    await asyncio.sleep(0.2)
    assert "GET /api/keys" in [entry["action"] for entry in await proxy.get("/api/audit")]

    for path in ("/api/audit", "/api/usage/events", "/api/usage", f"/api/usage/events?key_id={ann}"):
        assert (await proxy.http.get(path, headers={"authorization": f"Bearer {bob}"})).status_code == 403
    mine = (await proxy.http.get("/api/me/usage", headers={"authorization": f"Bearer {bob}"})).json()
    assert [w["work_item"] for w in mine["work_items"]] == ["WEB-2"] and {e["owner"] for e in mine["recent_events"]} == {"bob"}


async def test_rate_limit_per_key(tmp_path: Path, fake: Any) -> None:
    async for proxy in await _running(tmp_path, fake, limits={"requests_per_minute": 3}):
        ann, bob = await proxy.new_key("ann"), await proxy.new_key("bob")
        assert [(await _ask(proxy, ann, "PAY-1")).status_code for _ in range(3)] == [200, 200, 200]
        limited = await _ask(proxy, ann, "PAY-1")
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 61
        assert (await _ask(proxy, bob, "PAY-1")).status_code == 200  # per key
        assert len(proxy.received) == 4
        report = await wait_until(lambda: proxy.get("/api/reports/tasks"), lambda r: r["rejected_requests"])
        assert report["rejected_requests"] == {"rate_limited": 1}
