"""Tracker webhooks: signatures, idempotency, malformed payloads, and the lifecycle they drive."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

import webhook_payloads as hooks
from conftest import BOTH_DATABASES, Proxy, make_settings, start_proxy
from taskproxy.timeutil import iso, parse_time, utcnow
from taskproxy.upstream.mock import MockProvider

pytestmark = pytest.mark.anyio


async def _ask(proxy: Proxy, key: str, item: str) -> None:
    """One answered chat request with `key` on `item`."""
    answered = await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                                     headers={"authorization": f"Bearer {key}", "x-work-item": item})  # fmt: skip
    assert answered.status_code == 200, answered.text


async def _post(proxy: Proxy, tracker: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await proxy.http.post(f"/webhooks/{tracker}", content=body, headers=headers)


async def test_github_pull_request_lifecycle_and_ticket_link(tracked: Proxy) -> None:
    opened = hooks.dumps(hooks.github_pull_request("opened", 12, branch="feature/PAY-7-retries"))
    response = await _post(tracked, "github", opened, hooks.github_headers(opened, "pull_request"))
    assert response.status_code == 200 and response.json()["items"] == [{"id": "acme/web-app#12", "status": "open", "linked": []}]
    merged = hooks.dumps(hooks.github_pull_request("closed", 12, merged=True, branch="feature/PAY-7-retries"))
    assert (await _post(tracked, "github", merged, hooks.github_headers(merged, "pull_request"))).status_code == 200

    item = await tracked.get("/api/work-items/acme%2Fweb-app%2312")
    assert (item["status"], item["source"], item["title"]) == ("done", "github", "Add retries")
    assert item["created_at"] == "2026-11-02T09:00:00.000Z" and item["completed_at"] == "2026-11-05T10:00:00.000Z"
    assert [i["id"] for i in await tracked.get("/api/work-items", status="done")] == ["acme/web-app#12"]
    # The ticket named in the branch is linked to the merged PR: its spend led to finished work.
    assert [link["id"] for link in (await tracked.get("/api/work-items/acme%2Fweb-app%2312"))["linked_from"]] == ["PAY-7"]

    unmerged = hooks.dumps(hooks.github_pull_request("closed", 13))
    await _post(tracked, "github", unmerged, hooks.github_headers(unmerged, "pull_request"))
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2313"))["status"] == "closed"


async def test_github_issues_completed_and_not_planned(tracked: Proxy) -> None:
    for number, reason, expected in ((3, "completed", "done"), (4, "not_planned", "closed")):
        body = hooks.dumps(hooks.github_issue("closed", number, state_reason=reason))
        assert (await _post(tracked, "github", body, hooks.github_headers(body, "issues"))).status_code == 200
        assert (await tracked.get(f"/api/work-items/acme%2Fweb-app%23{number}"))["status"] == expected


async def test_an_unverified_item_is_confirmed_by_the_tracker(tracked: Proxy) -> None:
    client = tracked.openai(await tracked.new_key())
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Work-Item": "PAY-8"})
    assert (await tracked.item("PAY-8", requests=1))["status"] == "unverified"
    body = hooks.dumps(hooks.jira_issue("jira:issue_updated", "PAY-8", category="indeterminate"))
    assert (await _post(tracked, "jira", body, hooks.jira_headers(body))).status_code == 200
    item = await tracked.get("/api/work-items/PAY-8")
    assert (item["status"], item["source"], item["requests"]) == ("in_progress", "jira", 1)
    assert item["created_at"] == "2026-11-01T09:15:00.000Z"  # the tracker's creation time, earlier than the first use


async def test_jira_done_and_wont_do(tracked: Proxy) -> None:
    done = hooks.dumps(hooks.jira_issue("jira:issue_updated", "PAY-9", category="done", resolution="Done"))
    wont = hooks.dumps(hooks.jira_issue("jira:issue_updated", "PAY-10", category="done", resolution="Won't Do"))
    for body in (done, wont):
        assert (await _post(tracked, "jira", body, hooks.jira_headers(body))).status_code == 200
    first, second = await tracked.get("/api/work-items/PAY-9"), await tracked.get("/api/work-items/PAY-10")
    assert (first["status"], first["completed_at"], first["url"]) == ("done", "2026-11-06T12:30:00.000Z", "https://acme.atlassian.net/browse/PAY-9")
    assert second["status"] == "closed"


async def test_linear_completed_canceled_and_stale_timestamps(tracked: Proxy) -> None:
    for identifier, state, expected in (("ENG-7", "completed", "done"), ("ENG-8", "canceled", "closed"), ("ENG-9", "started", "in_progress")):
        body = hooks.dumps(hooks.linear_issue("update", identifier, state_type=state))
        assert (await _post(tracked, "linear", body, hooks.linear_headers(body))).status_code == 200
        assert (await tracked.get(f"/api/work-items/{identifier}"))["status"] == expected
    replayed = hooks.dumps(hooks.linear_issue("update", "ENG-10", state_type="completed", timestamp_ms=1_700_000_000_000))
    response = await _post(tracked, "linear", replayed, hooks.linear_headers(replayed))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_signature"
    assert (await tracked.http.get("/api/work-items/ENG-10", headers=tracked.admin_headers)).status_code == 404


@pytest.mark.parametrize("tracker", ["github", "jira", "linear"])
async def test_bad_or_missing_signatures_get_401_and_change_nothing(tracked: Proxy, tracker: str) -> None:
    body = {
        "github": hooks.dumps(hooks.github_issue("closed", 5, state_reason="completed")),
        "jira": hooks.dumps(hooks.jira_issue("jira:issue_updated", "PAY-11", category="done")),
        "linear": hooks.dumps(hooks.linear_issue("update", "ENG-11", state_type="completed")),
    }[tracker]
    signed = {"github": lambda b, **k: hooks.github_headers(b, "issues", **k), "jira": hooks.jira_headers, "linear": hooks.linear_headers}[tracker]
    wrong = signed(body, secret="not-the-secret")
    unsigned = {k: v for k, v in signed(body).items() if "signature" not in k.lower()}
    tampered = signed(body)
    for headers, content in ((wrong, body), (unsigned, body), (tampered, body.replace(b"Acme", b"Evil").replace(b"PAY-11", b"PAY-12").replace(b"ENG-11", b"ENG-12"))):
        response = await _post(tracked, tracker, content, headers)
        assert response.status_code == 401, (tracker, response.text)
        assert response.json()["error"]["code"] == "invalid_signature"
    assert await tracked.get("/api/work-items") == []


@BOTH_DATABASES
async def test_redelivery_changes_nothing(tracked: Proxy) -> None:
    body = hooks.dumps(hooks.github_issue("closed", 6, state_reason="completed"))
    headers = hooks.github_headers(body, "issues", delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    first = await _post(tracked, "github", body, headers)
    reopened = hooks.dumps(hooks.github_issue("reopened", 6))
    await _post(tracked, "github", reopened, hooks.github_headers(reopened, "issues"))
    again = await _post(tracked, "github", body, headers)  # the old "closed" delivery, redelivered
    assert first.json()["status"] == "applied" and again.json()["status"] == "duplicate"
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%236"))["status"] == "open"


async def test_malformed_unknown_and_unconfigured(tracked: Proxy, tmp_path: Path, fake) -> None:  # type: ignore[no-untyped-def]
    for raw in (b"{not json", b"[1,2]", hooks.dumps({"action": "closed", "issue": {"number": 1}})):
        response = await _post(tracked, "github", raw, hooks.github_headers(raw, "issues"))
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request", raw
    ping = hooks.dumps({"zen": "Keep it logically awesome.", "hook_id": 1, "repository": {"full_name": "acme/web"}})
    response = await _post(tracked, "github", ping, hooks.github_headers(ping, "ping"))
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    comment = hooks.dumps({"webhookEvent": "comment_created", "comment": {"id": "1"}})
    assert (await _post(tracked, "jira", comment, hooks.jira_headers(comment))).json()["status"] == "ignored"
    assert await tracked.get("/api/work-items") == []

    (tmp_path / "plain").mkdir()
    async for plain in start_proxy(make_settings(tmp_path / "plain"), MockProvider.asgi(fake.app()), fake):
        body = hooks.dumps(hooks.github_issue("closed", 1))
        off = await _post(plain, "github", body, hooks.github_headers(body, "issues"))
        assert off.status_code == 404 and "secret_env" in off.json()["error"]["message"]


async def test_out_of_order_deliveries_never_move_an_item_back(tracked: Proxy) -> None:
    done = hooks.jira_issue("jira:issue_updated", "PAY-20", category="done")  # resolved 2026-11-06T12:30
    late = hooks.jira_issue("jira:issue_updated", "PAY-20", category="indeterminate")
    late["issue"]["fields"]["updated"] = "2026-11-06T12:00:00.000+0000"  # happened before, arrives after
    late["issue"]["fields"]["summary"] = "Refund retries (old name)"
    for payload in (done, late):
        body = hooks.dumps(payload)
        assert (await _post(tracked, "jira", body, hooks.jira_headers(body))).status_code == 200
    item = await tracked.get("/api/work-items/PAY-20")
    # Neither its status nor its title: the newer event's stand.
    assert (item["status"], item["completed_at"], item["title"]) == ("done", "2026-11-06T12:30:00.000Z", "Refund retries")
    assert [change["to"] for change in item["history"]] == ["done"]


@BOTH_DATABASES
async def test_concurrent_deliveries_for_a_new_item_all_apply(tracked: Proxy) -> None:
    import asyncio

    bodies = [hooks.dumps(hooks.github_issue("closed" if n % 2 else "opened", 30, state_reason="completed")) for n in range(6)]
    responses = await asyncio.gather(*(_post(tracked, "github", b, hooks.github_headers(b, "issues")) for b in bodies))
    assert [r.status_code for r in responses] == [200] * 6
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2330"))["status"] in ("open", "done")


async def test_duplicate_issues_are_closed_and_bracketed_ticket_titles_link(tracked: Proxy) -> None:
    body = hooks.dumps(hooks.github_issue("closed", 31, state_reason="duplicate"))
    await _post(tracked, "github", body, hooks.github_headers(body, "issues"))
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2331"))["status"] == "closed"
    merged = hooks.dumps(hooks.github_pull_request("closed", 32, merged=True, branch="main-fix", title="[PAY-21] Fix refunds"))
    await _post(tracked, "github", merged, hooks.github_headers(merged, "pull_request"))
    assert [link["id"] for link in (await tracked.get("/api/work-items/acme%2Fweb-app%2332"))["linked_from"]] == ["PAY-21"]


@pytest.mark.parametrize(
    "payload",
    [{"action": "closed", "pull_request": [1], "repository": {"full_name": "a/b"}}, {"action": "closed", "issue": "x", "repository": {"full_name": "a/b"}},
     {"action": "closed", "issue": {"number": "7"}, "repository": {"full_name": "a/b"}}],
)  # fmt: skip
async def test_signed_but_malformed_deliveries_get_400(tracked: Proxy, payload: dict) -> None:
    event = "pull_request" if "pull_request" in payload else "issues"
    body = hooks.dumps(payload)
    response = await _post(tracked, "github", body, hooks.github_headers(body, event))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def _pr_with(**changes: object) -> dict:
    payload = hooks.github_pull_request("opened", 50)
    payload["pull_request"].update(changes)
    return payload


def _gitlab_action(action: object) -> dict:
    payload = hooks.gitlab_merge_request("open", 50)
    payload["object_attributes"]["action"] = action
    return payload


def _jira_status_category(category: object) -> dict:
    payload = hooks.jira_issue("jira:issue_updated", "PAY-50", category="done")
    payload["issue"]["fields"]["status"]["statusCategory"] = category
    return payload


@pytest.mark.parametrize(
    ("tracker", "payload", "event"),
    [
        ("github", {**hooks.github_pull_request("opened", 50), "action": ["opened"]}, "pull_request"),  # a list where a string goes
        ("github", {**hooks.github_issue("opened", 50), "action": {"a": 1}}, "issues"),
        ("gitlab", _gitlab_action(["open"]), "Merge Request Hook"),
        ("jira", _jira_status_category("done"), None),  # a string where an object goes
        ("jira", _jira_status_category(["done"]), None),
    ],
)
async def test_deliveries_with_fields_of_the_wrong_type_get_400_not_500(tracked: Proxy, tracker: str, payload: dict, event: str | None) -> None:
    body = hooks.dumps(payload)
    headers = {"github": lambda: hooks.github_headers(body, event), "gitlab": lambda: hooks.gitlab_headers(event),  # type: ignore[arg-type]
               "jira": lambda: hooks.jira_headers(body)}[tracker]()  # fmt: skip
    response = await _post(tracked, tracker, body, headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request", response.text
    assert (await tracked.http.get("/healthz")).status_code == 200


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-12-31T23:59:59Z"])
async def test_tracker_times_outside_the_calendar_are_ignored_not_a_500(tracked: Proxy, when: str) -> None:
    """A time that is before year 1 or after 9999 in UTC (or before 1970) is no time: the delivery
    applies, with the time it was received."""
    await _deliver_github(tracked, _pr_with(created_at=when, updated_at=when))
    item = await tracked.get("/api/work-items/acme%2Fweb-app%2350")
    assert item["status"] == "open" and item["created_at"] >= "2026"


@BOTH_DATABASES
async def test_a_long_delivery_id_and_control_characters_in_a_title_are_stored(tracked: Proxy) -> None:
    """PostgreSQL refuses NUL in text and a delivery id over its column: both were a 500 on every retry."""
    payload = _pr_with(title="Fix\x00 the\x07 thing")
    body = hooks.dumps(payload)
    response = await _post(tracked, "github", body, hooks.github_headers(body, "pull_request", delivery="d" * 300))
    assert response.status_code == 200, response.text
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2350"))["title"] == "Fix  the  thing"
    again = await _post(tracked, "github", body, hooks.github_headers(body, "pull_request", delivery="d" * 300))
    assert again.status_code == 200 and again.json()["status"] == "duplicate"


async def test_a_revert_links_no_ticket_so_the_reverted_work_is_not_an_outcome(tracked: Proxy) -> None:
    """GitHub's Revert button names the reverted PR's branch and title, and so its ticket: linked, the
    revert counted as the ticket's merged PR that held, and the ticket's spend as an outcome."""
    await _deliver_github(tracked, hooks.github_pull_request("closed", 60, merged=True, branch="feature/PAY-60-x", title="[PAY-60] Add retries"))
    revert = hooks.github_pull_request("closed", 61, merged=True, branch="revert-60-feature/PAY-60-x", title='Revert "[PAY-60] Add retries"')
    revert["pull_request"]["body"] = "Reverts Acme/Web-App#60"
    revert["pull_request"]["merged_at"] = "2026-11-06T10:00:00Z"
    body = hooks.dumps(revert)
    answer = await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))
    assert answer.status_code == 200 and answer.json()["items"][0]["linked"] == [], answer.text
    assert [link["id"] for link in (await tracked.get("/api/work-items/acme%2Fweb-app%2360"))["linked_from"]] == ["PAY-60"]
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2361"))["linked_from"] == []
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2360"))["rework"]["reason"] == "reverted"
    edited = hooks.github_pull_request("closed", 63, merged=True, branch="revert-60-feature/PAY-60-x", title="Revert PAY-60 retries")
    body = hooks.dumps(edited)  # GitHub's revert branch, its title edited, no body naming the PR
    answer = await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))
    assert answer.status_code == 200 and answer.json()["items"][0]["linked"] == [], answer.text
    merged = hooks.dumps(hooks.gitlab_merge_request("merge", 62, branch="revert-1a2b3c4d", title='Revert "PAY-60 Add retries"'))
    answer = await _post(tracked, "gitlab", merged, hooks.gitlab_headers("Merge Request Hook"))
    assert answer.status_code == 200 and answer.json()["items"][0]["linked"] == [], answer.text


@BOTH_DATABASES
async def test_a_revert_delivered_before_the_merge_it_undoes_marks_it_when_the_merge_arrives(tracked: Proxy) -> None:
    """Deliveries come late and out of order (GitHub redelivers a failed one with its first times): a
    revert that arrives before its merge is rework once the merge arrives, as in the other order."""
    for number, revert_of, merged_at in ((71, 70, "2026-11-08T10:00:00Z"), (73, 72, "2026-12-01T10:00:00Z")):  # 3 and 26 days after
        revert = hooks.github_pull_request("closed", number, merged=True, branch=f"revert-{revert_of}-feature/x", title='Revert "Add retries"')
        revert["pull_request"].update(body=f"Reverts Acme/Web-App#{revert_of}", merged_at=merged_at, closed_at=merged_at)
        await _deliver_github(tracked, revert)
    for number in (70, 72):  # merged 2026-11-05T10:00 (the payload's)
        await _deliver_github(tracked, hooks.github_pull_request("closed", number, merged=True))
    reverted = await tracked.get("/api/work-items/acme%2Fweb-app%2370")
    assert reverted["status"] == "done" and reverted["rework"] == {"at": "2026-11-08T10:00:00.000Z", "reason": "reverted", "by": "acme/web-app#71"}
    # As in the other order: the revert is no merged PR of the reverted one, nor it one of the revert.
    assert reverted["linked_from"] == [] and reverted["linked"] == [], reverted
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2371"))["linked_from"] == []
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2372"))["rework"] is None  # outside reports.rework_days (14)
    report = await tracked.get("/api/reports/adoption", since="2026-11-01T00:00:00Z", until="2026-11-15T00:00:00Z")
    assert report["overall"]["rework"]["by_reason"]["reverted"] == 1, report["overall"]["rework"]


async def test_a_completion_before_the_creation_gives_no_negative_cycle_time(tracked: Proxy) -> None:
    merged = hooks.github_pull_request("closed", 80, merged=True)  # merged 2026-11-05T10:00
    merged["pull_request"]["created_at"] = "2026-11-06T10:00:00Z"  # a day after
    await _deliver_github(tracked, merged)
    in_1970 = hooks.github_pull_request("closed", 81, merged=True)  # created 2026-11-02T09:00, merged "in 1970"
    in_1970["pull_request"]["merged_at"] = "1970-01-02T00:00:00Z"
    await _deliver_github(tracked, in_1970)
    # Registered now (an admin, or the proxy meeting it in a request), then a merge from November
    # delivered late, without its creation time.
    assert (await tracked.http.post("/api/work-items", json={"id": "acme/web-app#82"}, headers=tracked.admin_headers)).status_code == 201
    late = hooks.github_pull_request("closed", 82, merged=True)
    del late["pull_request"]["created_at"]
    await _deliver_github(tracked, late)
    for number in (80, 81, 82):
        item = await tracked.get(f"/api/work-items/acme%2Fweb-app%23{number}")
        assert item["status"] == "done" and item["cycle_time_hours"] == 0, item
    report = await tracked.get("/api/reports/adoption", since="1970-01-01T00:00:00Z", until="2026-11-15T00:00:00Z")
    assert report["overall"]["completed_items"] == 3


async def test_a_flood_of_bad_signatures_is_logged_a_line_a_minute_not_a_line_each(tracked: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone can post to a webhook: each refusal wrote a WARNING line (~150 bytes), ~170 KiB of log a
    second from one client. Refusals are counted and logged at most once a minute per tracker and reason."""
    body = hooks.dumps(hooks.github_issue("closed", 5, state_reason="completed"))
    with caplog.at_level("WARNING", logger="taskproxy.webhooks"):
        for _ in range(200):
            answer = await _post(tracked, "github", body, hooks.github_headers(body, "issues", secret="not-the-secret"))
            assert answer.status_code == 401
    lines = [record.getMessage() for record in caplog.records if record.name == "taskproxy.webhooks"]
    assert len(lines) == 1 and "refused 1 github deliveries (invalid_signature)" in lines[0], lines


