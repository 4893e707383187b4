"""A tracker's events delivered out of order give the item the history they would in order: a reopening
and a re-completion arriving as done, done, reopen (a retried delivery, a slow worker) lost the rework,
and the completion stayed at the first Done."""

from __future__ import annotations

from typing import Any

import pytest
import webhook_payloads as hooks
from conftest import BOTH_DATABASES, Proxy
from test_webhooks import _post

pytestmark = pytest.mark.anyio

# Done, reopened (In Progress) 14 days later, Done again five minutes after that.
STEPS = {"d-1": ("done", "2026-11-06T12:30:00.000+0000"), "d-2": ("indeterminate", "2026-11-20T09:00:00.000+0000"),
         "d-3": ("done", "2026-11-20T09:05:00.000+0000")}  # fmt: skip


async def _deliver_jira(proxy: Proxy, key: str, delivery: str, category: str, at: str) -> None:
    payload = hooks.jira_issue("jira:issue_updated", key, category=category, resolution="Done" if category == "done" else None)
    payload["issue"]["fields"].update(updated=at, resolutiondate=at if category == "done" else None)
    body = hooks.dumps(payload)
    assert (await _post(proxy, "jira", body, hooks.jira_headers(body, delivery=f"{key}/{delivery}"))).status_code == 200


def _seen(item: dict[str, Any]) -> tuple[Any, ...]:
    return item["status"], item["completed_at"], item["rework"], [(c["from"], c["to"], c["ts"]) for c in item["history"]]


@BOTH_DATABASES
@pytest.mark.parametrize("order", [("d-1", "d-3", "d-2"), ("d-3", "d-1", "d-2"), ("d-1", "d-2", "d-3")])
async def test_a_reopening_delivered_after_the_recompletion_is_still_rework(tracked: Proxy, order: tuple[str, ...]) -> None:
    for delivery in ("d-1", "d-2", "d-3"):  # in order, on another ticket: what the item should say
        await _deliver_jira(tracked, "PAY-51", delivery, *STEPS[delivery])
    for delivery in order:
        await _deliver_jira(tracked, "PAY-50", delivery, *STEPS[delivery])
    expected, got = await tracked.get("/api/work-items/PAY-51"), await tracked.get("/api/work-items/PAY-50")
    assert _seen(expected)[:3] == ("done", "2026-11-20T09:05:00.000Z", {"at": "2026-11-20T09:00:00.000Z", "reason": "reopened", "by": "PAY-51/d-2"})
    if order[0] == "d-1":
        expected["rework"]["by"] = "PAY-50/d-2"
        assert _seen(got) == _seen(expected), got["history"]
    else:  # the first Done arrived after the second: an earlier event of the tracker is not a change
        assert _seen(got)[:2] == ("done", "2026-11-20T09:05:00.000Z"), got
    report = await tracked.get("/api/reports/adoption", since="2026-11-01T00:00:00Z", until="2026-11-10T00:00:00Z")
    if order[0] == "d-1":
        # The early November completion did not hold, delivered in any order (PAY-50 and PAY-51 alike).
        assert report["overall"]["rework"]["other"] == {"items": 2, "reworked": 2, "rate": 1.0}, report["overall"]["rework"]


async def test_a_late_done_of_an_item_open_now_is_not_given_a_made_up_reopening(tracked: Proxy) -> None:
    """In progress, Done, reopened, then commented on (still in progress); the Done delivered last. The
    tracker's last event time is the comment's, not the reopening's: a return dated there would misdate
    the rework (found by a review). Where it goes is not known, so it changes nothing, as before."""
    steps = [("p-1", "indeterminate", "2026-11-03T09:00:00.000+0000"), ("p-3", "indeterminate", "2026-11-17T09:00:00.000+0000"),
             ("p-4", "indeterminate", "2026-11-24T09:00:00.000+0000"), ("p-2", "done", "2026-11-10T09:00:00.000+0000")]  # fmt: skip
    for delivery, category, at in steps:
        await _deliver_jira(tracked, "PAY-60", delivery, category, at)
    item = await tracked.get("/api/work-items/PAY-60")
    assert (item["status"], item["rework"]) == ("in_progress", None), item
    assert [(c["to"], c["ts"]) for c in item["history"]] == [("in_progress", "2026-11-03T09:00:00.000Z")]


async def test_an_event_naming_no_status_does_not_order_the_trackers_status_events(tracked: Proxy) -> None:
    """Won't Do on 11-06, then an edit whose status is no category taskproxy reads (11-12), then the Done
    of 11-10 delivered last: the edit's time is no status's. It made the Done stale, and a late event
    then read it as the time the item was closed again (found by a review): in order, the item is done."""
    wont = hooks.jira_issue("jira:issue_updated", "PAY-70", category="done", resolution="Won't Do")
    wont["issue"]["fields"].update(updated="2026-11-06T09:00:00.000+0000", resolutiondate="2026-11-06T09:00:00.000+0000")
    edit = hooks.jira_issue("jira:issue_updated", "PAY-70", category="done")
    edit["issue"]["fields"]["status"]["statusCategory"]["key"] = "undefined"
    edit["issue"]["fields"].update(updated="2026-11-12T09:00:00.000+0000", resolutiondate=None)
    done = hooks.jira_issue("jira:issue_updated", "PAY-70", category="done", resolution="Done")
    done["issue"]["fields"].update(updated="2026-11-10T09:00:00.000+0000", resolutiondate="2026-11-10T09:00:00.000+0000")
    for n, payload in enumerate((wont, edit, done)):
        body = hooks.dumps(payload)
        assert (await _post(tracked, "jira", body, hooks.jira_headers(body, delivery=f"PAY-70/{n}"))).status_code == 200
    item = await tracked.get("/api/work-items/PAY-70")
    assert (item["status"], item["completed_at"], item["rework"]) == ("done", "2026-11-10T09:00:00.000Z", None), item
