"""The admin and self-service API: roles, key lifecycle, work items, grouped usage, one error shape."""

from __future__ import annotations

import asyncio
import base64
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, BOTH_DATABASES, Proxy, wait_until
from test_rollup import event

from taskproxy import registry
from taskproxy.storage import repo
from taskproxy.storage.db import make_engine

pytestmark = pytest.mark.anyio

ASK = [{"role": "user", "content": "hello"}]


async def test_a_developer_key_cannot_use_admin_routes(proxy: Proxy) -> None:
    developer = {"authorization": f"Bearer {await proxy.new_key()}"}
    for method, path in [("POST", "/api/keys"), ("GET", "/api/keys"), ("GET", "/api/usage"), ("GET", "/api/usage/events"),
                         ("GET", "/api/work-items/PROJ-1"), ("POST", "/api/work-items"), ("GET", "/api/reports/tasks"), ("DELETE", "/api/keys/admin")]:  # fmt: skip
        response = await proxy.http.request(method, path, headers=developer, json={"owner": "x"})
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "forbidden"


@BOTH_DATABASES
async def test_keys_are_shown_once_listed_without_secret_and_revoked_at_once(proxy: Proxy) -> None:
    created = await proxy.http.post("/api/keys", json={"owner": "eve", "team": "core", "role": "service"}, headers=proxy.admin_headers)
    assert created.status_code == 201
    body = created.json()
    assert {"id", "key", "owner", "team", "role"} <= set(body) and body["key"].startswith("tp-") and len(body["key"]) >= 40
    listed = await proxy.get("/api/keys")
    assert body["id"] in {k["id"] for k in listed}
    assert body["key"] not in created.text.replace(body["key"], "", 1)  # the secret appears once
    assert all("key" not in k and "key_hash" not in k for k in listed)

    client = proxy.openai(body["key"])
    await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "PROJ-1"})
    revoked = await proxy.http.delete(f"/api/keys/{body['id']}", headers=proxy.admin_headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK},
                                    headers={"authorization": f"Bearer {body['key']}", "X-Work-Item": "PROJ-1"})  # fmt: skip
    assert refused.status_code == 401
    missing = await proxy.http.delete("/api/keys/key_nope", headers=proxy.admin_headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [({}, "owner"), ({"owner": 5}, "owner"), ({"owner": "a", "role": "root"}, "role"), ({"owner": "a\nb"}, "owner")],
)
async def test_bad_key_requests_are_400(proxy: Proxy, body: dict, param: str) -> None:
    response = await proxy.http.post("/api/keys", json=body, headers=proxy.admin_headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"id": "PAY-1", "budget_token": 5}, "budget_token", "not a field"),  # a typo is refused, not silently dropped
        ({"id": "PAY-1", "budget_tokens": 1.5}, "budget_tokens", "integer"),  # not truncated to 1
        ({"id": "PAY-1", "budget_tokens": True}, "budget_tokens", "integer"),
        ({"id": "PAY-1", "budget_usd": -1}, "budget_usd", "greater than or equal to 0"),
        # Past what the database's 64-bit counts hold: refused, where they were a 500 (tokens from 2^63)
        # or stored and then a 500 on every request on the item (1e300 USD).
        ({"id": "PAY-1", "budget_tokens": 2**63}, "budget_tokens", "less than or equal to 1000000000000000000"),
        ({"id": "PAY-1", "budget_usd": 1e300}, "budget_usd", "less than or equal to 1000000000"),
        ({"id": "PAY-1", "title": "x" * 501}, "title", "at most 500"),
        ({"id": "PAY-1", "title": "bell\x07"}, "title", "control characters"),
        ({"id": "PAY-1", "status": "unverified"}, "status", "open"),
        ({"title": "no id"}, "id", "required"),
    ],
)
async def test_bad_work_item_bodies_are_400_naming_the_field(proxy: Proxy, body: dict, param: str, says: str) -> None:
    response = await proxy.http.post("/api/work-items", json=body, headers=proxy.admin_headers)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and says in error["message"], error
    assert (await proxy.http.get("/api/work-items/PAY-1", headers=proxy.admin_headers)).status_code == 404  # nothing stored
    patched = await proxy.http.patch("/api/work-items/PAY-1", json={k: v for k, v in body.items() if k != "id"}, headers=proxy.admin_headers)
    assert patched.status_code in (400, 404)