async def test_a_signed_delivery_of_too_many_values_is_refused_off_the_event_loop(tracked: Proxy) -> None:
    """A delivery is decoded like a request body: in a worker thread once large, and refused past
    limits.max_json_nodes (5 MiB of `[[],...]`, validly signed, held the event loop ~1 s each)."""
    payload = hooks.github_issue("closed", 5, state_reason="completed")
    payload["padding"] = [[]] * 1_600_000  # 4.6 MiB, 1.6 million values
    body = hooks.dumps(payload)
    answer = await _post(tracked, "github", body, hooks.github_headers(body, "issues"))
    assert answer.status_code == 413 and "limits.max_json_nodes" in answer.json()["error"]["message"], answer.text
    assert (await tracked.http.get("/api/work-items/acme%2Fweb-app%235", headers=tracked.admin_headers)).status_code == 404


@BOTH_DATABASES
async def test_a_size_no_column_holds_is_left_out_and_the_merge_still_counts(tracked: Proxy) -> None:
    """A merged pull request whose additions no 32-bit column holds (5,000,000,000) was a 500: the
    delivery rolled back, the merge and its ticket's link lost, and every redelivery failing again.
    The size is left out as unknown; the merge is applied."""
    merged = hooks.github_pull_request("closed", 90, merged=True, branch="feature/PAY-90-x")
    merged["pull_request"].update(additions=5_000_000_000, deletions=2**64 - 1, changed_files=3)
    await _deliver_github(tracked, merged)
    item = await tracked.get("/api/work-items/acme%2Fweb-app%2390")
    assert item["status"] == "done" and [link["id"] for link in item["linked_from"]] == ["PAY-90"], item
    assert (item["size"]["lines_added"], item["size"]["lines_deleted"], item["size"]["files_changed"]) == (None, None, 3), item["size"]


