"""The outcome measure gamed one level up: once people are judged on AI-assisted share and cost per
completed item, they tag work done by hand with the cheapest AI use there is. What the report and
the signals make of it, through the proxy as a client sends it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conftest import Proxy
from taskproxy.timeutil import iso, utcnow

pytestmark = pytest.mark.anyio
ASK = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


async def test_token_counting_alone_does_not_make_a_completed_item_ai_assisted(proxy: Proxy) -> None:
    """count_tokens generates nothing and costs nothing: calls of it on a ticket done by hand once made
    it AI-assisted at $0, raising the share and pulling the cost per item down."""
    since = utcnow() - timedelta(minutes=1)
    key = await proxy.new_key()
    for item, chats in (("TAG-1", 0), ("TAG-2", 1)):
        headers = {"authorization": f"Bearer {key}", "x-work-item": item}
        for _ in range(3):
            counted = await proxy.http.post("/v1/messages/count_tokens", json=ASK, headers=headers)
            assert counted.status_code == 200, counted.text
        for _ in range(chats):
            answered = await proxy.http.post("/v1/chat/completions", json=ASK, headers=headers)
            assert answered.status_code == 200, answered.text
    await proxy.events(7)
    for item in ("TAG-1", "TAG-2"):
        done = await proxy.http.patch(f"/api/work-items/{item}", json={"status": "done"}, headers=proxy.admin_headers)
        assert done.status_code == 200, done.text
    report = await proxy.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1)))
    overall = report["overall"]
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (2, 1), overall