async def test_the_openapi_document_states_the_limits_the_api_enforces(proxy: Proxy) -> None:
    document = await proxy.get("/api/openapi.json")
    schema = document["paths"]["/api/work-items"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    title = next(option for option in schema["properties"]["title"]["anyOf"] if option.get("type") == "string")
    limit = title["maxLength"]
    assert schema["additionalProperties"] is False and schema["required"] == ["id"]
    fits = await proxy.http.post("/api/work-items", json={"id": "PAY-2", "title": "x" * limit}, headers=proxy.admin_headers)
    over = await proxy.http.post("/api/work-items", json={"id": "PAY-3", "title": "x" * (limit + 1)}, headers=proxy.admin_headers)
    assert (fits.status_code, over.status_code) == (201, 400)
    own_usage = {p["name"]: p["schema"] for p in document["paths"]["/api/me/usage"]["get"]["parameters"]}
    assert own_usage["items"]["maximum"] == 1000  # the route takes it (400 past it): the document had left it out
    roles = document["paths"]["/api/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["role"]["enum"]
    for role in roles:
        assert (await proxy.http.post("/api/keys", json={"owner": "o", "role": role}, headers=proxy.admin_headers)).status_code == 201


@BOTH_DATABASES
async def test_work_items_registry_and_lookup_by_encoded_id(proxy: Proxy) -> None:
    created = await proxy.http.post("/api/work-items", json={"id": "https://github.com/Acme/Web/pull/5", "title": "Retry", "team": "web"}, headers=proxy.admin_headers)
    assert created.status_code == 201 and created.json()["id"] == "acme/web#5"
    again = await proxy.http.post("/api/work-items", json={"id": "acme/web#5"}, headers=proxy.admin_headers)
    assert again.status_code == 400
    item = await proxy.get("/api/work-items/acme%2Fweb%235")
    assert (item["id"], item["status"], item["requests"], item["cost_usd"], item["title"]) == ("acme/web#5", "open", 0, None, "Retry")
    assert [i["id"] for i in await proxy.get("/api/work-items", status="open")] == ["acme/web#5"]
    missing = await proxy.http.get("/api/work-items/PROJ-404", headers=proxy.admin_headers)
    assert missing.status_code == 404


@BOTH_DATABASES
async def test_usage_grouped_by_team_and_model_and_own_usage_only(proxy: Proxy) -> None:
    ann, bob = await proxy.new_key("ann", "web"), await proxy.new_key("bob", "data")
    await proxy.openai(ann).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "WEB-1"})
    await proxy.openai(bob).chat.completions.create(model="team-model", messages=ASK, extra_headers={"X-Work-Item": "DATA-1"})
    await proxy.events(2)
    by_team = await proxy.get("/api/usage", group_by="team", since="1h")
    assert sorted(g["team"] for g in by_team["groups"]) == ["data", "web"]
    assert all(g.get("withheld") and "requests" not in g for g in by_team["groups"])  # one person each: below the floor
    by_model = await proxy.get("/api/usage", group_by="model")
    assert sorted(g["model"] for g in by_model["groups"]) == ["gpt-4o-mini", "team-model"]
    future = await proxy.get("/api/usage", group_by="team", since="2999-01-01")
    assert future["groups"] == []

    mine = (await proxy.http.get("/api/me/usage", headers={"authorization": f"Bearer {ann}"})).json()
    assert mine["owner"] == "ann" and [w["work_item"] for w in mine["work_items"]] == ["WEB-1"]
    assert {e["work_item"] for e in mine["recent_events"]} == {"WEB-1"}

    for params in ({"group_by": "owner"}, {"since": "yesterday"}):
        bad = await proxy.http.get("/api/usage", params=params, headers=proxy.admin_headers)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


async def test_own_usage_lists_the_items_used_last_and_counts_the_rest(proxy: Proxy) -> None:
    """A key's own usage listed every item it was ever used on: 50,000 items built on every call, and
    rendered on the event loop by the dashboard's page, held up the whole process. It lists the items
    used most recently (`items`, 100 by default) and says how many there were."""
    key = await proxy.new_key("ann", "web")
    client = proxy.openai(key)
    for n in range(12):
        await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": f"LONG-{n}"})
    await proxy.events(12)
    headers = {"authorization": f"Bearer {key}"}
    mine = (await proxy.http.get("/api/me/usage", params={"items": 5}, headers=headers)).json()
    assert [w["work_item"] for w in mine["work_items"]] == [f"LONG-{n}" for n in range(11, 6, -1)] and mine["work_items_total"] == 12
    everything = (await proxy.http.get("/api/me/usage", headers=headers)).json()
    assert len(everything["work_items"]) == 12 and everything["work_items"][:5] == mine["work_items"]
    too_many = await proxy.http.get("/api/me/usage", params={"items": 5000}, headers=headers)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "items"