async def test_a_revert_naming_another_repository_marks_nothing(tracked: Proxy) -> None:
    """GitHub's Revert button names a pull request of the same repository. A merged PR whose body names
    another repository's (`Reverts other-org/lib#3`) marked that one as reverted: anyone could raise
    another team's rework rate. It is not taken as a revert."""
    other = hooks.github_pull_request("closed", 3, merged=True)
    other["repository"] = {**other["repository"], "full_name": "other-org/lib", "name": "lib"}
    other["pull_request"]["html_url"] = "https://github.com/other-org/lib/pull/3"
    await _deliver_github(tracked, other)
    tidy = hooks.github_pull_request("closed", 91, merged=True, title="Tidy up")
    tidy["pull_request"].update(body="Reverts other-org/lib#3", merged_at="2026-11-06T10:00:00Z")
    await _deliver_github(tracked, tidy)
    assert (await tracked.get("/api/work-items/other-org%2Flib%233"))["rework"] is None


async def test_an_item_of_one_tracker_is_not_changed_by_another_under_the_same_id(tracked: Proxy) -> None:
    """A GitLab project named as a GitHub repository gives its issues the same ids (`acme/web-app#5`):
    a GitLab reopen moved the done GitHub issue back to open and marked it as rework. The tracker whose
    events an item follows decides it; another tracker's event for it is skipped, saying so."""
    body = hooks.dumps(hooks.github_issue("closed", 5, state_reason="completed"))
    assert (await _post(tracked, "github", body, hooks.github_headers(body, "issues"))).status_code == 200
    reopened = hooks.gitlab_issue("reopen", 5)
    reopened["project"] = {**reopened["project"], "path_with_namespace": "Acme/Web-App"}
    answer = await _post(tracked, "gitlab", hooks.dumps(reopened), hooks.gitlab_headers("Issue Hook"))
    assert answer.status_code == 200 and answer.json()["skipped"] == ["acme/web-app#5: an item of github"], answer.text
    item = await tracked.get("/api/work-items/acme%2Fweb-app%235")
    assert item["status"] == "done" and item["rework"] is None and "github.com" in item["url"], item


