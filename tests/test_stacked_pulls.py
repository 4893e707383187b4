"""Stacked pull requests: merged into another pull request's branch, not the default one. The work lands
with that branch's pull request; counting each stacked merge as completed work let anyone multiply their
merged pull requests (and divide the cost per merged pull request) by merging into their own branch."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import webhook_payloads as hooks
from conftest import ADMIN_KEY, BOTH_DATABASES, PROVIDER_KEY, Proxy, make_settings, start_proxy
from test_webhooks import _ask, _github_time, _post

from taskproxy.config import settings_from_mapping
from taskproxy.storage.db import make_engine
from taskproxy.timeutil import iso, utcnow
from taskproxy.trackers.sync import pending_items
from taskproxy.upstream.mock import MockProvider

pytestmark = pytest.mark.anyio
FEATURE = "feature/PAY-20-ledger"


def _merged(number: int, *, branch: str, into: str, at: datetime, opened: datetime | None = None) -> dict[str, Any]:
    pull = hooks.github_pull_request("closed", number, merged=True, branch=branch, title="Ledger step")
    pull["pull_request"].update(merged_at=_github_time(at), closed_at=_github_time(at))
    pull["pull_request"]["base"].update(ref=into, label=f"Acme:{into}")
    if opened is not None:
        pull["pull_request"]["created_at"] = _github_time(opened)
    return pull


async def _deliver(proxy: Proxy, pull: dict[str, Any]) -> dict[str, Any]:
    body = hooks.dumps(pull)
    response = await _post(proxy, "github", body, hooks.github_headers(body, "pull_request"))
    assert response.status_code == 200, response.text
    return response.json()


async def _item(proxy: Proxy, number: int) -> dict[str, Any]:
    return await proxy.get(f"/api/work-items/acme%2Fweb-app%23{number}")


@BOTH_DATABASES
async def test_pull_requests_merged_into_a_branch_land_with_its_pull_request(tracked: Proxy) -> None:
    """Two parts merged into the feature branch, then the feature branch into main: one completed
    item, whose cost is all four requests; before the last merge, nothing was completed."""
    since = utcnow() - timedelta(minutes=5)
    key = await tracked.new_key()
    for item in ("Acme/Web-App#21", "Acme/Web-App#21", "Acme/Web-App#22", "Acme/Web-App#20"):
        await _ask(tracked, key, item)
    events = await tracked.events(4)
    await asyncio.sleep(1.1)  # GitHub's times are whole seconds: merged after the requests
    parts_merged = utcnow()
    for number in (21, 22):
        answer = await _deliver(tracked, _merged(number, branch=f"step/{number}", into=FEATURE, at=parts_merged, opened=since))
        assert answer["items"] == [{"id": f"acme/web-app#{number}", "status": "in_progress", "linked": []}], answer
    until = utcnow() + timedelta(minutes=1)
    overall = (await tracked.get("/api/reports/adoption", since=iso(since), until=iso(until)))["overall"]
    # The parts are work in progress, not spend without outcome; the feature, unknown to its tracker yet, is unverified.
    feature_cost = sum(e["cost_usd"] for e in events if e["work_item"] == "acme/web-app#20")
    assert overall["completed_items"] == 0 and overall["spend_without_outcome_usd"] == pytest.approx(feature_cost), overall
    history = await _item(tracked, 21)
    assert history["status"] == "in_progress" and history["completed_at"] is None, history

    await asyncio.sleep(1.1)  # the feature's pull request opened after its parts were merged into it
    opened = utcnow()
    await asyncio.sleep(1.1)
    await _deliver(tracked, _merged(20, branch=FEATURE, into="main", at=utcnow(), opened=opened))
    landed = await _item(tracked, 20)
    assert landed["status"] == "done"
    assert sorted(link["id"] for link in landed["linked_from"]) == ["PAY-20", "acme/web-app#21", "acme/web-app#22"], landed
    overall = (await tracked.get("/api/reports/adoption", since=iso(since), until=iso(until)))["overall"]
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (1, 1), overall
    assert overall["cost_per_completed_item"]["total"] == pytest.approx(sum(e["cost_usd"] for e in events)), overall
    assert overall["spend_without_outcome_usd"] == 0, overall


async def test_a_stack_links_up_whatever_order_its_merges_arrive_in(tracked: Proxy) -> None:
    """The feature's merge delivered first, then a part merged before it, then a part stacked on that
    part: both land with the feature. A part merged into the branch after the feature had landed did
    not land with it, nor does a merge into a branch of the same name in another repository, nor one
    before the branch's previous landing."""
    merged = utcnow().replace(microsecond=0) - timedelta(hours=1)
    await _deliver(tracked, _merged(29, branch="feature/big", into="main", at=merged - timedelta(days=30), opened=merged - timedelta(days=31)))
    await _deliver(tracked, _merged(28, branch="part-old", into="feature/big", at=merged - timedelta(days=31), opened=merged - timedelta(days=32)))
    await _deliver(tracked, _merged(30, branch="feature/big", into="main", at=merged, opened=merged - timedelta(hours=5)))
    await _deliver(tracked, _merged(31, branch="part-a", into="feature/big", at=merged - timedelta(hours=2), opened=merged - timedelta(hours=4)))
    await _deliver(tracked, _merged(32, branch="part-a2", into="part-a", at=merged - timedelta(hours=3), opened=merged - timedelta(hours=4)))
    await _deliver(tracked, _merged(33, branch="part-late", into="feature/big", at=merged + timedelta(seconds=1), opened=merged - timedelta(hours=1)))
    elsewhere = _merged(34, branch="part-b", into="feature/big", at=merged - timedelta(hours=1), opened=merged - timedelta(hours=2))
    elsewhere["repository"] = {**elsewhere["repository"], "full_name": "Acme/Other"}
    await _deliver(tracked, elsewhere)

    assert [link["id"] for link in (await _item(tracked, 29))["linked_from"]] == ["acme/web-app#28"]
    landed = await _item(tracked, 30)
    assert sorted(link["id"] for link in landed["linked_from"]) == ["acme/web-app#31", "acme/web-app#32"], landed
    assert [(await _item(tracked, number))["status"] for number in (31, 32, 33)] == ["in_progress"] * 3
    assert (await tracked.get("/api/work-items/acme%2Fother%2334"))["status"] == "in_progress"


