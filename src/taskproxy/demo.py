"""`taskproxy demo`: the whole loop in one command, offline.

A fake provider and the real proxy are served on 127.0.0.1; the official `openai` SDK sends
attributed requests (by header, body metadata, git branch and key binding, streaming too), an
Anthropic Messages request follows, and one unattributed request is refused. The per-task report is
read back from the proxy's API. Then work completes (a signed GitHub webhook merges a pull request
whose branch names a ticket; another ticket is closed without completion, a third is done and
reopened), a script sends the same
prompt over and over, and the adoption report (spend read against completed work) and the gaming
signal, with its evidence, are read back too. `--serve` keeps the proxy and its dashboard running.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai

from taskproxy.app import create_app
from taskproxy.fake_provider import FakeProvider
from taskproxy.localserver import serve_in_thread
from taskproxy.money import format_usd as money
from taskproxy.render import tasks_table
from taskproxy.config import settings_from_mapping
from taskproxy.settings import Settings


REPEATS = 25  # the scripted loop: above signals.repeated_prompt_min_requests (20)


def demo_settings(folder: Path, provider_url: str, admin_key: str, github_secret: str) -> Settings:
    return settings_from_mapping(
        {
            "database_url": f"sqlite:///{folder / 'demo.db'}",
            "models": [
                {"name": "gpt-4o-mini", "base_url": f"{provider_url}/v1"},
                {"name": "gpt-4.1", "base_url": f"{provider_url}/v1"},
                {"name": "claude-sonnet", "provider": "anthropic", "base_url": provider_url, "upstream_model": "claude-sonnet-4-5"},
            ],
            "recording": {"spool_path": str(folder / "spool.jsonl")},
            "trackers": {"github": {"secret_env": "DEMO_GITHUB_SECRET"}},
            # The demo's one team has two people, below the default floor of 5 under which team figures are withheld.
            "privacy": {"min_group_size": 1},
        },
        {"TASKPROXY_ADMIN_KEY": admin_key, "DEMO_GITHUB_SECRET": github_secret},
    )


def run_demo(say: Callable[[str], None] = print, *, serve: bool = False, wait: Callable[[], None] | None = None) -> int:
    """The demo's script; with `serve`, the proxy and the dashboard stay up with its data until `wait` returns (Ctrl-C)."""
    admin_key = "tp-demo-admin-" + secrets.token_urlsafe(16)
    github_secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="taskproxy-demo-") as tmp:
        fake = FakeProvider()
        with serve_in_thread(fake.app()) as provider_url:
            settings = demo_settings(Path(tmp), provider_url, admin_key, github_secret)
            with serve_in_thread(create_app(settings)) as proxy_url:
                say(f"taskproxy demo: a fake provider on {provider_url}, the proxy on {proxy_url}, SQLite in {tmp}\n")
                status = _script(proxy_url, admin_key, fake, say) or _outcomes(proxy_url, admin_key, github_secret, say)
                if serve and status == 0:
                    say(f"\nThe proxy and its dashboard keep running with the demo's data: {proxy_url}/dashboard")
                    say(f"Sign in with the demo's admin key: {admin_key}")
                    say(f"Point an SDK at {proxy_url}/v1 with a key from `POST /api/keys`. Ctrl-C stops it (the data goes with it).")
                    (wait or _until_interrupted)()
                return status


def _until_interrupted() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


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
    return 0


def _outcomes(proxy_url: str, admin_key: str, github_secret: str, say: Callable[[str], None]) -> int:
    """Work completes, a script games the count, and the reports read spend against outcomes."""
    from taskproxy.reports.adoption_export import adoption_text
    from taskproxy.reports.signals import signals_text

    admin = httpx.Client(base_url=proxy_url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30)
    say("\n5. Work completes. GitHub delivers a signed webhook: pull request acme/web#42, from branch")
    say("   feature/PAY-101-retries, is merged. An admin closes PAY-117 without completing it.")
    merged = _github_merge(admin, github_secret, "acme/web", 42, branch="feature/PAY-101-retries", title="Retry payment webhooks")
    say(f"   webhook → {merged['status']}: {merged['items'][0]['id']} done, linked to {', '.join(merged['items'][0]['linked'])}")
    admin.post("/api/work-items/PAY-117/close")
    say("   PAY-117 → closed (no outcome)")
    admin.post("/api/work-items/PAY-120/complete")
    admin.patch("/api/work-items/PAY-120", json={"status": "in_progress"})
    rework = admin.get("/api/work-items/PAY-120").json()["rework"]
    say(f"   PAY-120 → done, then reopened by QA: rework ({rework['reason']}), its spend no longer counts as an outcome")

    sam = admin.post("/api/keys", json={"owner": "sam", "team": "payments", "role": "developer"}).json()["key"]
    looping = openai.OpenAI(api_key=sam, base_url=f"{proxy_url}/v1", max_retries=0)
    same = [{"role": "user", "content": "Summarise the repository again."}]
    for _ in range(REPEATS):
        looping.chat.completions.create(model="gpt-4o-mini", messages=same, extra_headers={"X-Work-Item": "PAY-130"})
    say(f"\n6. A script on sam's key sends the same prompt {REPEATS} times, on PAY-130, to climb a token count.")

    _wait_for_report(admin, expected_requests=6 + REPEATS)
    adoption = admin.get("/api/reports/adoption").json()
    say("\n7. The adoption report (taskproxy report adoption): spend read against completed work.\n")
    say(adoption_text(adoption))
    overall = adoption["overall"]
    say(f"\n   cost per completed item (median): {money(overall['cost_per_completed_item']['median'] or 0)}; spend that produced "
        f"nothing completed: {money(overall['spend_without_outcome_usd'])}, of which on reworked work "
        f"{money(overall['spend_without_outcome_breakdown']['reworked'])}")  # fmt: skip
    signals = admin.get("/api/reports/signals").json()
    say("\n8. Gaming signals (taskproxy report signals): evidence for a person to look at, not a verdict.\n")
    say(signals_text(signals))
    say("\nTokens are recorded per work item and read against finished work; never ranked per person.")
    say("Next: copy config/taskproxy.example.yaml, run `taskproxy serve --config ...`, and start an agent with "
        "`taskproxy run -- claude` (docs/clients.md).")  # fmt: skip
    return 0 if any(s["kind"] == "repeated_prompt" for s in signals["signals"]) else 1


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _github_merge(admin: httpx.Client, secret: str, repo: str, number: int, *, branch: str, title: str) -> dict:
    """A `pull_request` `closed` delivery with `merged: true` and its size, signed as GitHub signs it."""
    now = datetime.now(UTC)
    pr = {"number": number, "title": title, "state": "closed", "merged": True, "html_url": f"https://github.com/{repo}/pull/{number}",
          "created_at": _iso(now - timedelta(hours=26)), "merged_at": _iso(now), "additions": 120, "deletions": 30, "changed_files": 4,
          "head": {"ref": branch}, "base": {"ref": "main"}}  # fmt: skip
    body = json.dumps({"action": "closed", "number": number, "pull_request": pr, "repository": {"full_name": repo}}).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": signature,
               "content-type": "application/json"}  # fmt: skip
    return admin.post("/webhooks/github", content=body, headers=headers).json()  # type: ignore[no-any-return]


def _wait_for_report(admin: httpx.Client, expected_requests: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = admin.get("/api/reports/tasks").json()
        if sum(t["requests"] for t in report["tasks"]) >= expected_requests and report["rejected_requests"] or time.monotonic() > deadline:
            return report
        time.sleep(0.05)