async def test_one_error_shape_per_route_family(proxy: Proxy) -> None:
    openai_shaped = [
        await proxy.http.post("/v1/chat/completions", json={}),
        await proxy.http.get("/api/keys"),
        await proxy.http.get("/no/such/route"),
        await proxy.http.get("/v1/chat/completions"),
    ]
    assert [r.status_code for r in openai_shaped] == [401, 401, 404, 405]
    for response in openai_shaped:
        assert set(response.json()) == {"error"} and set(response.json()["error"]) == {"message", "type", "param", "code"}
    anthropic_shaped = await proxy.http.post("/v1/messages/unknown", json={})
    body = anthropic_shaped.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert openai_shaped[3].headers["allow"] == "POST"  # a 405 says which methods the route takes (RFC 9110)
    assert (await proxy.http.put("/v1/messages", json={})).headers["allow"] == "POST"


async def test_a_default_period_starts_no_earlier_than_1970(proxy: Proxy) -> None:
    report = await proxy.get("/api/reports/adoption", until="1970-01-10T00:00:00Z")
    assert (report["since"], report["until"]) == ("1970-01-01T00:00:00.000Z", "1970-01-10T00:00:00.000Z")
    at_the_start = await proxy.http.get("/api/reports/adoption", params={"until": "1970-01-01T00:00:00Z"}, headers=proxy.admin_headers)
    assert at_the_start.status_code == 400 and at_the_start.json()["error"]["param"] == "until"


@pytest.mark.parametrize(
    "params",
    [
        {"since": "999999d"},  # before year 1: past what a date holds
        {"since": "99999999999w"},  # past what a duration holds
        {"until": "999999d"},
        {"until": "0001-01-01T00:00:00Z"},  # 30 days before it, the default `since`, is before year 1
        {"since": "9999-12-31T23:59:59Z"},  # rounded up to the next hour or day: year 10000
    ],
)
async def test_times_at_the_calendars_ends_are_400_not_500(proxy: Proxy, params: dict[str, str]) -> None:
    for path in ("/api/usage", "/api/reports/tasks", "/api/reports/adoption", "/api/reports/adoption.csv", "/api/reports/signals", "/api/audit"):
        answer = await proxy.http.get(path, params=params, headers=proxy.admin_headers)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["code"] == "invalid_request" and error["param"] in params, (path, answer.text)
        assert "from 1970 to 9998" in error["message"], error
    signed_in = await proxy.http.post("/dashboard/login", data={"key": ADMIN_KEY}, headers={"origin": "http://proxy.test"})
    assert signed_in.status_code == 303, signed_in.text
    page = await proxy.http.get("/dashboard", params=params)
    assert page.status_code == 400 and "from 1970 to 9998" in page.text


@BOTH_DATABASES
async def test_a_nul_or_a_number_too_long_for_int_is_a_400_not_a_500(proxy: Proxy) -> None:
    """A NUL in a parameter reached PostgreSQL, which refuses it in text (500); a `limit` of more than
    4,300 digits reached int(), which refuses it (500), a developer's own routes included."""
    key = await proxy.new_key()
    asked = [("GET", "/api/work-items", {"team": "\x00"}, proxy.admin_headers), ("GET", "/api/usage/events", {"key_id": "a\x00b"}, proxy.admin_headers),
             ("DELETE", "/api/keys/%00", {}, proxy.admin_headers), ("GET", "/api/usage/events", {"limit": "9" * 5000}, proxy.admin_headers),
             ("GET", "/api/me/usage", {"limit": "1" * 5000}, {"authorization": f"Bearer {key}"})]  # fmt: skip
    for method, path, params, headers in asked:
        answer = await proxy.http.request(method, path, params=params, headers=headers)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request", (path, params, answer.text[:300])
    assert (await proxy.http.get("/api/work-items", headers=proxy.admin_headers)).status_code == 200