async def test_an_older_size_report_does_not_replace_the_newer(tracked: Proxy) -> None:
    newer = _pr_with(updated_at="2026-11-05T10:00:00Z", additions=500)
    older = _pr_with(updated_at="2026-11-02T10:00:00Z", additions=5)
    for payload in (newer, older):
        await _deliver_github(tracked, payload)
    item = await tracked.get("/api/work-items/acme%2Fweb-app%2350")
    assert item["size"]["lines_added"] == 500, item["size"]
    assert [entry["lines_added"] for entry in item["size_history"]] == [5, 500], item["size_history"]


async def _deliver_github(proxy: Proxy, payload: dict, event: str = "pull_request") -> None:
    body = hooks.dumps(payload)
    response = await _post(proxy, "github", body, hooks.github_headers(body, event))
    assert response.status_code == 200, response.text


async def test_a_merge_delivered_late_completes_the_pr_whatever_was_edited_locally(tracked: Proxy) -> None:
    """GitHub redelivers a failed delivery with its original merged_at: an admin's edit, or the proxy
    registering the item from a request, since then must not make the merge stale."""
    await _deliver_github(tracked, hooks.github_pull_request("opened", 40))  # updated 2026-11-05T10:00 in the payload
    patched = await tracked.http.patch("/api/work-items/acme%2Fweb-app%2340", json={"title": "Renamed by an admin", "team": "web"},
                                       headers=tracked.admin_headers)  # now, long after the merge below
    assert patched.status_code == 200
    key = await tracked.new_key()
    await tracked.openai(key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                                      extra_headers={"X-Work-Item": "acme/web-app#41"})  # registered by a request, now
    await tracked.item("acme/web-app#41", requests=1)
    for number in (40, 41):
        merged = hooks.github_pull_request("closed", number, merged=True)
        merged["pull_request"]["merged_at"] = merged["pull_request"]["closed_at"] = "2026-11-06T08:00:00Z"
        await _deliver_github(tracked, merged)
        item = await tracked.get(f"/api/work-items/acme%2Fweb-app%23{number}")
        assert (item["status"], item["completed_at"]) == ("done", "2026-11-06T08:00:00.000Z"), item
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2340"))["title"] == "Add retries"  # the tracker's fields apply too


async def test_a_merged_pull_request_is_final(tracked: Proxy) -> None:
    await _deliver_github(tracked, hooks.github_pull_request("closed", 42, merged=True))  # merged 2026-11-05T10:00
    later = hooks.github_pull_request("ready_for_review", 42)
    later["pull_request"]["updated_at"] = "2026-11-07T10:00:00Z"  # newer than the merge, from the same tracker
    await _deliver_github(tracked, later)
    item = await tracked.get("/api/work-items/acme%2Fweb-app%2342")
    assert (item["status"], item["completed_at"]) == ("done", "2026-11-05T10:00:00.000Z")
    assert [change["to"] for change in item["history"]] == ["done"]


