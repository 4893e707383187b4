"""The outcome measure gamed one level up: once people are judged on AI-assisted share and cost per
completed item, they tag work done by hand with the cheapest AI use there is. What the report and
the signals make of it, through the proxy as a client sends it."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import BOTH_DATABASES, Proxy, read_only
from signals_org import PRICE
from sqlalchemy import select
from write_path import past_request, write_all

from taskproxy import registry
from taskproxy.metering.tokens import TokenCounter
from taskproxy.money import usd
from taskproxy.reports.adoption import adoption_report
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.storage.models import UsageEvent
from taskproxy.timeutil import iso, utcnow

ASK = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.mark.anyio
async def test_token_counting_alone_does_not_make_a_completed_item_ai_assisted(proxy: Proxy) -> None:
    """count_tokens generates nothing and costs nothing: calls of it on a ticket done by hand once made
    it AI-assisted at $0, raising the share and pulling the cost per item down. So did OpenAI's
    counterpart, /v1/responses/input_tokens, until it was counted as a token count too."""
    since = utcnow() - timedelta(minutes=1)
    key = await proxy.new_key()
    for item, chats in (("TAG-1", 0), ("TAG-2", 1)):
        headers = {"authorization": f"Bearer {key}", "x-work-item": item}
        for _ in range(3):
            counted = await proxy.http.post("/v1/messages/count_tokens", json=ASK, headers=headers)
            assert counted.status_code == 200, counted.text
            counted = await proxy.http.post("/v1/responses/input_tokens", json={"model": "gpt-4o-mini", "input": "hello there"}, headers=headers)
            assert counted.status_code == 200, counted.text
        for _ in range(chats):
            answered = await proxy.http.post("/v1/chat/completions", json=ASK, headers=headers)
            assert answered.status_code == 200, answered.text
    await proxy.events(13)
    for item in ("TAG-1", "TAG-2"):
        done = await proxy.http.patch(f"/api/work-items/{item}", json={"status": "done"}, headers=proxy.admin_headers)
        assert done.status_code == 200, done.text
    report = await proxy.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1)))
    overall = report["overall"]
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (2, 1), overall


@BOTH_DATABASES
@pytest.mark.anyio
async def test_a_request_sent_only_after_the_item_was_done_does_not_make_it_ai_assisted(proxy: Proxy) -> None:
    """Tagging after the fact: one cheap request on tickets done by hand, minutes after they were done,
    made each AI-assisted (any answered event, any time), moving the share to 1.0 and the median cost
    per item to a fraction of a cent. The item's usage must begin before it was done."""
    since = utcnow() - timedelta(minutes=1)
    key = await proxy.new_key()
    headers = {"authorization": f"Bearer {key}"}
    worked = await proxy.http.post("/v1/chat/completions", json=ASK, headers={**headers, "x-work-item": "WORK-1"})
    assert worked.status_code == 200, worked.text
    await proxy.events(1)
    for item in ("WORK-1", "HAND-1", "HAND-2"):
        done = await proxy.http.patch(f"/api/work-items/{item}", json={"status": "done"}, headers=proxy.admin_headers)
        assert done.status_code in (200, 404), done.text
        if done.status_code == 404:  # not met in a request yet: registered as done
            made = await proxy.http.post("/api/work-items", json={"id": item, "status": "done"}, headers=proxy.admin_headers)
            assert made.status_code == 201, made.text
    counted = await proxy.http.post("/v1/messages/count_tokens", json=ASK, headers={**headers, "x-work-item": "HAND-3"})
    assert counted.status_code == 200, counted.text  # a free token count before it is done is no AI use (review)
    await proxy.events(2)
    done = await proxy.http.patch("/api/work-items/HAND-3", json={"status": "done"}, headers=proxy.admin_headers)
    assert done.status_code == 200, done.text
    for item in ("HAND-1", "HAND-2", "HAND-3", "WORK-1"):  # after the fact
        tagged = await proxy.http.post("/v1/chat/completions", json=ASK, headers={**headers, "x-work-item": item})
        assert tagged.status_code == 200, tagged.text
    await proxy.events(6)
    report = await proxy.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1)))
    overall = report["overall"]
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (4, 1), overall
    assert overall["spend_after_completion_usd"] > 0  # what came after is still spend, counted as such