async def test_a_period_that_ends_before_it_begins_is_refused_on_every_route(proxy: Proxy) -> None:
    """The reports refused it; the usage, the audit log and the per-task report answered an empty 200."""
    for path in ("/api/usage", "/api/audit", "/api/reports/tasks", "/api/reports/adoption"):
        answer = await proxy.http.get(path, params={"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, headers=proxy.admin_headers)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "since", (path, answer.text[:200])


async def test_health_and_readiness(proxy: Proxy) -> None:
    assert (await proxy.http.get("/healthz")).json() == {"status": "ok"}
    ready = await proxy.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_oversized_headers_get_431_in_the_routes_shape(proxy: Proxy) -> None:
    big = {"x-filler": "y" * (70 * 1024)}
    openai_route = await proxy.http.post("/v1/chat/completions", json={}, headers=big)
    assert openai_route.status_code == 431 and openai_route.json()["error"]["code"] == "request_header_too_large"
    anthropic_route = await proxy.http.post("/v1/messages", json={}, headers=big)
    assert anthropic_route.status_code == 431 and anthropic_route.json()["type"] == "error"
    assert (await proxy.http.get("/healthz")).status_code == 200


async def test_prometheus_metrics_count_by_model_and_team_never_by_person(proxy: Proxy) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ann = await proxy.new_key("ann-the-person", "web")
    for person in ("bo", "cy", "di", "ed"):  # web has five people: its figures may be shown
        await proxy.new_key(person, "web")
    loner = await proxy.new_key("lone-wolf", "tiny")  # a one-person team is never shown by name
    few = [await proxy.new_key(person, "few") for person in ("fe", "fi", "fo", "fum")]  # with tiny, the small teams are five people
    await proxy.openai(loner).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "TINY-1"})
    await proxy.openai(few[0]).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "FEW-1"})
    reply = await proxy.openai(ann).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "WEB-9"})
    await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK}, headers={"authorization": f"Bearer {ann}"})
    await proxy.events(3)
    text = await wait_until(lambda: _metrics(proxy), lambda t: "taskproxy_rejections_total" in t)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("taskproxy_requests_total", (("model", "gpt-4o-mini"), ("route", "/v1/chat/completions"), ("status", "200")))] == 3
    assert samples[("taskproxy_tokens_total", (("kind", "prompt"), ("model", "gpt-4o-mini"), ("team", "web")))] == reply.usage.prompt_tokens
    assert samples[("taskproxy_tokens_total", (("kind", "completion"), ("model", "gpt-4o-mini"), ("team", "web")))] == reply.usage.completion_tokens
    assert samples[("taskproxy_rejections_total", (("reason", "work_item_required"),))] == 1
    assert samples[("taskproxy_upstream_latency_seconds_count", (("route", "/v1/chat/completions"),))] == 3
    assert ("taskproxy_writer_queue_depth", ()) in samples and ("taskproxy_spool_bytes", ()) in samples
    assert "ann-the-person" not in text and "key_" not in text and 'team="tiny"' not in text  # no person, no key, no small team
    assert 'team="(teams below the privacy floor)"' in text and 'team="few"' not in text
    assert (await proxy.http.get("/metrics", headers={"authorization": f"Bearer {ann}"})).status_code == 403
    assert (await proxy.http.get("/metrics")).status_code == 401


async def test_people_without_a_team_are_a_group_under_the_privacy_floor(proxy: Proxy) -> None:
    """One person whose key has no team: their exact figures were the row of no team in the usage by
    team, and the series of team "" on /metrics. Withheld below the floor, shown at it."""
    from prometheus_client.parser import text_string_to_metric_families

    loner = await proxy.new_key("lone-wolf", None)
    reply = await proxy.openai(loner).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "SOLO-1"})
    await proxy.events(1)

    async def no_team() -> tuple[dict, dict]:
        groups = (await proxy.get("/api/usage", group_by="team"))["groups"]
        families = text_string_to_metric_families(await _metrics(proxy))
        tokens = {s.labels["team"]: s.value for f in families for s in f.samples if s.name == "taskproxy_tokens_total" and s.labels["kind"] == "prompt"}
        return next(g for g in groups if g["team"] is None), tokens

    row, tokens = await no_team()
    assert row == {"team": None, "withheld": True, "reason": f"fewer than {proxy.settings.privacy.min_group_size} people"}, row
    assert "" not in tokens and tokens["(teams below the privacy floor)"] == reply.usage.prompt_tokens
    for person in ("bo", "cy", "di", "ed")[: proxy.settings.privacy.min_group_size - 1]:
        await proxy.new_key(person, None)
    again = await proxy.openai(loner).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "SOLO-1"})
    await proxy.events(2)
    row, tokens = await no_team()  # /metrics counts from then on under team ""
    assert row["prompt_tokens"] == reply.usage.prompt_tokens + again.usage.prompt_tokens and tokens[""] == again.usage.prompt_tokens