async def test_a_tracker_time_in_the_future_is_clamped_to_when_it_arrived(tracked: Proxy) -> None:
    from datetime import datetime, timedelta

    future = hooks.jira_issue("jira:issue_updated", "PAY-30", category="done")
    future["issue"]["fields"]["resolutiondate"] = "2096-01-01T00:00:00.000+0000"
    before = datetime.utcnow()
    body = hooks.dumps(future)
    assert (await _post(tracked, "jira", body, hooks.jira_headers(body))).status_code == 200
    item = await tracked.get("/api/work-items/PAY-30")
    completed = datetime.fromisoformat(item["completed_at"].removesuffix("Z"))
    assert before - timedelta(seconds=1) <= completed <= datetime.utcnow() + timedelta(seconds=1)
    assert item["cycle_time_hours"] < 24 * 365 and "2096-01-01" in item["history"][-1]["note"]
    # A genuine change after it is not ignored as "older" than 2096.
    reopened = hooks.jira_issue("jira:issue_updated", "PAY-30", category="indeterminate")
    reopened["issue"]["fields"]["updated"] = (datetime.utcnow() + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    body = hooks.dumps(reopened)
    assert (await _post(tracked, "jira", body, hooks.jira_headers(body))).status_code == 200
    assert (await tracked.get("/api/work-items/PAY-30"))["status"] == "in_progress"


@BOTH_DATABASES
async def test_gitlab_merge_request_and_issue_lifecycle(tracked: Proxy) -> None:
    opened = hooks.dumps(hooks.gitlab_merge_request("open", 5, branch="feature/PAY-9-charges"))
    response = await _post(tracked, "gitlab", opened, hooks.gitlab_headers("Merge Request Hook"))
    assert response.status_code == 200 and response.json()["items"] == [{"id": "acme/platform/billing-api!5", "status": "open", "linked": []}]
    merged = hooks.dumps(hooks.gitlab_merge_request("merge", 5, branch="feature/PAY-9-charges"))
    assert (await _post(tracked, "gitlab", merged, hooks.gitlab_headers("Merge Request Hook"))).status_code == 200
    item = await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%215")
    assert (item["status"], item["source"], item["title"]) == ("done", "gitlab", "Retry failed charges")
    assert item["created_at"] == "2026-11-02T09:00:00.000Z" and item["completed_at"] == "2026-11-05T10:00:00.000Z"  # "... UTC" times
    assert [link["id"] for link in item["linked_from"]] == ["PAY-9"]

    closed = hooks.dumps(hooks.gitlab_merge_request("close", 6))
    await _post(tracked, "gitlab", closed, hooks.gitlab_headers("Merge Request Hook"))
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%216"))["status"] == "closed"
    issue = hooks.dumps(hooks.gitlab_issue("close", 23))
    assert (await _post(tracked, "gitlab", issue, hooks.gitlab_headers("Issue Hook"))).json()["status"] == "applied"
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%2323"))["status"] == "done"


@pytest.mark.parametrize("field", ["moved_to_id", "duplicated_to_id"])
async def test_a_gitlab_issue_moved_to_another_project_or_closed_as_a_duplicate_is_closed_not_done(tracked: Proxy, field: str) -> None:
    """GitLab closes the old issue when it moves one (its only event) or closes one as a duplicate,
    saying where it went: both were `done`, completed work, a moved issue counted twice once the new
    one was done (found by a review)."""
    payload = hooks.gitlab_issue("close", 30)
    payload["object_attributes"][field] = 777
    assert (await _post(tracked, "gitlab", hooks.dumps(payload), hooks.gitlab_headers("Issue Hook"))).status_code == 200
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%2330"))["status"] == "closed"


async def test_gitlab_token_and_redelivery(tracked: Proxy) -> None:
    body = hooks.dumps(hooks.gitlab_issue("close", 24))
    for headers in (hooks.gitlab_headers("Issue Hook", token="gl-token-5"), {"content-type": "application/json", "x-gitlab-event": "Issue Hook"}):
        refused = await _post(tracked, "gitlab", body, headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_signature"
    assert await tracked.get("/api/work-items") == []
    headers = hooks.gitlab_headers("Issue Hook", delivery="2f3c8f3e-7f6e-4a2b-9a63-1b2c3d4e5f60")
    assert (await _post(tracked, "gitlab", body, headers)).json()["status"] == "applied"
    reopened = hooks.dumps(hooks.gitlab_issue("reopen", 24))
    await _post(tracked, "gitlab", reopened, hooks.gitlab_headers("Issue Hook"))
    assert (await _post(tracked, "gitlab", body, headers)).json()["status"] == "duplicate"
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%2324"))["status"] == "open"
    note = hooks.dumps({"object_kind": "note", "project": {"path_with_namespace": "a/b"}, "object_attributes": {"note": "LGTM"}})
    assert (await _post(tracked, "gitlab", note, hooks.gitlab_headers("Note Hook"))).json()["status"] == "ignored"


async def test_gitlab_ids_and_links_are_work_items(tracked: Proxy) -> None:
    client = tracked.openai(await tracked.new_key())
    for sent in ("Acme/Platform/Billing-API!8", "https://gitlab.example.com/acme/platform/billing-api/-/merge_requests/8/diffs"):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Work-Item": sent})
    item = await tracked.item("acme/platform/billing-api!8", requests=2)
    assert item["id"] == "acme/platform/billing-api!8"


@BOTH_DATABASES
async def test_size_and_rework_from_the_trackers(tracked: Proxy) -> None:
    for number in (12, 14):  # two merged pull requests: +100 −3 lines, 5 files each (the payload's)
        merged = hooks.dumps(hooks.github_pull_request("closed", number, merged=True))
        await _post(tracked, "github", merged, hooks.github_headers(merged, "pull_request"))
    item = await tracked.get("/api/work-items/acme%2Fweb-app%2312")
    assert item["size"] == {"lines_added": 100, "lines_deleted": 3, "files_changed": 5, "points": None} and item["rework"] is None

    for number, revert_of, merged_at in ((50, 12, "2026-11-08T10:00:00Z"), (51, 14, "2026-12-01T10:00:00Z")):  # 3 days, 26 days later
        revert = hooks.github_pull_request("closed", number, merged=True, branch=f"revert-{revert_of}-feature/x", title='Revert "Add retries"')
        revert["pull_request"].update(body=f"Reverts Acme/Web-App#{revert_of}", merged_at=merged_at, closed_at=merged_at)
        body = hooks.dumps(revert)
        await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))
    reverted = await tracked.get("/api/work-items/acme%2Fweb-app%2312")
    assert reverted["rework"] == {"at": "2026-11-08T10:00:00.000Z", "reason": "reverted", "by": "acme/web-app#50"}
    assert reverted["status"] == "done"  # still merged: the revert is what is marked
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2314"))["rework"] is None  # outside reports.rework_days (14)

    done = hooks.jira_issue("jira:issue_updated", "PAY-21", category="done", resolution="Done")
    done["issue"]["fields"]["customfield_10016"] = 5
    reopened = hooks.jira_issue("jira:issue_updated", "PAY-21", category="indeterminate")
    reopened["issue"]["fields"].update(customfield_10016=8, updated="2026-11-09T09:00:00.000+0000")
    headers = hooks.jira_headers(hooks.dumps(done), delivery="d-done")
    await _post(tracked, "jira", hooks.dumps(done), headers)
    await _post(tracked, "jira", hooks.dumps(reopened), hooks.jira_headers(hooks.dumps(reopened), delivery="d-reopen"))
    ticket = await tracked.get("/api/work-items/PAY-21")
    assert ticket["status"] == "in_progress" and ticket["rework"] == {"at": "2026-11-09T09:00:00.000Z", "reason": "reopened", "by": "d-reopen"}
    assert ticket["size"]["points"] == 8 and [h["points"] for h in ticket["size_history"]] == [5, 8]

    estimate = hooks.linear_issue("update", "ENG-31", state_type="started")
    estimate["data"]["estimate"] = 3
    body = hooks.dumps(estimate)
    await _post(tracked, "linear", body, hooks.linear_headers(body))
    assert (await tracked.get("/api/work-items/ENG-31"))["size"]["points"] == 3