@pytest.mark.anyio
async def test_a_projects_team_owns_its_items_not_whoever_spent_most(tmp_path: Path) -> None:
    """Trackers give items no team, so an item took the team that spent most on it: work done by hand
    (no spend) counted in no team, making every team's AI-assisted share read 1.0, and one key could
    move another team's ticket, and its waste, to its own team by outspending on it. With
    `work_items.teams` an item belongs to its project's team."""
    from conftest import make_settings, start_proxy

    from taskproxy.fake_provider import FakeProvider
    from taskproxy.upstream.mock import MockProvider

    fake = FakeProvider()
    settings = make_settings(tmp_path, privacy={"min_group_size": 1}, work_items={"teams": {"pay": "payments"}})
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        since = utcnow() - timedelta(minutes=1)
        payer, grower = await proxy.new_key("pat", "payments"), await proxy.new_key("gil", "growth")
        for key, item, times in ((payer, "PAY-1", 1), (payer, "PAY-3", 1), (grower, "PAY-3", 3), (grower, "GRO-1", 1)):
            for _ in range(times):
                sent = await proxy.http.post("/v1/chat/completions", json=ASK, headers={"authorization": f"Bearer {key}", "x-work-item": item})
                assert sent.status_code == 200, sent.text
        await proxy.events(6)
        made = await proxy.http.post("/api/work-items", json={"id": "PAY-2", "status": "open"}, headers=proxy.admin_headers)  # by hand
        assert made.status_code == 201, made.text
        for item in ("PAY-1", "PAY-2", "GRO-1"):
            done = await proxy.http.patch(f"/api/work-items/{item}", json={"status": "done"}, headers=proxy.admin_headers)
            assert done.status_code == 200, done.text
        report = await proxy.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1)))
        teams = {t["team"]: t for t in report["teams"]}
        assert (teams["payments"]["completed_items"], teams["payments"]["ai_assisted_items"]) == (2, 1)  # the hand-done ticket counts
        assert (teams["growth"]["completed_items"], teams["growth"]["ai_assisted_items"]) == (1, 1)  # GRO: no project team, its spender's
        assert teams["payments"]["spend_usd"] > teams["growth"]["spend_usd"]  # PAY-3, growth's spend on it too, stays with payments


SINCE, UNTIL = datetime(2026, 3, 2), datetime(2026, 3, 16)