async def _metrics(proxy: Proxy) -> str:
    response = await proxy.http.get("/metrics", headers=proxy.admin_headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_one_privacy_floor_in_every_view(proxy: Proxy) -> None:
    """People are counted once, one way (privacy.py: owners of live keys, service keys not counted), so a
    team is shown or withheld alike in the adoption report, /api/usage?group_by=team, /metrics and "My data"."""
    ops = await proxy.new_key("ops-1", "ops")
    for person in ("ops-2", "ops-3", "ops-4"):
        await proxy.new_key(person, "ops")
    await proxy.new_key("ops-lead", "ops", role="admin")  # an admin of the team is a person: ops has 5
    for person in ("bot-1", "bot-2", "bot-3", "bot-4"):
        await proxy.new_key(person, "bots")
    for robot in ("ci", "nightly", "scanner"):
        await proxy.new_key(robot, "bots", role="service")  # automation is not people: bots has 4
    bots = await proxy.new_key("bot-5", "bots", role="service")
    solo = await proxy.new_key("sec-1", "sec")  # with bots, the teams withheld hold 5 people: ops can be shown
    for key, item in ((ops, "OPS-1"), (bots, "BOT-1"), (solo, "SEC-1")):
        await proxy.openai(key).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": item})
    await proxy.events(3)

    adoption = {t["team"]: t for t in (await proxy.get("/api/reports/adoption"))["teams"]}
    usage = {g["team"]: g for g in (await proxy.get("/api/usage", group_by="team"))["groups"]}
    metrics = await _metrics(proxy)
    for team, shown in (("ops", True), ("bots", False)):
        assert ("withheld" not in adoption[team]) is shown, (team, adoption[team])
        assert ("withheld" not in usage[team]) is shown, (team, usage[team])
        assert (f'team="{team}"' in metrics) is shown, team
    for key, says in ((ops, "has 5 people with keys, so its figures are shown"), (bots, "has 4 people with keys, so its figures are withheld")):
        signed_in = await proxy.http.post("/dashboard/login", data={"key": key}, headers={"origin": "http://proxy.test"})
        assert signed_in.status_code == 303, signed_in.text
        page = await proxy.http.get("/dashboard/me")  # the client keeps the session cookie
        assert says in " ".join(page.text.split()), page.text
        proxy.http.cookies.clear()


@BOTH_DATABASES
@pytest.mark.parametrize("spellings", [
    ("dana", "Dana", "dana ", "DANA", " dana"),
    # pasted from a chat or an HR tool: no-break, em and ideographic spaces, a full-width letter (a
    # review found these five counted as five people); non-ASCII case, which SQLite's lower() ignores
    ("dana", "dana\u00a0", "\u00a0dana", "dana\u2003", "\uff44ana"),
    ("éloïse", "Éloïse", "éloÏse", "ÉLOÏSE", "éloïse\u3000"),
    # a final sigma, which PostgreSQL's lower() leaves as it is (found by a review)
    ("οδυσσεας", "οδυςσεας", "οδυσςεας", "οδυςςεας", "ΟΔΥΣΣΕΑΣ"),
], ids=["ascii", "unicode-spaces", "unicode-case", "final-sigma"])  # fmt: skip
async def test_one_person_is_one_person_however_their_name_was_typed(proxy: Proxy, spellings: tuple[str, ...]) -> None:
    """Owners are compared as typed: `dana`, `Dana`, `dana `, `DANA` and ` dana` were five people, and
    a one-person team with five such keys had its figures shown as a team's."""
    keys = [await proxy.new_key(owner, "solo") for owner in spellings]
    await proxy.openai(keys[0]).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "SOLO-1"})
    await proxy.events(1)
    floor = proxy.settings.privacy.min_group_size
    usage = {g["team"]: g for g in (await proxy.get("/api/usage", group_by="team"))["groups"]}
    adoption = {t["team"]: t for t in (await proxy.get("/api/reports/adoption"))["teams"]}
    for view in (usage, adoption):
        assert view["solo"] == {"team": "solo", "withheld": True, "reason": f"fewer than {floor} people"}, view["solo"]
    # and one person reads back what another of their keys stored
    created = await proxy.openai(keys[1]).responses.create(model="gpt-4o-mini", input="hi", extra_headers={"X-Work-Item": "SOLO-1"})
    assert (await proxy.openai(keys[4]).responses.retrieve(created.id)).id == created.id


@BOTH_DATABASES
async def test_an_owner_of_spaces_alone_is_refused_and_a_long_one_that_folds_longer_is_kept(proxy: Proxy) -> None:
    refused = await proxy.http.post("/api/keys", json={"owner": "\u00a0\u3000 "}, headers=proxy.admin_headers)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "owner", refused.text
    # 200 characters that fold to 400 (ß: ss) were a 500 on PostgreSQL, the person's column as wide as the owner's (found by a review)
    await proxy.new_key("ß" * 200, "solo")
    expands = await proxy.http.post("/api/keys", json={"owner": "\ufdfa" * 20}, headers=proxy.admin_headers)  # one character, 18 in NFKC
    assert expands.status_code == 400 and "compatibility form" in expands.json()["error"]["message"], expands.text