def _github_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@BOTH_DATABASES
async def test_a_reverted_pull_request_takes_its_ticket_with_it(tracked: Proxy) -> None:
    """The work was on the ticket (its branch names it), then the pull request was merged, the ticket
    done, and GitHub's revert button undid the merge. Only the pull request, which spent nothing, was
    marked: the ticket stayed completed, AI-assisted and not reworked, and the revert counted as one
    more item of work completed. Now the ticket is reworked too, and the revert is closed, merged."""
    since = utcnow() - timedelta(minutes=5)
    key = await tracked.new_key()
    for _ in range(2):
        await _ask(tracked, key, "PAY-30")
    await tracked.events(2)
    merged_at = _github_time(utcnow() - timedelta(minutes=2))
    pull = hooks.github_pull_request("closed", 31, merged=True, branch="feature/PAY-30-retries")
    pull["pull_request"].update(merged_at=merged_at, closed_at=merged_at)
    body = hooks.dumps(pull)
    assert (await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))).status_code == 200
    done = await tracked.http.post("/api/work-items/PAY-30/complete", headers=tracked.admin_headers)
    assert done.status_code == 200, done.text
    await asyncio.sleep(1.1)  # GitHub's times are whole seconds: the revert comes after the completion
    reverted_at = _github_time(utcnow())
    revert = hooks.github_pull_request("closed", 32, merged=True, branch="revert-31-feature/PAY-30-retries", title='Revert "Add retries"')
    revert["pull_request"].update(body="Reverts Acme/Web-App#31", merged_at=reverted_at, closed_at=reverted_at)
    body = hooks.dumps(revert)
    assert (await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))).status_code == 200

    ticket = await tracked.get("/api/work-items/PAY-30")
    assert ticket["rework"] == {"at": reverted_at.replace("Z", ".000Z"), "reason": "reverted", "by": "acme/web-app#32"}, ticket["rework"]
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2332"))["status"] == "closed"
    overall = (await tracked.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1))))["overall"]
    assert overall["completed_items"] == 2 and overall["ai_assisted_items"] == 1  # PAY-30 and #31; not the revert
    assert overall["rework"]["ai_assisted"] == {"items": 1, "reworked": 1, "rate": 1.0}, overall["rework"]
    assert overall["spend_without_outcome_breakdown"]["reworked"] == overall["spend_usd"] > 0, overall

    # Reopened, fixed and done again: the reopening marks it (the revert's mark kept it from being
    # recorded), and the new completion is one that held.
    reopened = await tracked.http.patch("/api/work-items/PAY-30", json={"status": "in_progress"}, headers=tracked.admin_headers)
    assert reopened.status_code == 200, reopened.text
    assert (await tracked.get("/api/work-items/PAY-30"))["rework"]["reason"] == "reopened"
    again = utcnow()
    await _ask(tracked, key, "PAY-30")  # fixed with AI: done again after a reopening, assisted by the work since it
    await tracked.events(3)
    assert (await tracked.http.post("/api/work-items/PAY-30/complete", headers=tracked.admin_headers)).status_code == 200
    later = (await tracked.get("/api/reports/adoption", since=iso(again), until=iso(utcnow() + timedelta(minutes=1))))["overall"]
    assert later["completed_items"] == 1 and later["rework"]["ai_assisted"] == {"items": 1, "reworked": 0, "rate": 0.0}, later


@BOTH_DATABASES
async def test_a_tickets_work_counts_in_the_cost_of_the_pull_request_it_led_to(tracked: Proxy) -> None:
    """Nine requests on the ticket, one on its pull request, the pull request merged, the ticket closed
    as Won't Do: the merge covered the ticket's spend (no spend without outcome), yet only the pull
    request's tenth was in the cost per completed item. The ticket, not done, counts in its merged
    pull request's cost; done, it would count as its own."""
    since = utcnow() - timedelta(minutes=5)
    key = await tracked.new_key()
    for item, times in (("PAY-10", 9), ("Acme/Web-App#11", 1)):
        for _ in range(times):
            await _ask(tracked, key, item)
    await tracked.events(10)
    await asyncio.sleep(1.1)  # GitHub's times are whole seconds: merged after the requests
    merged_at = _github_time(utcnow())
    pull = hooks.github_pull_request("closed", 11, merged=True, branch="feature/PAY-10-retries")
    pull["pull_request"].update(merged_at=merged_at, closed_at=merged_at)
    body = hooks.dumps(pull)
    assert (await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))).status_code == 200
    await asyncio.sleep(1.1)
    for _ in range(3):  # and some after the merge: in the pull request's cost too, not also spend without outcome
        await _ask(tracked, key, "PAY-10")
    await tracked.events(13)
    wont = hooks.jira_issue("jira:issue_updated", "PAY-10", category="done", resolution="Won't Do")
    wont["issue"]["fields"].update(resolutiondate=_jira_time(utcnow()), updated=_jira_time(utcnow()))
    body = hooks.dumps(wont)
    assert (await _post(tracked, "jira", body, hooks.jira_headers(body))).status_code == 200

    ticket, pr = await tracked.get("/api/work-items/PAY-10"), await tracked.get("/api/work-items/acme%2Fweb-app%2311")
    assert ticket["status"] == "closed" and pr["status"] == "done"
    overall = (await tracked.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1))))["overall"]
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (1, 1), overall
    events = await tracked.get("/api/usage/events", work_item="PAY-10")
    merge = parse_time(merged_at)
    before_merge = sum(e["cost_usd"] for e in events if parse_time(e["ts"]) <= merge)
    after_merge = sum(e["cost_usd"] for e in events if parse_time(e["ts"]) > merge)
    assert len(events) == 12 and after_merge > 0
    # The nine requests before the merge are the pull request's cost; the three after it led to nothing.
    assert overall["cost_per_completed_item"]["total"] == pytest.approx(before_merge + pr["cost_usd"]), overall
    assert overall["spend_without_outcome_breakdown"]["closed"] == pytest.approx(after_merge), overall
    assert overall["cost_per_completed_item"]["total"] + overall["spend_without_outcome_usd"] == pytest.approx(overall["spend_usd"])