def _merged_pr_world(engine: Any, tmp_path: Path) -> dict[str, int]:
    """Tickets with merged PRs and spend on both sides of the merge; returns, per ticket, the spend
    (nano-USD) the report must count as without outcome."""
    day = timedelta(days=1)
    key = SimpleNamespace(id="key_merges", owner="dana@example.com", team="web")
    plan = {  # ticket: (its status after work, the PRs' merges, request times)
        "T-1": ("in_progress", [SINCE + 5 * day], [SINCE + day, SINCE + 6 * day]),  # stale: after the merge counts
        "T-2": ("closed", [SINCE + 2 * day], [SINCE + day, SINCE + 3 * day]),  # closed after it: after the merge counts
        "T-3": ("in_progress", [SINCE + 2 * day, SINCE + 6 * day], [SINCE + 4 * day, SINCE + 7 * day]),  # the last merge
        "T-4": ("in_progress", [SINCE - 3 * day], [SINCE + day]),  # merged before the period: all of it counts
        "T-5": ("in_progress", [SINCE + 9 * day], [SINCE + day, SINCE + 8 * day]),  # all before the merge: nothing counts
    }
    counter, exchanges, after = TokenCounter(), [], {}
    for ticket, (status, merges, times) in plan.items():
        registry.transition(engine, ticket, "open", source="jira", at=SINCE - 30 * day, fields={"team": "web"}, created_at=SINCE - 30 * day)
        registry.transition(engine, ticket, "in_progress", source="jira", at=SINCE - 29 * day)
        for n, merged in enumerate(merges):
            pr = f"acme/web#{ticket[2:]}{n}"
            registry.transition(engine, pr, "open", source="github", at=merged - day, fields={"team": "web"}, created_at=merged - day)
            registry.transition(engine, pr, "done", source="github", at=merged, merged=True)
            registry.link(engine, ticket, pr, at=merged)
        if status == "closed":
            registry.transition(engine, ticket, "closed", source="jira", at=SINCE + 8 * day)
        for n, ts in enumerate(times):
            exchanges.append(past_request(id=f"{ticket}-{n}", ts=ts, key=key, work_item=ticket, model="big-model", body={"n": f"{ticket}{n}"},
                                          prompt_tokens=1000 * (n + 1), completion_tokens=100, counter=counter, price=PRICE))  # fmt: skip
        after[ticket] = max(merges)
    write_all(engine, tmp_path / "spool.jsonl", exchanges, len(exchanges))
    with engine.connect() as connection:
        events = connection.execute(select(UsageEvent.work_item, UsageEvent.ts, UsageEvent.cost_nanos)).all()
    return {t: sum(e.cost_nanos for e in events if e.work_item == t and e.ts > after[t]) for t in plan}


