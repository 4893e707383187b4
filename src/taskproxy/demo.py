"""`taskproxy demo`: the whole loop in one command, offline.

A fake provider and the real proxy are served on 127.0.0.1; the official `openai` SDK sends
attributed requests (by header, body metadata, git branch and key binding, streaming too), an
Anthropic Messages request follows, and one unattributed request is refused. Then the per-task report is read back from the proxy's API.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from taskproxy.app import create_app
from taskproxy.fake_provider import FakeProvider
from taskproxy.localserver import serve_in_thread
from taskproxy.money import format_usd as money
from taskproxy.render import tasks_table
from taskproxy.settings import Settings, settings_from_mapping


def demo_settings(folder: Path, provider_url: str, admin_key: str) -> Settings:
    return settings_from_mapping(
        {
            "database_url": f"sqlite:///{folder / 'demo.db'}",
            "models": [
                {"name": "gpt-4o-mini", "base_url": f"{provider_url}/v1"},
                {"name": "gpt-4.1", "base_url": f"{provider_url}/v1"},
                {"name": "claude-sonnet", "provider": "anthropic", "base_url": provider_url, "upstream_model": "claude-sonnet-4-5"},
            ],
            "recording": {"spool_path": str(folder / "spool.jsonl")},
        },
        {"TASKPROXY_ADMIN_KEY": admin_key},
    )


def run_demo(say: Callable[[str], None] = print) -> int:
    admin_key = "tp-demo-admin-" + secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="taskproxy-demo-") as tmp:
        fake = FakeProvider()
        with serve_in_thread(fake.app()) as provider_url:
            settings = demo_settings(Path(tmp), provider_url, admin_key)
            with serve_in_thread(create_app(settings)) as proxy_url:
                say(f"taskproxy demo: a fake provider on {provider_url}, the proxy on {proxy_url}, SQLite in {tmp}\n")
                return _script(proxy_url, admin_key, fake, say)


def _script(proxy_url: str, admin_key: str, fake: FakeProvider, say: Callable[[str], None]) -> int:
    admin = httpx.Client(base_url=proxy_url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30)
    created = admin.post("/api/keys", json={"owner": "dana", "team": "payments", "role": "developer"}).json()
    key = created["key"]
    say(f"1. An admin created a proxy key for dana (team payments): {key[:10]}…\n")
    client = openai.OpenAI(api_key=key, base_url=f"{proxy_url}/v1", max_retries=0)
    ask = [{"role": "user", "content": "Add retries with jitter to the payment webhook client."}]

    say("2. dana's requests, each linked to a work item:")
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=ask, extra_headers={"X-Work-Item": "PAY-101"})
    say(f"   X-Work-Item: PAY-101          → {reply.usage.total_tokens} tokens")
    stream = client.chat.completions.create(model="gpt-4.1", messages=ask, stream=True, extra_headers={"X-Work-Item": "pay-101"})
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    say(f"   streamed, same item (pay-101) → {len(pieces)} chunks, usage recorded from the stream")
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=ask, extra_body={"metadata": {"work_item": "https://github.com/acme/web/pull/42"}}
    )
    say(f"   body metadata, a PR URL       → acme/web#42, {reply.usage.total_tokens} tokens")
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=ask, extra_headers={"X-Git-Branch": "feature/PAY-117-refunds"})
    say(f"   X-Git-Branch: feature/PAY-117-refunds → PAY-117, {reply.usage.total_tokens} tokens")
    bound = httpx.put(f"{proxy_url}/api/me/work-item", json={"work_item": "PAY-120"}, headers={"authorization": f"Bearer {key}"}).json()
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=ask)
    say(f"   `taskproxy use PAY-120` binding → {reply.usage.total_tokens} tokens (binding expires {bound['expires_at']})")
    httpx.delete(f"{proxy_url}/api/me/work-item", headers={"authorization": f"Bearer {key}"})
    message = httpx.post(  # what Claude Code sends: Anthropic's Messages API, the key as x-api-key
        f"{proxy_url}/v1/messages",
        json={"model": "claude-sonnet", "max_tokens": 16, "messages": ask},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "X-Work-Item": "PAY-117"},
    ).json()
    usage = message["usage"]
    say(f"   Anthropic /v1/messages, PAY-117 → {usage['input_tokens']} in + {usage['output_tokens']} out tokens")
    forwarded = len(fake.received)

    say("\n3. A request linked to nothing:")
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "write me a poem"}])
        say("   unexpectedly accepted")
        return 1
    except openai.BadRequestError as exc:
        error = exc.body if isinstance(exc.body, dict) else {}
        say(f"   refused: HTTP {exc.status_code} {error.get('code')}")
        say(f"   “{error.get('message')}”")
    say(f"   the provider received {len(fake.received) - forwarded} requests for it.\n")

    report = _wait_for_report(admin, expected_requests=6)
    say("4. The per-task report (taskproxy report tasks):\n")
    say(tasks_table(report["tasks"]))
    total = sum(t["cost_usd"] or 0 for t in report["tasks"])
    say(f"\n   spend attributed to work items: {money(total)}; requests refused: " + (", ".join(f"{k} × {v}" for k, v in report["rejected_requests"].items()) or "none"))
    say("\nTokens are recorded per work item and never ranked per person.")
    say("Next: copy config/taskproxy.example.yaml, run `taskproxy serve --config ...`, point an SDK's base_url at it.")
    return 0


def _wait_for_report(admin: httpx.Client, expected_requests: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = admin.get("/api/reports/tasks").json()
        if sum(t["requests"] for t in report["tasks"]) >= expected_requests and report["rejected_requests"] or time.monotonic() > deadline:
            return report
        time.sleep(0.05)
