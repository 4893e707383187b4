"""The dashboard (/dashboard): sessions, charts and formatting in-process; then every page in a real
browser (Debian's headless Chromium driven by Playwright) against a real server process with data put
in through the API, checking that the figures shown are the API's, that sessions and roles hold, and
that no page asks anything of a host other than 127.0.0.1.

The browser tests skip, saying why, when Playwright or /usr/bin/chromium is missing. Playwright is
never asked to download a browser.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from conftest import ADMIN_KEY as INPROCESS_ADMIN_KEY
from conftest import make_settings
from taskproxy.app import create_app
from serve_helpers import (
    ADMIN_KEY,
    ServerProcess,
    fake_upstream,
    quoted,
    running_server,
    wait_until,
    write_config,
)
from starlette.testclient import TestClient

from taskproxy.dashboard import charts, session
from taskproxy.dashboard import format as fmt
from taskproxy.dashboard.data import week_windows
from taskproxy.dashboard.views import _safe_next
from taskproxy.fake_provider import FakeProvider
from taskproxy.config import settings_from_mapping
from taskproxy.timeutil import parse_time
from taskproxy.upstream.mock import MockProvider

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--no-proxy-server"]  # fmt: skip
OVERVIEW_COPY = Path("/tmp/dashboard-overview.png")
OVERVIEW_ORG_COPY = Path("/tmp/dashboard-overview-org.png")
HOSTILE_TITLE = '<img src=x onerror="alert(1)"> & <script>alert(2)</script>'


# -- sessions, formatting, charts -----------------------------------------------------------------


def test_session_cookie_holds_key_id_and_expiry_and_refuses_tampering() -> None:
    now = [1000.0]
    signer = session.SessionSigner(b"s" * 32, lifetime=60, clock=lambda: now[0])
    value = signer.sign("key_abc")
    now[0] = 1030.0
    assert signer.verify(value) == "key_abc"
    now[0] = 1061.0
    assert signer.verify(value) is None  # expired
    now[0] = 1030.0
    assert session.SessionSigner(b"t" * 32, lifetime=60, clock=lambda: now[0]).verify(value) is None  # another secret
    key_id, stamp, mac = value.split(".")
    assert key_id == "key_abc"
    assert signer.verify(f"key_admin.{stamp}.{mac}") is None  # another key id under the same signature
    assert signer.verify(value[:-2] + ("AA" if not value.endswith("AA") else "BB")) is None
    for junk in ("", ".", "a.b.c", "%%%.***", "x" * 600, "ké.y.z"):
        assert signer.verify(junk) is None
    assert "tp-" not in value


def test_session_secret_comes_from_the_admin_key_so_replicas_share_it() -> None:
    one = session.SessionSigner.for_settings(settings_from_mapping({}, {"TASKPROXY_ADMIN_KEY": "tp-one"}))
    again = session.SessionSigner.for_settings(settings_from_mapping({}, {"TASKPROXY_ADMIN_KEY": "tp-one"}))
    other = session.SessionSigner.for_settings(settings_from_mapping({}, {"TASKPROXY_ADMIN_KEY": "tp-two"}))
    value = one.sign("key_abc")
    assert again.verify(value) == "key_abc"  # another replica with the same admin key
    assert other.verify(value) is None  # the admin key changed: every session ends
    no_admin = settings_from_mapping({}, {})
    assert session.SessionSigner.for_settings(no_admin).verify(session.SessionSigner.for_settings(no_admin).sign("key_abc")) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/dashboard/items/acme%2Fweb%2312", "/dashboard/items/acme%2Fweb%2312"),
        ("/dashboard?since=7d", "/dashboard?since=7d"),
        ("https://evil.example/dashboard", None),
        ("//evil.example/dashboard", None),
        ("/\\evil.example", None),
        ("/api/keys", None),
        ("/dashboard/logout", None),
        ("/dashboard/../api/keys", None),  # out of the dashboard once resolved
        ("/dashboard/items/a/../../../evil", None),
        ("/dashboard/%2e%2e/api/keys", None),
        ("/dashboard/.%2E/api/keys", None),
        (None, None),
    ],
)
def test_only_dashboard_paths_are_returned_to_after_login(value: str | None, expected: str | None) -> None:
    assert _safe_next(value) == expected


def test_numbers_money_and_times_read_well() -> None:
    assert fmt.money(None) == "—" and fmt.money(0) == "$0.00" and fmt.money(1234.5) == "$1,234.50"
    assert fmt.money(0.0000257) == "$0.0000257" and fmt.money(0.5) == "$0.500"
    assert fmt.share(2 / 3) == "66.7%" and fmt.share(0.5) == "50%" and fmt.share(None) == "—"
    assert fmt.hours(0.5) == "30 min" and fmt.hours(5) == "5.0 h" and fmt.hours(72) == "3.0 days"
    assert fmt.when("2026-11-02T09:05:00.000Z") == "2 Nov 2026, 09:05 UTC"
    assert fmt.number(1234567) == "1,234,567"


def test_weeks_are_calendar_weeks_up_to_until() -> None:
    until = parse_time("2026-11-18T10:00:00Z")  # a Wednesday
    windows = week_windows(until, 3)
    assert [w[0].isoformat() for w in windows] == ["2026-11-02T00:00:00", "2026-11-09T00:00:00", "2026-11-16T00:00:00"]
    assert windows[-1][1] == until and windows[0][1] == windows[1][0]
    monday = parse_time("2026-11-16T00:00:00Z")
    assert week_windows(monday, 1) == [(parse_time("2026-11-09"), monday)]


def test_charts_escape_their_text_and_mark_missing_values() -> None:
    svg = charts.bar_chart(
        [charts.Point("<b>", 2.0, "x & y"), charts.Point("w2", None)], chart_id="c", title="<t>", description="d", fmt=fmt.money
    )
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "&lt;t&gt;" in svg and "x &amp; y" in svg
    assert svg.count("<rect") == 1 and "no data" in svg and 'role="img"' in svg
    assert charts.nice_ceiling(0.0000257) == pytest.approx(0.00005) and charts.nice_ceiling(7) == 10


# -- in-process: access, escaping, headers --------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    fake = FakeProvider()
    app = create_app(make_settings(tmp_path), provider=MockProvider.asgi(fake.app()))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client


def _login(client: TestClient, key: str) -> httpx.Response:
    return client.post("/dashboard/login", data={"key": key}, follow_redirects=False)


def test_pages_need_a_session_and_admin_pages_an_admin(client: TestClient) -> None:
    admin = {"authorization": f"Bearer {INPROCESS_ADMIN_KEY}"}
    for path in ("/dashboard", "/dashboard/me", "/dashboard/signals", "/dashboard/items/PAY-1"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == f"/dashboard/login?next={quote(path, safe='/')}"
    created = client.post("/api/keys", json={"owner": "dana", "team": "payments"}, headers=admin).json()
    response = client.post("/dashboard/login", data={"key": created["key"], "next": "/dashboard/signals"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/me"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/dashboard" in cookie and created["key"] not in cookie
    for path in ("/dashboard", "/dashboard/signals", "/dashboard/items/PAY-1"):
        assert client.get(path).status_code == 403
    me = client.get("/dashboard/me")
    assert me.status_code == 200 and created["id"] in me.text
    # Revoking the key ends its session at the next page.
    client.delete(f"/api/keys/{created['id']}", headers=admin)
    response = client.get("/dashboard/me", follow_redirects=False)
    assert response.status_code == 303 and "taskproxy_session=" in response.headers.get("set-cookie", "")


def test_user_text_is_escaped_and_links_only_to_the_web(client: TestClient) -> None:
    admin = {"authorization": f"Bearer {INPROCESS_ADMIN_KEY}"}
    body = {"id": "acme/web#12", "title": HOSTILE_TITLE, "url": "javascript:alert(3)", "team": "<b>web</b>"}
    assert client.post("/api/work-items", json=body, headers=admin).status_code == 201
    assert _login(client, INPROCESS_ADMIN_KEY).status_code == 303
    page = client.get("/dashboard/items/" + quote("acme/web#12", safe=""))
    assert page.status_code == 200
    assert HOSTILE_TITLE not in page.text and "&lt;img src=x" in page.text and "&lt;b&gt;web&lt;/b&gt;" in page.text
    assert 'href="javascript:' not in page.text and "javascript:alert(3)" in page.text  # shown, not linked
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["cache-control"] == "no-store"
    missing = client.get("/dashboard/items/" + quote("<script>x</script>", safe=""))
    assert missing.status_code == 404 and "<script>x" not in missing.text
    assert client.get("/dashboard?since=yesterday-ish").status_code == 400


def test_my_page_says_whether_prompt_texts_are_stored(tmp_path: Path) -> None:
    recording = {"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 0.05, "store_prompts": True}
    app = create_app(make_settings(tmp_path, recording=recording), provider=MockProvider.asgi(FakeProvider().app()))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert _login(client, INPROCESS_ADMIN_KEY).headers["location"] == "/dashboard"
        page = client.get("/dashboard/me")
    assert page.status_code == 200 and "The text of your prompts and of the answers is stored" in page.text


@pytest.mark.parametrize("form", [{"key": "tp-abc\u2014def"}, {"key": "tp-\U0001f4a9"}, {"key": "tp-x", **{f"f{n}": "1" for n in range(20)}}])
def test_a_key_no_header_can_carry_or_a_crowded_form_is_refused_on_the_form(client: TestClient, form: dict) -> None:
    """An em dash pasted from a chat into the key, or a form with more fields than ours: the sign-in
    form again with a message, not a 500."""
    response = client.post("/dashboard/login", data=form, follow_redirects=False)
    assert response.status_code == 400 and "set-cookie" not in response.headers, response.text[:300]
    assert "<form" in response.text


def test_sign_in_from_another_site_is_refused(client: TestClient) -> None:
    response = client.post("/dashboard/login", data={"key": INPROCESS_ADMIN_KEY}, headers={"origin": "https://evil.example"}, follow_redirects=False)
    assert response.status_code == 403 and "set-cookie" not in response.headers
    response = client.post("/dashboard/login", data={"key": INPROCESS_ADMIN_KEY}, headers={"sec-fetch-site": "cross-site"}, follow_redirects=False)
    assert response.status_code == 403


def test_an_invalid_host_in_next_or_origin_is_refused_not_a_500(client: TestClient) -> None:
    """`//[::1` made urlsplit raise: a 500 on the sign-in page, to anyone (found by a review)."""
    page = client.get("/dashboard/login?next=//%5B::1")
    assert page.status_code == 200 and "<form" in page.text
    signed_in = client.post("/dashboard/login", data={"key": INPROCESS_ADMIN_KEY, "next": "/dashboard?x=//["}, follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard?x=//["
    response = client.post("/dashboard/login", data={"key": INPROCESS_ADMIN_KEY, "next": "//["}, headers={"origin": "http://["}, follow_redirects=False)
    assert response.status_code == 403 and "set-cookie" not in response.headers


# -- a real server and a real browser -------------------------------------------------------------


@dataclass
class Site:
    server: ServerProcess
    keys: dict[str, dict[str, Any]]  # owner -> the API's answer to POST /api/keys
    database: Path
    screenshots: Path
    requested: list[str] = field(default_factory=list)  # every URL the browser asked for, on any page

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, path: str, key: str | None = None, **params: Any) -> Any:
        headers = {"authorization": f"Bearer {key or ADMIN_KEY}"}
        response = self.server.http.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()


def _populate(server: ServerProcess) -> dict[str, dict[str, Any]]:
    """Teams, keys, items and requests, all through the API and the fake provider."""
    keys: dict[str, dict[str, Any]] = {}
    people = {"dana": "payments", "eli": "payments", "fay": "payments", "gus": "payments", "hal": "payments", "ivy": "mobile", "jon": "mobile",
              "kim": "growth", "lee": "growth", "max": "growth"}  # fmt: skip
    for owner, team in people.items():
        response = server.http.post("/api/keys", json={"owner": owner, "team": team}, headers=server.admin_headers)
        assert response.status_code == 201, response.text
        keys[owner] = response.json()
    items = [
        {"id": "PAY-1", "title": "Retry failed card payments", "team": "payments", "url": "https://jira.example/browse/PAY-1"},
        {"id": "PAY-2", "title": "Refund webhooks", "team": "payments"},
        {"id": "PAY-3", "title": "Ledger export", "team": "payments"},
        {"id": "PAY-4", "title": "Fix a typo in the receipt", "team": "payments"},
        {"id": "acme/web#12", "title": HOSTILE_TITLE, "team": "mobile", "url": "javascript:alert(3)"},
    ]
    for item in items:
        response = server.http.post("/api/work-items", json=item, headers=server.admin_headers)
        assert response.status_code == 201, response.text

    def ask(owner: str, item: str | None, text: str, n: int = 1) -> None:
        client = server.openai(keys[owner]["key"])
        headers = {"X-Work-Item": item} if item else {}
        for i in range(n):
            content = text if n > 1 and text.startswith("same") else f"{text} {i}"
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}], extra_headers=headers)
            except Exception:  # noqa: BLE001 - the refused request is expected to fail
                assert item is None

    ask("dana", "PAY-1", "make the retry idempotent", 3)
    ask("eli", "PAY-1", "review the retry")
    ask("fay", "PAY-2", "sign the refund webhook", 2)
    ask("gus", "PAY-3", "same export question, again", 20)  # the same prompt 20 times: a repeated_prompt signal
    ask("ivy", "acme/web#12", "make the banner pop", 2)
    ask("ivy", "MOB-7", "auto-registered, unverified")
    ask("jon", None, "no work item: refused")
    # Refused too: the two small teams withheld hold five people between them, so payments, five
    # itself, can be shown (with mobile alone overall less payments would be mobile's figures).
    ask("kim", None, "no work item: refused")
    for item, action in (("PAY-1", "complete"), ("PAY-2", "complete"), ("PAY-4", "complete"), ("acme/web#12", "close")):
        response = server.http.post(f"/api/work-items/{quoted(item)}/{action}", headers=server.admin_headers)
        assert response.status_code == 200, response.text
    # Wait until the writer has committed all 29 events.
    events = wait_until(lambda: server.admin_get("/api/usage/events", limit=100).json(), lambda e: len(e) >= 29, timeout=10)
    assert len(events) == 29, len(events)
    return keys


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("dashboard")
    with fake_upstream() as upstream:
        config = write_config(folder, upstream.url, models=[{"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"}])
        with running_server(config, folder / "server.log") as server:
            keys = _populate(server)
            screenshots = folder / "screenshots"
            screenshots.mkdir()
            yield Site(server, keys, folder / "t.db", screenshots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run the browser tests")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def _recording_context(browser: Any, base_url: str, requested: list[str]) -> Iterator[Any]:
    """A fresh browser profile (no cookies) that records every request; at the end, all went to 127.0.0.1
    and no page opened a dialog (no script of a page ran)."""
    ctx = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(10_000)
    seen: list[str] = []
    ctx.on("request", lambda request: seen.append(request.url))
    dialogs: list[str] = []
    ctx.on("page", lambda page: page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss())))
    try:
        yield ctx
    finally:
        ctx.close()
    requested.extend(seen)
    elsewhere = [url for url in seen if not url.startswith("data:") and urlsplit(url).hostname != "127.0.0.1"]
    assert seen and not elsewhere, elsewhere
    assert not dialogs, f"a page opened a dialog: {dialogs}"


@pytest.fixture
def context(browser: Any, site: Site) -> Iterator[Any]:
    with _recording_context(browser, site.url, site.requested) as ctx:
        yield ctx


def _sign_in(page: Any, key: str) -> Any:
    page.goto("/dashboard/login")
    page.get_by_label("Your proxy key").fill(key)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    return page


def _figure(page: Any, name: str) -> str:
    return page.locator(f'[data-figure="{name}"]').first.inner_text().strip()


def _shot(page: Any, site: Site, name: str) -> Path:
    path = site.screenshots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_a_bad_key_is_refused_with_a_message(context: Any, site: Site) -> None:
    page = context.new_page()
    response = page.goto("/dashboard")
    assert urlsplit(page.url).path == "/dashboard/login" and response.status == 200
    page.get_by_label("Your proxy key").fill("tp-" + "x" * 43)
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Sign in").click()
    assert navigation.value.status == 401
    assert "not accepted" in page.get_by_role("alert").inner_text()
    assert page.get_by_label("Your proxy key").input_value() == ""  # the key is not echoed back
    assert not [c for c in context.cookies() if c["name"] == session.COOKIE]
    _shot(page, site, "login-refused")


def test_overview_shows_the_adoption_reports_figures(context: Any, site: Site) -> None:
    page = _sign_in(context.new_page(), ADMIN_KEY)
    assert urlsplit(page.url).path == "/dashboard"
    assert page.get_by_role("heading", level=1).inner_text() == "Adoption measured against completed work"
    since = page.get_by_test_id("since").get_attribute("datetime")
    until = page.get_by_test_id("until").get_attribute("datetime")
    report = site.api("/api/reports/adoption", since=since, until=until)
    overall = report["overall"]
    assert overall["completed_items"] == 3 and overall["ai_assisted_items"] == 2  # PAY-4 had no AI use
    expected = {
        "completed_items": fmt.number(overall["completed_items"]),
        "ai_assisted_items": fmt.number(overall["ai_assisted_items"]),
        "ai_assisted_share": fmt.share(overall["ai_assisted_share"]),
        "cost_median": fmt.money(overall["cost_per_completed_item"]["median"]),
        "cost_p90": fmt.money(overall["cost_per_completed_item"]["p90"]),
        "cost_total": fmt.money(overall["cost_per_completed_item"]["total"]),
        "tokens_median": fmt.number(overall["tokens_per_completed_item"]["median"]),
        "spend_without_outcome_usd": fmt.money(overall["spend_without_outcome_usd"]),
        "spend_after_completion_usd": fmt.money(overall["spend_after_completion_usd"]),
        "cycle_ai": fmt.hours(overall["cycle_time_hours"]["ai_assisted"]),
        "cycle_other": fmt.hours(overall["cycle_time_hours"]["other"]),
    }
    assert {name: _figure(page, name) for name in expected} == expected
    assert overall["spend_without_outcome_usd"] > 0  # the closed acme/web#12 and the unverified MOB-7

    teams = {entry["team"]: entry for entry in report["teams"]}
    payments = page.locator('#teams-table tr[data-team="payments"] td').all_inner_texts()
    shown = teams["payments"]  # every cell of the row is the API's figure (the page gets only what its rows show)
    assert payments == [
        fmt.number(shown["completed_items"]),
        f"{fmt.number(shown['ai_assisted_items'])} ({fmt.share(shown['ai_assisted_share'])})",
        fmt.money(shown["cost_per_completed_item"]["median"]),
        fmt.money(shown["cost_per_completed_item"]["p90"]),
        fmt.money(shown["spend_without_outcome_usd"]),
        fmt.money(shown["spend_after_completion_usd"]),
        f"{fmt.share(shown['rework']['ai_assisted']['rate'])} / {fmt.share(shown['rework']['other']['rate'])}",
        f"{fmt.hours(shown['cycle_time_hours']['ai_assisted'])} / {fmt.hours(shown['cycle_time_hours']['other'])}",
    ]
    assert teams["mobile"]["withheld"] is True
    assert page.locator('#teams-table tr[data-team="mobile"] td').inner_text() == "withheld: fewer than 5 people"

    # The chart: one bar per week with a median; this week's figures are the API's for that week.
    rows = page.locator("#weekly-table tbody tr")
    assert rows.count() == 12 and page.locator("svg#weekly-cost").get_attribute("role") == "img"
    last = rows.nth(11)
    week = site.api("/api/reports/adoption", since=last.get_attribute("data-since"), until=last.get_attribute("data-until"))["overall"]
    cells = [text.strip() for text in last.locator("td").all_text_contents()]  # in a closed <details>: not rendered
    assert cells[0] == fmt.number(week["completed_items"]) and cells[2] == fmt.money(week["cost_per_completed_item"]["median"])
    assert page.locator("svg#weekly-cost rect.bar").count() == sum(1 for i in range(12) if rows.nth(i).locator("td").nth(2).text_content() != fmt.NONE)

    # Most expensive items: PAY-3 (20 requests) first, the hostile title shown as text.
    tasks = site.api("/api/reports/tasks", since=since, until=until, limit=10)["tasks"]
    shown = page.locator("#top-items tbody th a").all_inner_texts()
    assert shown == [t["work_item"] for t in tasks]
    assert page.locator("#top-items").get_by_text(HOSTILE_TITLE, exact=True).count() == 1
    assert page.locator("main img, main script").count() == 0
    assert page.locator('[data-figure="completed_items"]').evaluate("e => getComputedStyle(e).fontWeight") in ("600", "700")  # the CSS loaded

    path = _shot(page, site, "overview")
    shutil.copyfile(path, OVERVIEW_COPY)


def test_work_item_page_shows_the_items_figures(context: Any, site: Site) -> None:
    page = _sign_in(context.new_page(), ADMIN_KEY)
    page.locator("#top-items").get_by_role("link", name="PAY-1", exact=True).click()
    page.wait_for_url("**/dashboard/items/PAY-1")
    item = site.api("/api/work-items/PAY-1")
    assert _figure(page, "id") == "PAY-1" and _figure(page, "title") == item["title"]
    assert _figure(page, "status") == "done"
    for name in ("requests", "total_tokens", "prompt_tokens", "completion_tokens", "cached_tokens", "people"):
        assert _figure(page, name) == fmt.number(item[name]), name
    assert _figure(page, "cost_usd") == fmt.money(item["cost_usd"])
    assert _figure(page, "cycle_time_hours") == fmt.hours(item["cycle_time_hours"])
    assert _figure(page, "models") == ", ".join(item["models"])
    assert page.locator("#history tbody tr").count() == len(item["history"]) == 2  # open, then done
    days = page.locator("#usage-by-day tbody tr")
    assert days.count() == len(item["usage_by_day"])
    assert days.first.locator("td").nth(1).inner_text() == fmt.number(item["usage_by_day"][0]["total_tokens"])
    assert page.locator("svg#item-usage rect.bar").count() >= 1
    assert page.get_by_role("link", name="open in the tracker").get_attribute("href") == "https://jira.example/browse/PAY-1"
    assert item["size"]["points"] is None and page.locator('[data-figure="size_points"], [data-figure="rework"]').count() == 0
    assert "Size, as its tracker says" in page.locator("main").inner_text()
    _shot(page, site, "item")

    # A GitHub id with / and #, a hostile title and a javascript: URL: shown as text, never run or linked.
    page.goto("/dashboard/items/" + quote("acme/web#12", safe=""))
    hostile = site.api(f"/api/work-items/{quoted('acme/web#12')}")
    assert _figure(page, "id") == "acme/web#12" and _figure(page, "title") == HOSTILE_TITLE
    assert _figure(page, "requests") == fmt.number(hostile["requests"]) == "2"
    assert page.locator("main img, main script, a[href^='javascript']").count() == 0
    _shot(page, site, "item-hostile")


def test_signals_page_lists_the_reports_signals(context: Any, site: Site) -> None:
    signals = pytest.importorskip("taskproxy.reports.signals", reason="the signals report (taskproxy.reports.signals) is not built yet")
    from taskproxy.storage.db import make_engine

    page = _sign_in(context.new_page(), ADMIN_KEY)
    page.goto("/dashboard/signals")
    assert page.get_by_role("heading", level=1).inner_text() == "Gaming signals"
    since, until = (page.get_by_test_id(name).get_attribute("datetime") for name in ("since", "until"))
    response = site.server.admin_get("/api/reports/signals", since=since, until=until)
    if response.status_code == 200:  # the API's answer, once app.py serves it
        report = response.json()
    else:
        engine = make_engine(f"sqlite:///{site.database}")
        try:
            report = signals.gaming_signals(engine, since=parse_time(since), until=parse_time(until), thresholds=None)
        finally:
            engine.dispose()
    articles = page.locator("article.signal")
    shown = [(articles.nth(i).get_attribute("data-kind"), articles.nth(i).get_attribute("data-key")) for i in range(articles.count())]
    assert shown == [(s["kind"], s["key_id"]) for s in report["signals"]]
    kinds = [s["kind"] for s in report["signals"]]
    assert {kind: int(page.locator(f'[data-count="{kind}"]').inner_text()) for kind in set(kinds)} == {kind: kinds.count(kind) for kind in kinds}
    assert ("repeated_prompt", site.keys["gus"]["id"]) in shown
    repeated = page.locator(f'article.signal[data-kind="repeated_prompt"][data-key="{site.keys["gus"]["id"]}"]')
    assert repeated.locator('[data-evidence="repeated_requests"]').inner_text() == "20"
    _shot(page, site, "signals")
    # Reading signals is a read of per-key data: it is in the audit log.
    audit = wait_until(lambda: site.api("/api/audit"), lambda entries: any(e["action"] == "GET /dashboard/signals" for e in entries))
    assert any(e["action"] == "GET /dashboard/signals" and e["actor_key_id"] == "admin" for e in audit)


def test_a_developer_sees_their_own_page_and_no_other(context: Any, site: Site) -> None:
    dana = site.keys["dana"]
    page = _sign_in(context.new_page(), dana["key"])
    assert urlsplit(page.url).path == "/dashboard/me"
    assert _figure(page, "owner") == "dana" and _figure(page, "key_id") == dana["id"] and _figure(page, "team") == "payments"
    mine = site.api("/api/me/usage", key=dana["key"])
    rows = page.locator("#recent-events tbody tr")
    assert rows.count() == len(mine["recent_events"]) == 3
    key_ids = page.locator('#recent-events [data-field="key_id"]').all_text_contents()
    assert key_ids == [dana["id"]] * 3  # only dana's own events
    assert page.locator('#recent-events [data-field="prompt_hash"]').first.text_content() == mine["recent_events"][0]["prompt_hash"]
    items = page.locator("#my-items tbody tr")
    assert items.count() == len(mine["work_items"]) == 1
    assert items.first.locator("td").first.inner_text() == fmt.number(mine["work_items"][0]["requests"])
    who = page.locator("#who-can-see").inner_text()
    assert "audit log" in who and "at least 5 people" in who and "5 people with keys" in who and "is not stored" in who
    assert page.locator("#stored-fields tbody tr").count() == len(mine["recent_events"][0])
    assert page.get_by_role("link", name="Overview").count() == 0
    _shot(page, site, "me")

    for path in ("/dashboard", "/dashboard/signals", "/dashboard/items/PAY-1"):
        response = page.goto(path)
        assert response.status == 403, path
        assert page.get_by_role("heading", level=1).inner_text() == "Admins only"
        assert "PAY-1" not in page.locator("main").inner_text()
    _shot(page, site, "developer-forbidden")


def test_signing_in_and_out_uses_an_httponly_cookie(context: Any, site: Site) -> None:
    page = _sign_in(context.new_page(), ADMIN_KEY)
    cookies = [c for c in context.cookies() if c["name"] == session.COOKIE]
    assert len(cookies) == 1
    cookie = cookies[0]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax" and cookie["path"] == "/dashboard"
    assert ADMIN_KEY not in cookie["value"] and cookie["expires"] > time.time()
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it
    assert page.get_by_test_id("signed-in-as").inner_text() == "admin"
    with page.expect_navigation():
        page.get_by_role("button", name="Sign out").click()
    assert urlsplit(page.url).path == "/dashboard/login" and "You are signed out" in page.get_by_role("status").inner_text()
    assert not [c for c in context.cookies() if c["name"] == session.COOKIE]
    page.goto("/dashboard")
    assert urlsplit(page.url).path == "/dashboard/login"


def test_overview_of_a_generated_organisation(browser: Any, site: Site, tmp_path: Path) -> None:
    """Six weeks of a generated organisation (tests/org_generator.py): one bar per week, each week's
    figures equal to the adoption report's for that week, small teams withheld."""
    from org_generator import MIN_GROUP, UNTIL, generate

    from taskproxy.guard.auth import ensure_bootstrap_admin
    from taskproxy.localserver import serve_in_thread
    from taskproxy.reports.adoption import adoption_report
    from taskproxy.storage.db import make_engine, prepare_schema

    engine = make_engine(f"sqlite:///{tmp_path / 'org.db'}")
    try:
        prepare_schema(engine)
        ensure_bootstrap_admin(engine, INPROCESS_ADMIN_KEY)  # there from the start, as in any proxy that served
        generate(engine, tmp_path / "org-spool.jsonl", items=100, rejections=60)
        settings = make_settings(tmp_path, privacy={"min_group_size": MIN_GROUP}, reports={"stale_after_days": 10.0})
        with serve_in_thread(create_app(settings, engine=engine)) as url, _recording_context(browser, url, site.requested) as ctx:
            page = _sign_in(ctx.new_page(), INPROCESS_ADMIN_KEY)
            page.goto(f"/dashboard?since=2026-01-12T00:00:00Z&until={UNTIL.isoformat()}Z")
            rows = page.locator("#weekly-table tbody tr")
            medians = []
            for index in range(rows.count()):
                row = rows.nth(index)
                since, until = (parse_time(row.get_attribute(name)) for name in ("data-since", "data-until"))
                expected = adoption_report(engine, since=since, until=until, min_group_size=MIN_GROUP, stale_after_days=10.0)["overall"]
                cells = [text.strip() for text in row.locator("td").all_text_contents()]
                assert cells[0] == fmt.number(expected["completed_items"])
                assert cells[2] == fmt.money(expected["cost_per_completed_item"]["median"])
                medians.append(expected["cost_per_completed_item"]["median"])
            assert rows.last.get_attribute("data-until") == UNTIL.isoformat() + ".000Z"  # a Monday: the last week ends there
            assert page.locator("svg#weekly-cost rect.bar").count() == sum(m is not None for m in medians) >= 4
            assert "withheld: fewer than 5 people" in page.locator('#teams-table tr[data-team="mobile"]').inner_text()
            assert page.locator('#teams-table tr[data-team="platform"] td').count() == 8  # exactly at the floor: shown
            # Size bands and rework: the report's figures for the page's period.
            shown = adoption_report(engine, since=parse_time("2026-01-12T00:00:00Z"), until=UNTIL, min_group_size=MIN_GROUP,
                                    stale_after_days=10.0)["overall"]  # fmt: skip
            bands = page.locator("#size-table tbody tr")
            assert bands.count() == len(shown["cost_by_size"]) == 9
            for index, band in enumerate(shown["cost_by_size"]):
                cells = [text.strip() for text in bands.nth(index).locator("td").all_text_contents()]
                assert bands.nth(index).get_attribute("data-band") == band["label"]
                assert cells == [fmt.number(band["items"]), fmt.money(band["median"]), fmt.money(band["p90"]), fmt.money(band["total"])]
            assert sum(band["items"] for band in shown["cost_by_size"]) == shown["ai_assisted_items"]
            rework = shown["rework"]
            assert rework["ai_assisted"]["reworked"] + rework["other"]["reworked"] > 0
            assert _figure(page, "rework_rate_ai") == fmt.share(rework["ai_assisted"]["rate"])
            assert _figure(page, "rework_rate_other") == fmt.share(rework["other"]["rate"])
            assert _figure(page, "cost_median_held") == fmt.money(shown["cost_per_completed_item"]["excluding_reworked"]["median"])
            assert _figure(page, "cost_per_100_lines") == fmt.money(shown["cost_per_100_changed_lines"]["usd"])
            shutil.copyfile(_shot(page, site, "overview-generated-org"), OVERVIEW_ORG_COPY)
    finally:
        engine.dispose()


def test_pages_asked_only_this_server(browser: Any, site: Site) -> None:
    """Across every browser test above (each also checks its own): requests went to 127.0.0.1 only."""
    if not site.requested:
        pytest.skip("no browser test ran")
    assert {urlsplit(url).hostname for url in site.requested if not url.startswith("data:")} == {"127.0.0.1"}
    assert any(url.endswith("/dashboard/static/dashboard.css") for url in site.requested)