async def test_a_deep_stack_or_a_ring_of_merges_is_linked_in_one_pass(tracked: Proxy) -> None:
    """Twenty parts each stacked on the next, the landing delivered first and the parts from the top
    down: each delivery links what it must, and every part lands (each merge used to walk every path
    up the stack: twice the work per level). A ring of merges (a into b, b into c, c into a) ends too."""
    merged = utcnow().replace(microsecond=0) - timedelta(hours=1)
    await _deliver(tracked, _merged(100, branch="s/0", into="main", at=merged, opened=merged - timedelta(days=2)))
    for level in range(1, 21):
        at = merged - timedelta(minutes=level)
        await _deliver(tracked, _merged(100 + level, branch=f"s/{level}", into=f"s/{level - 1}", at=at, opened=merged - timedelta(days=1)))
    landed = await _item(tracked, 100)
    assert sorted(link["id"] for link in landed["linked_from"]) == sorted(f"acme/web-app#{100 + level}" for level in range(1, 21))
    ring = [("r/a", "r/b"), ("r/b", "r/c"), ("r/c", "r/a")]
    for number, (branch, into) in enumerate(ring, start=200):
        await _deliver(tracked, _merged(number, branch=branch, into=into, at=merged, opened=merged - timedelta(hours=1)))
    assert [(await _item(tracked, number))["status"] for number in (200, 201, 202)] == ["in_progress"] * 3