async def test_a_small_team_cannot_be_worked_out_from_a_total(proxy: Proxy) -> None:
    """One person's team withheld, the other teams shown: the total (`group_by=model`, the adoption
    report's `overall`, every series of /metrics) less the teams shown was that person's figures. The
    smallest team shown is withheld with them until the withheld hold the floor's five people."""
    from prometheus_client.parser import text_string_to_metric_families

    loner = await proxy.new_key("lone-wolf", "tiny")
    web = [await proxy.new_key(person, "web") for person in ("ann", "bo", "cy", "di", "ed")]
    ops = [await proxy.new_key(person, "ops") for person in ("fa", "ge", "ha", "io", "ju", "ka")]
    replies = {}
    for team, key, item in (("tiny", loner, "TINY-1"), ("web", web[0], "WEB-1"), ("ops", ops[0], "OPS-1")):
        reply = await proxy.openai(key).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": item})
        replies[team] = reply.usage.prompt_tokens
    await proxy.events(3)

    async def views() -> tuple[dict, dict, dict, dict]:
        usage = {g["team"]: g for g in (await proxy.get("/api/usage", group_by="team"))["groups"]}
        adoption = {t["team"]: t for t in (await proxy.get("/api/reports/adoption"))["teams"]}
        families = text_string_to_metric_families(await _metrics(proxy))
        series = {s.labels["team"]: s.value for f in families for s in f.samples if s.name == "taskproxy_tokens_total" and s.labels["kind"] == "prompt"}
        return usage, adoption, series, (await proxy.get("/api/usage", group_by="model"))["groups"][0]

    usage, adoption, series, total = await views()
    floor = proxy.settings.privacy.min_group_size
    for view in (usage, adoption):
        assert view["tiny"] == {"team": "tiny", "withheld": True, "reason": f"fewer than {floor} people"}
        assert view["web"] == {"team": "web", "withheld": True, "reason": f"withheld with the teams of fewer than {floor} people, which a total would reveal"}
        assert "withheld" not in view["ops"]
    assert total["prompt_tokens"] - usage["ops"]["prompt_tokens"] == replies["tiny"] + replies["web"]  # not the loner's alone
    assert "tiny" not in series and "web" not in series and series["(teams below the privacy floor)"] == replies["tiny"] + replies["web"]

    for person in ("lo", "mo", "no", "po"):  # tiny grows to five: every team is shown, and counted under its name from then on
        await proxy.new_key(person, "tiny")
    await proxy.openai(loner).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": "TINY-1"})
    await proxy.events(4)
    usage, adoption, series, _ = await views()
    assert all("withheld" not in view[team] for view in (usage, adoption) for team in ("tiny", "web", "ops"))
    assert series.get("tiny") == replies["tiny"], series


async def test_withheld_teams_are_listed_after_the_shown_ones_by_name_not_where_their_cost_ranks_them(proxy: Proxy) -> None:
    """/api/usage?group_by=team lists teams by cost: a withheld row left where its cost put it said its
    spend lay between its two shown neighbours' (found by a review)."""
    keys = {}
    for team, people in (("a", 5), ("b", 6), ("c", 7), ("solo", 1)):
        keys[team] = [await proxy.new_key(f"{team}-{n}", team) for n in range(people)][0]
    for team, requests in (("solo", 4), ("b", 3), ("a", 2), ("c", 1)):
        for _ in range(requests):
            await proxy.openai(keys[team]).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": f"{team.upper()}-1"})
    await proxy.events(10)
    groups = (await proxy.get("/api/usage", group_by="team"))["groups"]
    # solo (1 person) is withheld, and a (the smallest shown) with it: together they hold the floor
    assert [(g["team"], "withheld" in g) for g in groups] == [("b", False), ("c", False), ("a", True), ("solo", True)]