@BOTH_DATABASES
async def test_a_pull_request_carrying_a_ticket_counts_in_the_tickets_team(tracked: Proxy) -> None:
    """The requests name the ticket (its branch), so the pull request has no usage of its own, and no
    team: the cost it carries counted in `overall` and in no team's figures."""
    since = utcnow() - timedelta(minutes=5)
    keys = [await tracked.new_key(owner, "payments") for owner in ("pa", "pb", "pc", "pd", "pe")]
    for key in keys:
        await _ask(tracked, key, "PAY-70")
    await tracked.events(5)
    await asyncio.sleep(1.1)
    merged_at = _github_time(utcnow())
    pull = hooks.github_pull_request("closed", 71, merged=True, branch="feature/PAY-70-ledger")
    pull["pull_request"].update(merged_at=merged_at, closed_at=merged_at)
    body = hooks.dumps(pull)
    assert (await _post(tracked, "github", body, hooks.github_headers(body, "pull_request"))).status_code == 200
    report = await tracked.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1)))
    payments = next(t for t in report["teams"] if t["team"] == "payments")
    assert payments["completed_items"] == report["overall"]["completed_items"] == 1, payments
    assert payments["cost_per_completed_item"]["total"] == report["overall"]["cost_per_completed_item"]["total"] > 0, payments


async def test_a_ticket_with_another_merge_standing_is_not_reworked_by_one_revert_and_a_reland_is_work(tracked: Proxy) -> None:
    """Two pull requests out of PAY-80, one reverted: the ticket's work did not all go. And a revert of
    a revert lands the work again: done, not closed, and the revert it undoes is not marked."""
    async def merged(number: int, minutes_ago: float, branch: str, title: str = "Add retries", body: str | None = None) -> None:
        at = _github_time(utcnow() - timedelta(minutes=minutes_ago))
        pull = hooks.github_pull_request("closed", number, merged=True, branch=branch, title=title)
        pull["pull_request"].update(merged_at=at, closed_at=at, **({"body": body} if body else {}))
        raw = hooks.dumps(pull)
        assert (await _post(tracked, "github", raw, hooks.github_headers(raw, "pull_request"))).status_code == 200

    assert (await tracked.http.post("/api/work-items", json={"id": "PAY-80"}, headers=tracked.admin_headers)).status_code == 201
    await merged(81, 30, "feature/PAY-80-one")
    await merged(82, 29, "feature/PAY-80-two")
    assert (await tracked.http.post("/api/work-items/PAY-80/complete", headers=tracked.admin_headers)).status_code == 200
    await asyncio.sleep(1.1)  # GitHub's times are whole seconds: reverted after the completion
    await merged(83, 0, "revert-81-feature/PAY-80-one", title='Revert "Add retries"', body="Reverts Acme/Web-App#81")
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2381"))["rework"]["reason"] == "reverted"
    assert (await tracked.get("/api/work-items/PAY-80"))["rework"] is None  # #82 stands
    await merged(84, 0, "revert-83-revert-81-feature/PAY-80-one", title='Revert "Revert "Add retries""', body="Reverts Acme/Web-App#83")
    reland = await tracked.get("/api/work-items/acme%2Fweb-app%2384")
    assert reland["status"] == "done" and (await tracked.get("/api/work-items/acme%2Fweb-app%2383"))["status"] == "closed"

    # One pull request, reverted with its ticket, then landed again: the ticket's mark goes with the revert.
    assert (await tracked.http.post("/api/work-items", json={"id": "PAY-85"}, headers=tracked.admin_headers)).status_code == 201
    await merged(86, 0, "feature/PAY-85-one")
    assert (await tracked.http.post("/api/work-items/PAY-85/complete", headers=tracked.admin_headers)).status_code == 200
    await asyncio.sleep(1.1)
    await merged(87, 0, "revert-86-feature/PAY-85-one", title='Revert "Add retries"', body="Reverts Acme/Web-App#86")
    assert (await tracked.get("/api/work-items/PAY-85"))["rework"]["reason"] == "reverted"
    await merged(88, 0, "revert-87-revert-86-feature/PAY-85-one", title='Revert "Revert "Add retries""', body="Reverts Acme/Web-App#87")
    assert (await tracked.get("/api/work-items/PAY-85"))["rework"] is None
    # A revert of a change whose title starts with "Revert": a revert still.
    await merged(89, 0, "revert-88-x", title='Revert "Revert to the v1 endpoint"', body="Reverts Acme/Web-App#88")
    assert (await tracked.get("/api/work-items/acme%2Fweb-app%2389"))["status"] == "closed"


async def test_a_revert_is_told_from_a_reland_by_what_it_undoes_not_by_its_title(tracked: Proxy) -> None:
    """A title can be edited (found by a review): a revert retitled `Revert "Revert "…""` escaped rework
    and counted as completed work, linked to the ticket it undid; a reland found by its branch
    (`revert-N-revert-M-…`) but retitled counted as a revert. What the merge undoes decides: a merged
    revert (a reland), else a revert, whatever the title."""
    async def merged(number: int, branch: str, title: str, body: str | None = None) -> None:
        at = _github_time(utcnow())
        pull = hooks.github_pull_request("closed", number, merged=True, branch=branch, title=title)
        pull["pull_request"].update(merged_at=at, closed_at=at, **({"body": body} if body else {}))
        raw = hooks.dumps(pull)
        assert (await _post(tracked, "github", raw, hooks.github_headers(raw, "pull_request"))).status_code == 200

    async def item(number: int) -> dict:
        return await tracked.get(f"/api/work-items/acme%2Fweb-app%23{number}")

    await merged(91, "feature/PAY-90-one", "Add retries")
    await merged(92, "revert-91-feature/PAY-90-one", 'Revert "Revert "Add retries""', body="Reverts Acme/Web-App#91")
    assert (await item(91))["rework"]["reason"] == "reverted" and (await item(92))["status"] == "closed"

    await merged(96, "feature/PAY-95-one", "Add retries")
    await merged(97, "revert-96-feature/PAY-95-one", 'Revert "Add retries"', body="Reverts Acme/Web-App#96")
    await merged(98, "revert-97-revert-96-feature/PAY-95-one", "Reland PAY-95 retries (fixed)", body="Reverts Acme/Web-App#97")
    assert (await item(98))["status"] == "done" and (await item(97))["status"] == "closed" and (await item(96))["rework"]["reason"] == "reverted"