async def test_two_pull_requests_of_one_branch_and_a_forks_branch_of_the_same_name(tracked: Proxy) -> None:
    """A part merged into `feature/y`, which has a pull request into `release/2` (merged first) and one
    into main (merged next): delivered last, the part lands with both, and the one into main carries
    it. A fork's pull request from its own `feature/y` into main lands none of it."""
    merged = utcnow().replace(microsecond=0) - timedelta(hours=1)
    fork = _merged(90, branch="feature/y", into="main", at=merged - timedelta(minutes=30), opened=merged - timedelta(hours=3))
    fork["pull_request"]["head"]["repo"] = {**fork["pull_request"]["head"]["repo"], "full_name": "mallory/Web-App"}
    await _deliver(tracked, fork)
    await _deliver(tracked, _merged(81, branch="feature/y", into="release/2", at=merged - timedelta(minutes=20), opened=merged - timedelta(hours=3)))
    await _deliver(tracked, _merged(80, branch="feature/y", into="main", at=merged - timedelta(minutes=10), opened=merged - timedelta(hours=3)))
    await _deliver(tracked, _merged(82, branch="part-y", into="feature/y", at=merged - timedelta(hours=1), opened=merged - timedelta(hours=2)))
    assert [link["id"] for link in (await _item(tracked, 80))["linked_from"]] == ["acme/web-app#82"]
    assert [link["id"] for link in (await _item(tracked, 81))["linked_from"]] == ["acme/web-app#82"]
    assert (await _item(tracked, 90))["linked_from"] == []


async def test_gitlab_merge_requests_stack_too_and_an_unknown_default_branch_counts_the_merge(tracked: Proxy) -> None:
    part = hooks.gitlab_merge_request("merge", 7, branch="step/7")
    part["object_attributes"].update(target_branch="feature/PAY-9-charges", merged_at="2026-11-04 10:00:00 UTC")
    body = hooks.dumps(part)
    answer = (await _post(tracked, "gitlab", body, hooks.gitlab_headers("Merge Request Hook"))).json()
    assert answer["items"] == [{"id": "acme/platform/billing-api!7", "status": "in_progress", "linked": []}], answer
    feature = hooks.dumps(hooks.gitlab_merge_request("merge", 6, branch="feature/PAY-9-charges"))
    assert (await _post(tracked, "gitlab", feature, hooks.gitlab_headers("Merge Request Hook"))).status_code == 200
    landed = await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%216")
    assert landed["status"] == "done" and sorted(link["id"] for link in landed["linked_from"]) == ["PAY-9", "acme/platform/billing-api!7"]

    unknown = hooks.gitlab_merge_request("merge", 8, branch="step/8")
    unknown["object_attributes"]["target_branch"] = "feature/y"
    unknown["project"] = {k: v for k, v in unknown["project"].items() if k != "default_branch"}
    body = hooks.dumps(unknown)
    await _post(tracked, "gitlab", body, hooks.gitlab_headers("Merge Request Hook"))
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%218"))["status"] == "done"

    # `items sync` reads GitLab's REST API, which does not say which branch is the default: the same
    # merge read again from there leaves a stacked request stacked, and the sync does not ask for it.
    again = hooks.gitlab_merge_request("merge", 7, branch="step/7")
    again["object_attributes"].update(target_branch="feature/PAY-9-charges", merged_at="2026-11-04 10:00:00 UTC")
    again["project"] = {"path_with_namespace": again["project"]["path_with_namespace"]}
    body = hooks.dumps(again)
    assert (await _post(tracked, "gitlab", body, hooks.gitlab_headers("Merge Request Hook"))).status_code == 200
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%217"))["status"] == "in_progress"
    engine = make_engine(tracked.settings.database_url)
    try:
        assert "acme/platform/billing-api!7" not in {p.item_id for p in pending_items(engine, datetime(2026, 1, 1))}
    finally:
        engine.dispose()


@BOTH_DATABASES
async def test_a_control_character_in_the_target_branch_is_not_a_500(tracked: Proxy) -> None:
    pull = _merged(60, branch="part-nul", into="feature/\x00z", at=utcnow() - timedelta(minutes=1))
    answer = await _deliver(tracked, pull)
    assert answer["items"][0]["status"] == "in_progress", answer


@pytest.mark.parametrize("order", ["part,feature,revert", "feature,part,revert", "part,revert,feature", "feature,revert,part",
                                   "revert,part,feature", "revert,feature,part"])  # fmt: skip