@BOTH_DATABASES
def test_a_merged_pr_covers_its_tickets_spend_up_to_its_merge_and_no_further(database_url: str, tmp_path: Path) -> None:
    """$60 parked on a ticket after a two-line PR merged counted nowhere: the merge exempted the ticket
    for good. It now covers the spend up to the last merge; after it, the ticket's status decides."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    expected = _merged_pr_world(engine, tmp_path)
    assert expected["T-5"] == 0 and all(expected[t] > 0 for t in ("T-1", "T-2", "T-3", "T-4"))
    report = adoption_report(engine, since=SINCE, until=UNTIL, min_group_size=1, stale_after_days=14)
    breakdown = report["overall"]["spend_without_outcome_breakdown"]
    assert breakdown["closed"] == usd(expected["T-2"])
    assert breakdown["stale_open"] == usd(expected["T-1"] + expected["T-3"] + expected["T-4"])
    if engine.dialect.name == "postgresql":  # a standby or a replica: the report writes nothing, so it runs there too
        standby = make_engine(read_only(database_url))
        try:
            assert adoption_report(standby, since=SINCE, until=UNTIL, min_group_size=1, stale_after_days=14) == report
        finally:
            standby.dispose()
    engine.dispose()


@BOTH_DATABASES
def test_a_tickets_spend_between_its_merges_counts_once_when_the_later_merge_is_reverted(database_url: str, tmp_path: Path) -> None:
    """A ticket left open, two PRs merged in the period, the second reverted after it: the first carries
    the ticket's usage up to its merge, and spend without outcome began at the second's merge, so
    what the ticket spent between the two merges was in neither figure (a review found it)."""
    from taskproxy.settings import DEFAULT_ID_PATTERNS
    from taskproxy.trackers.base import Delivery, ItemUpdate
    from taskproxy.workitems import WorkItemIds

    engine = make_engine(database_url)
    upgrade_schema(engine)
    day, counter, exchanges = timedelta(days=1), TokenCounter(), []
    key = SimpleNamespace(id="key_gap", owner="dana@example.com", team="web")
    registry.transition(engine, "T-9", "open", source="jira", at=SINCE - 30 * day, fields={"team": "web"}, created_at=SINCE - 30 * day)
    for n, merged in enumerate((SINCE + 2 * day, SINCE + 6 * day)):
        pr = f"acme/web#9{n}"
        registry.transition(engine, pr, "open", source="github", at=merged - day, fields={"team": "web"}, created_at=merged - day)
        registry.transition(engine, pr, "done", source="github", at=merged, merged=True)
        registry.link(engine, "T-9", pr, at=merged)
    for n, ts in enumerate((SINCE + day, SINCE + 4 * day, SINCE + 8 * day)):
        exchanges.append(past_request(id=f"gap-{n}", ts=ts, key=key, work_item="T-9", model="big-model", body={"n": n},
                                      prompt_tokens=1000 * (n + 1), completion_tokens=100, counter=counter, price=PRICE))  # fmt: skip
    write_all(engine, tmp_path / "spool.jsonl", exchanges, len(exchanges))
    reverted = UNTIL + day
    revert = ItemUpdate("acme/web#99", "done", at=reverted, merged=True, title='Revert "x"', reverts="acme/web#91")
    registry.apply_delivery(engine, WorkItemIds(DEFAULT_ID_PATTERNS), Delivery("github", "d-gap", "pull_request", [revert]), reverted)
    with engine.connect() as connection:
        costs = [int(c) for c in connection.execute(select(UsageEvent.cost_nanos).where(UsageEvent.work_item == "T-9").order_by(UsageEvent.ts)).scalars()]
    overall = adoption_report(engine, since=SINCE, until=UNTIL, min_group_size=1, stale_after_days=14)["overall"]
    engine.dispose()
    assert overall["cost_per_completed_item"]["total"] == usd(costs[0])  # up to the first merge, the one still standing
    assert overall["spend_without_outcome_breakdown"]["stale_open"] == usd(costs[1] + costs[2])  # after it, left open
    assert overall["spend_usd"] == usd(sum(costs))


@BOTH_DATABASES
def test_story_points_raised_after_an_item_was_done_do_not_count(database_url: str, tmp_path: Path) -> None:
    """Sizes gamed after the fact: once cost per item is read per size band, re-pointing tickets once
    they are done moves them into bigger bands for nothing (a 1-point ticket re-pointed to 13 counted
    among the largest). The report takes the points as they stood at completion; a ticket pointed only
    afterwards is unsized."""
    from taskproxy.trackers.base import Size

    engine = make_engine(database_url)
    upgrade_schema(engine)
    day, counter, exchanges = timedelta(days=1), TokenCounter(), []
    key = SimpleNamespace(id="key_points", owner="dana@example.com", team="web")
    for n, (ticket, then, later) in enumerate((("P-1", 1.0, 13.0), ("P-2", 2.0, None), ("P-3", None, 8.0), ("P-4", 5.0, 5.0))):
        registry.transition(engine, ticket, "open", source="jira", at=SINCE - day, fields={"team": "web"}, created_at=SINCE - day)
        if then is not None:
            registry.record_size(engine, ticket, Size(points=then), source="jira", at=SINCE + day)
        registry.transition(engine, ticket, "done", source="jira", at=SINCE + 3 * day)
        if later is not None:
            registry.record_size(engine, ticket, Size(points=later), source="jira", at=SINCE + 4 * day)
        exchanges.append(past_request(id=f"points-{n}", ts=SINCE + 2 * day, key=key, work_item=ticket, model="big-model", body={"n": ticket},
                                      prompt_tokens=1000, completion_tokens=100, counter=counter, price=PRICE))  # fmt: skip
    write_all(engine, tmp_path / "spool.jsonl", exchanges, len(exchanges))
    report = adoption_report(engine, since=SINCE, until=UNTIL, min_group_size=1)
    engine.dispose()
    bands = {band["label"]: band["items"] for band in report["overall"]["cost_by_size"] if band["items"]}
    assert report["overall"]["ai_assisted_items"] == 4
    assert bands == {"points <=1": 1, "points >1-3": 1, "points >3-8": 1, "unsized": 1}, bands  # P-1, P-2, P-4 (5), P-3