# GitLab's revert button, and its merge request retitled as a revert of a revert (what it undoes decides: found by a review)
@pytest.mark.parametrize("title", ['Revert "Retry failed charges"', 'Revert "Revert "Retry failed charges""'])
async def test_gitlabs_revert_button_marks_the_merge_request_it_undoes(tracked: Proxy, title: str) -> None:
    """GitLab's revert merge request (`Revert "…"`, `This reverts merge request !N`) marked nothing and
    counted as one more merge request completed."""
    merged = hooks.gitlab_merge_request("merge", 8, branch="feature/PAY-51-charges")
    merged["object_attributes"]["merged_at"] = (utcnow() - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S UTC")
    revert = hooks.gitlab_merge_request("merge", 9, branch="revert-da156088", title=title)
    revert["object_attributes"].update(description="This reverts merge request !8", merged_at=utcnow().strftime("%Y-%m-%d %H:%M:%S UTC"))
    for payload in (merged, revert):
        assert (await _post(tracked, "gitlab", hooks.dumps(payload), hooks.gitlab_headers("Merge Request Hook"))).status_code == 200
    undone = await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%218")
    assert undone["rework"] is not None and undone["rework"]["reason"] == "reverted" and undone["rework"]["by"] == "acme/platform/billing-api!9"
    assert (await tracked.get("/api/work-items/acme%2Fplatform%2Fbilling-api%219"))["status"] == "closed"


def _jira_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def _linear_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@BOTH_DATABASES
async def test_points_raised_on_a_done_ticket_through_its_tracker_do_not_count(tracked: Proxy) -> None:
    """A 1-point ticket worked with AI and done, then re-pointed to 13 in Jira and in Linear: while a
    ticket is done both send its completion time as the event's time, and the new points were recorded
    at it, as if the ticket had been 13 points when done (the report counted both among the largest).
    A size sent with the status the delivery records dates from that status; else from the last edit."""
    since = utcnow() - timedelta(minutes=1)
    key = await tracked.new_key()
    for item in ("PAY-40", "ENG-40"):
        await _ask(tracked, key, item)
    await tracked.events(2)
    done_at = utcnow().replace(microsecond=utcnow().microsecond // 1000 * 1000)
    await asyncio.sleep(0.05)

    async def tell(points: float, edited: datetime) -> None:
        jira = hooks.jira_issue("jira:issue_updated", "PAY-40", category="done", resolution="Done")
        jira["issue"]["fields"].update(customfield_10016=points, resolutiondate=_jira_time(done_at), updated=_jira_time(edited))
        linear = hooks.linear_issue("update", "ENG-40", state_type="completed")
        linear["data"].update(estimate=points, completedAt=_linear_time(done_at), updatedAt=_linear_time(edited))
        for tracker, payload, headers in (("jira", jira, hooks.jira_headers), ("linear", linear, hooks.linear_headers)):
            body = hooks.dumps(payload)
            told = await _post(tracked, tracker, body, headers(body))
            assert told.status_code == 200, told.text

    await tell(1, done_at)  # pointed as it is done: the points it was done at
    await asyncio.sleep(0.05)
    await tell(13, utcnow())  # re-pointed once done
    for item in ("PAY-40", "ENG-40"):
        history = (await tracked.get(f"/api/work-items/{item}"))["size_history"]
        assert [h["points"] for h in history] == [1, 13] and history[0]["ts"] == iso(done_at) < history[1]["ts"], history
    report = await tracked.get("/api/reports/adoption", since=iso(since), until=iso(utcnow() + timedelta(minutes=1)))
    bands = {band["label"]: band["items"] for band in report["overall"]["cost_by_size"] if band["items"]}
    assert bands == {"points <=1": 2}, bands


@BOTH_DATABASES
async def test_a_completion_withdrawn_through_closed_is_rework_and_a_later_done_does_not_hide_it(tracked: Proxy) -> None:
    """Done, then Won't Do (closed), then Done again: the first completion did not hold, as if the ticket
    had been reopened (before: no rework, and the completion moved to whichever period the second
    Done fell in, which re-completed old tickets into the period being judged)."""
    steps = [("done", "Done", "2026-11-06T12:30:00.000+0000", "d-1"), ("done", "Won't Do", "2026-11-20T09:00:00.000+0000", "d-2"),
             ("done", "Done", "2026-11-20T09:05:00.000+0000", "d-3")]  # fmt: skip
    statuses = []
    for category, resolution, at, delivery in steps:
        payload = hooks.jira_issue("jira:issue_updated", "PAY-44", category=category, resolution=resolution)
        payload["issue"]["fields"].update(updated=at, resolutiondate=at)
        body = hooks.dumps(payload)
        assert (await _post(tracked, "jira", body, hooks.jira_headers(body, delivery=delivery))).status_code == 200
        statuses.append((await tracked.get("/api/work-items/PAY-44"))["status"])
    assert statuses == ["done", "closed", "done"]
    ticket = await tracked.get("/api/work-items/PAY-44")
    assert ticket["rework"] == {"at": "2026-11-20T09:00:00.000Z", "reason": "reopened", "by": "d-2"}
    early_november = await tracked.get("/api/reports/adoption", since="2026-11-01T00:00:00Z", until="2026-11-10T00:00:00Z")
    assert early_november["overall"]["rework"]["other"] == {"items": 1, "reworked": 1, "rate": 1.0}


@BOTH_DATABASES
async def test_control_characters_in_a_deliverys_event_name_or_jira_url_are_stored_cleaned_not_a_500(tracked: Proxy) -> None:
    """A NUL in the event name (a payload field) or in Jira's `issue.self` was refused by PostgreSQL:
    a 500 on every redelivery, and on SQLite the URL kept its control characters (found by a review)."""
    ignored = hooks.dumps(hooks.jira_issue("jira:issue_updated\u0000", "PAY-30", category="indeterminate"))  # no event of Jira's
    response = await _post(tracked, "jira", ignored, hooks.jira_headers(ignored))
    assert response.status_code == 200, response.text
    payload = hooks.jira_issue("jira:issue_updated", "PAY-31", category="indeterminate")
    payload["issue"]["self"] = "https://acme.atlassian.net\u0000\u0007/rest/api/2/issue/10042"
    body = hooks.dumps(payload)
    response = await _post(tracked, "jira", body, hooks.jira_headers(body))
    assert response.status_code == 200, response.text
    item = await tracked.get("/api/work-items/PAY-31")
    assert item["status"] == "in_progress" and item["url"] == "https://acme.atlassian.net  /browse/PAY-31"