@BOTH_DATABASES
async def test_raw_events_are_read_page_after_page_to_the_oldest(proxy: Proxy) -> None:
    """An organisation's events past the newest 10,000 were out of reach: a full page now links to the
    next, read after its last event, so an export reads every event once, however deep."""
    rng, moment = random.Random(9), datetime(2026, 11, 20, 10, 0, 0, 123456)
    rows = ([event(rng, moment, key_id="k1") for _ in range(10)]  # one moment: the ids decide the order
            + [event(rng, moment + timedelta(microseconds=n), key_id="k1") for n in range(1, 11)]  # a microsecond apart
            + [event(rng, moment - timedelta(days=3), key_id="k2") for _ in range(5)])  # fmt: skip
    engine = make_engine(proxy.settings.database_url)
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    engine.dispose()
    newest_first = [r["id"] for r in sorted(sorted(rows, key=lambda r: r["id"]), key=lambda r: r["ts"], reverse=True)]

    async def every_page(path: str) -> tuple[list[str], int]:
        read, pages = [], 0
        while path:
            response = await proxy.http.get(path, headers=proxy.admin_headers)
            assert response.status_code == 200, response.text
            read += [e["id"] for e in response.json()]
            pages += 1
            link = response.headers.get("link")
            path = link[1 : link.index(">")] if link else ""
            assert not link or link.endswith('; rel="next"')
        return read, pages

    read, pages = await every_page("/api/usage/events?limit=7")
    assert read == newest_first and pages == 4  # 7, 7, 7, 4: every event once, in order
    read, _ = await every_page("/api/usage/events?limit=3&key_id=k1&since=2026-11-19T00:00:00Z")
    assert read == newest_first[:20]  # the filters ride along to every page
    read, pages = await every_page("/api/usage/events?limit=5&until=2026-11-20T00:00:00Z")
    assert read == newest_first[20:] and pages == 2  # a full last page links to an empty one
    for cursor in ("nope", "MjAyNi0xMS0yMA", "%00", "x" * 2000):
        refused = await proxy.http.get("/api/usage/events", params={"after": cursor}, headers=proxy.admin_headers)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "after", cursor


@BOTH_DATABASES
async def test_a_cursor_hiding_a_control_character_is_refused_not_a_500(proxy: Proxy) -> None:
    """The header guard cannot see inside base64: a NUL in the cursor's row id reached PostgreSQL,
    which refused it (a 500; found by a review)."""
    cursor = base64.urlsafe_b64encode(b"2026-01-01T00:00:00|\x00").decode().rstrip("=")
    for path in ("/api/usage/events", "/api/work-items"):
        refused = await proxy.http.get(path, params={"after": cursor}, headers=proxy.admin_headers)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "after", (path, refused.text)


@BOTH_DATABASES
async def test_work_items_are_listed_page_after_page(proxy: Proxy) -> None:
    """Past the newest 10,000 items nothing could be listed; a full page now links to the next, read by
    the index on (created_at, id) where the last page ended."""
    created = datetime(2026, 11, 1, 9, 30, 0, 250000)
    engine = make_engine(proxy.settings.database_url)
    for n in range(8):  # four opened at one moment, four a microsecond apart, as a tracker's times may be
        moment = created if n < 4 else created + timedelta(microseconds=n)
        registry.transition(engine, f"PAGE-{n}", "open", source="jira", at=moment, fields={"team": "web"}, created_at=moment)
    engine.dispose()
    expected = [f"PAGE-{n}" for n in (7, 6, 5, 4)] + [f"PAGE-{n}" for n in (0, 1, 2, 3)]
    path, read = "/api/work-items?team=web&limit=3", []
    while path:
        response = await proxy.http.get(path, headers=proxy.admin_headers)
        assert response.status_code == 200, response.text
        read += [item["id"] for item in response.json()]
        link = response.headers.get("link")
        path = link[1 : link.index(">")] if link else ""
    assert read == expected