async def test_a_revert_of_a_stacked_pull_request_is_rework_of_the_one_it_landed_with(tracked: Proxy, order: str) -> None:
    """A part stacked into the feature branch lands with the feature's merge; GitHub's revert button then
    undoes the part on main. The feature's merge did not hold: it is rework (the part's own merge was
    never a completion, and the revert found nothing done to mark, so no rework was counted), in
    whatever order the three merges are delivered (a review found four of six orders lost it)."""
    merged = utcnow().replace(microsecond=0) - timedelta(hours=2)
    revert = _merged(52, branch="revert-51-part-r", into="main", at=merged + timedelta(hours=1), opened=merged + timedelta(minutes=30))
    revert["pull_request"].update(title='Revert "Ledger step"', body="Reverts Acme/Web-App#51")
    pulls = {"part": _merged(51, branch="part-r", into="feature/r", at=merged - timedelta(hours=1), opened=merged - timedelta(hours=3)),
             "feature": _merged(50, branch="feature/r", into="main", at=merged, opened=merged - timedelta(hours=4)), "revert": revert}  # fmt: skip
    for name in order.split(","):
        await _deliver(tracked, pulls[name])
    landed = await _item(tracked, 50)
    assert landed["rework"] is not None and landed["rework"]["reason"] == "reverted" and landed["rework"]["by"] == "acme/web-app#52", landed
    assert (await _item(tracked, 52))["status"] == "closed"


async def test_a_landing_branch_counts_its_merges_as_completed_work(tmp_path: Path, fake, database_url: str) -> None:  # type: ignore[no-untyped-def]
    """A repository whose work merges into `develop` (git flow) while `main` is its default branch: with
    `trackers.landing_branches: [develop, "release/*"]` those merges are completed work, not stacked."""
    base = make_settings(tmp_path, database_url=database_url).model_dump(mode="json", exclude={"admin_key"})
    for model in base["models"]:
        model.pop("api_key", None)
    base["trackers"] = {"github": {"secret_env": "GH"}, "landing_branches": ["develop", "release/*"]}
    env = {"GH": hooks.GITHUB_SECRET, "TASKPROXY_ADMIN_KEY": ADMIN_KEY, "TEST_PROVIDER_KEY": PROVIDER_KEY}
    async for proxy in start_proxy(settings_from_mapping(base, env), MockProvider.asgi(fake.app()), fake):
        merged = utcnow().replace(microsecond=0) - timedelta(hours=1)
        for number, into in ((61, "develop"), (62, "release/2.1"), (63, "feature/x")):
            await _deliver(proxy, _merged(number, branch=f"step/{number}", into=into, at=merged, opened=merged - timedelta(hours=2)))
        assert [(await _item(proxy, number))["status"] for number in (61, 62, 63)] == ["done", "done", "in_progress"]


@pytest.mark.parametrize("order", [(41, 40, 43, 42), (41, 43, 42, 40), (42, 41, 40, 43), (43, 42, 41, 40)])
async def test_a_branch_landed_twice_gives_each_landing_its_own_parts_whatever_the_order(tracked: Proxy, order: tuple[int, ...]) -> None:
    """`feature/reuse` lands twice: #41 merged into it, #40 lands it; then #43, and #42 lands it again.
    Delivered with the first landing after the second, #41 was linked to both, and the second carried
    its cost into its own period (found by a review)."""
    base = utcnow().replace(microsecond=0) - timedelta(days=20)
    pulls = {41: _merged(41, branch="step/41", into="feature/reuse", at=base + timedelta(days=2), opened=base + timedelta(days=1)),
             40: _merged(40, branch="feature/reuse", into="main", at=base + timedelta(days=4), opened=base),
             43: _merged(43, branch="step/43", into="feature/reuse", at=base + timedelta(days=11), opened=base + timedelta(days=10)),
             42: _merged(42, branch="feature/reuse", into="main", at=base + timedelta(days=13), opened=base + timedelta(days=9))}  # fmt: skip
    for number in order:
        await _deliver(tracked, pulls[number])
    assert [link["id"] for link in (await _item(tracked, 40))["linked_from"]] == ["acme/web-app#41"]
    assert [link["id"] for link in (await _item(tracked, 42))["linked_from"]] == ["acme/web-app#43"]