@pytest.mark.anyio
async def test_a_run_the_proxy_would_refuse_is_refused_before_its_agent_starts(tmp_path: Path) -> None:
    """`taskproxy run --item` and `use` asked only whether the id was well formed: in `known` or `active`
    mode the agent then started and met 403 on its first request (Codex reconnecting five times). And a
    word in the branch that is no item here (fix/utf-8-names) beat a valid binding."""
    from conftest import make_settings, start_proxy

    from taskproxy.fake_provider import FakeProvider
    from taskproxy.upstream.mock import MockProvider

    fake = FakeProvider()
    async for proxy in start_proxy(make_settings(tmp_path, work_items={"mode": "active"}), MockProvider.asgi(fake.app()), fake):
        for item, status in (("PROJ-42", "in_progress"), ("PROJ-50", "closed")):
            made = await proxy.http.post("/api/work-items", json={"id": item, "status": status}, headers=proxy.admin_headers)
            assert made.status_code == 201, made.text
        me = {"authorization": f"Bearer {await proxy.new_key()}"}
        for query, code in (({"item": "PROJ-77"}, "work_item_unknown"), ({"item": "PROJ-50"}, "work_item_closed")):
            refused = await proxy.http.get("/api/me/work-item", params=query, headers=me)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == code, refused.text
        bind = await proxy.http.put("/api/me/work-item", json={"work_item": "PROJ-77"}, headers=me)
        assert bind.status_code == 403 and bind.json()["error"]["code"] == "work_item_unknown"
        assert (await proxy.http.put("/api/me/work-item", json={"work_item": "PROJ-42"}, headers=me)).status_code == 200
        run = (await proxy.http.get("/api/me/work-item", params={"branch": "fix/utf-8-names"}, headers=me)).json()["run"]
        assert run == {"work_item": "PROJ-42", "source": "binding"}  # UTF-8 is no item here: the binding
        # The model routes decide alike (a client sending its branch itself was refused 403; found by a review):
        # a word that is no item, and an old branch's closed item, give way to the binding.
        for n, branch in enumerate(("fix/utf-8-names", "feature/PROJ-50-old")):
            run = (await proxy.http.get("/api/me/work-item", params={"branch": branch}, headers=me)).json()["run"]
            answered = await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {n}"}]},
                                             headers={**me, "x-git-branch": branch})  # fmt: skip
            assert answered.status_code == 200 and run == {"work_item": "PROJ-42", "source": "binding"}, (branch, answered.text)
        events = await proxy.events(2, work_item="PROJ-42")
        assert [e["attribution_source"] for e in events] == ["binding", "binding"]


@BOTH_DATABASES
def test_migration_0025_stores_existing_owners_in_one_form_and_each_keys_person(database_url: str) -> None:
    from datetime import datetime

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import insert, select

    from taskproxy.storage.db import MIGRATIONS, head_revision, make_engine, upgrade_schema
    from taskproxy.storage.models import ApiKey

    engine = make_engine(database_url)
    upgrade_schema(engine)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    owners = {"k1": "dana\u00a0", "k2": "\u3000dana  smith", "k3": "Lee"}
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0024")
        connection.execute(insert(ApiKey.__table__), [{"id": k, "key_hash": k * 8, "prefix": "tp-", "owner": o, "team": "t", "role": "developer",
                                                       "created_at": datetime(2026, 12, 1)} for k, o in owners.items()])  # fmt: skip
    assert upgrade_schema(engine) == ("0024", head_revision())
    with engine.connect() as connection:
        found = {key_id: (owner, person) for key_id, owner, person in connection.execute(select(ApiKey.id, ApiKey.owner, ApiKey.person))}
    assert found == {"k1": ("dana", "dana"), "k2": ("dana smith", "dana smith"), "k3": ("Lee", "lee")}
    engine.dispose()


@BOTH_DATABASES
async def test_a_past_periods_team_figures_do_not_change_with_later_hires_or_revocations(proxy: Proxy) -> None:
    """The teams withheld beside a small one were chosen by today's headcounts: asked for the same
    past period before and after two hires in one team, the usage by team withheld `web` the first
    time and `ops` the second, and the total less every team shown in either answer was the loner's
    usage (found by a review). A period's answer counts the people holding keys at its end."""
    from taskproxy.timeutil import iso, utcnow

    loner = await proxy.new_key("lone-wolf", "tiny")
    web = [await proxy.new_key(person, "web") for person in ("ann", "bo", "cy", "di", "ed")]
    ops = [await proxy.new_key(person, "ops") for person in ("fa", "ge", "ha", "io", "ju", "ka")]
    for key, item in ((loner, "TINY-1"), (web[0], "WEB-1"), (ops[0], "OPS-1")):
        await proxy.openai(key).chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"X-Work-Item": item})
    await proxy.events(3)
    period = {"since": iso(utcnow() - timedelta(hours=1)), "until": iso(utcnow() + timedelta(seconds=1))}
    await asyncio.sleep(1.1)  # the period has ended

    async def views() -> tuple[dict, dict]:
        usage = {g["team"]: g for g in (await proxy.get("/api/usage", group_by="team", **period))["groups"]}
        adoption = {t["team"]: t for t in (await proxy.get("/api/reports/adoption", **period))["teams"]}
        return usage, adoption

    before = await views()
    assert before[0]["web"].get("withheld") and not before[0]["ops"].get("withheld")
    for person in ("lo", "mo"):  # web grows past ops
        await proxy.new_key(person, "web")
    revoked = (await proxy.get("/api/keys"))[-1]["id"]
    assert (await proxy.http.delete(f"/api/keys/{revoked}", headers=proxy.admin_headers)).status_code == 200
    assert await views() == before
