"""The `taskproxy` command as a user runs it (`cli.main` with its output captured; the demo and
`--version` as the installed command), against the same SQLite database as a real `taskproxy serve`
process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_helpers import (
    FakeUpstream,
    child_env,
    ServerProcess,
    cli_json,
    free_port,
    quoted,
    run_cli,
    run_cli_process,
    running_server,
    wait_until,
    write_config,
)
from taskproxy.localserver import serve_in_thread

ASK = [{"role": "user", "content": "Refactor the refund handler."}]


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("cli")
    # Keys revoked through the CLI (another process) reach the server within key_refresh_seconds.
    config = write_config(folder, upstream.url, auth={"key_refresh_seconds": 0.5})
    with running_server(config, folder / "server.log") as running:
        yield running


def post_chat(server: ServerProcess, key: str, work_item: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if work_item is not None:
        headers["x-work-item"] = work_item
    return server.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK}, headers=headers)


# -- demo -------------------------------------------------------------------------------------------


def test_demo_runs_offline_and_prints_the_per_task_report() -> None:
    started = time.monotonic()
    result = run_cli_process("demo", timeout=60)  # the installed command, end to end
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    out = result.stdout
    assert "work_item_required" in out
    # The report table has one row per work item: PAY-101 got the header and the streamed request.
    assert re.search(r"^PAY-101\s+\S+\s+2\s", out, re.MULTILINE), out
    assert re.search(r"^acme/web#42\s+\S+\s+1\s", out, re.MULTILINE), out
    assert "the provider received 0 requests for it" in out
    # Then the idea itself: spend read against completed work, and the gaming loop caught with its evidence.
    assert "acme/web#42 done, linked to PAY-101" in out and "PAY-117 → closed" in out
    overall = re.search(r"^overall\s+(\d+)\s+(\d+)\s+(\d+)%", out, re.MULTILINE)
    assert overall and overall.groups() == ("1", "1", "100"), out
    # Rework: PAY-120 was done and reopened; the merged PR's 150 changed lines put it in the 51-200 band.
    assert "PAY-120 → done, then reopened by QA: rework (reopened)" in out
    assert re.search(r"^overall\s.*\s50% / -\s", out, re.MULTILINE), out
    assert "1 of 2 AI-assisted and 0 of 0 other items completed in the period (reopened ones included) did not hold: 0 reverted, 1 reopened" in out
    assert re.search(r"^lines 51-200\s+1\s+\$", out, re.MULTILINE) and "over 1 items with a line count (150 lines)" in out, out
    assert re.search(r"^repeated_prompt\s+key_\w+ \(sam, team payments\): 25 answered requests", out, re.MULTILINE), out
    assert "items: PAY-130" in out and "dana" not in out.split("8. Gaming signals")[1]  # the honest user is not flagged


def test_demo_serve_keeps_the_proxy_and_dashboard_up_with_the_demos_data() -> None:
    process = subprocess.Popen([sys.executable, "-m", "taskproxy", "demo", "--serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=child_env())  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("Sign in with the demo's admin key") for line in lines) and time.monotonic() < deadline:
            lines.append(process.stdout.readline())  # type: ignore[union-attr]
        url = next(line.split(": ", 1)[1].strip() for line in lines if "keep running with the demo's data" in line)
        key = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("Sign in with"))
        report = httpx.get(url.replace("/dashboard", "/api/reports/tasks"), headers={"authorization": f"Bearer {key}"}, timeout=10, trust_env=False)
        assert report.status_code == 200 and {"PAY-101", "PAY-130"} <= {t["work_item"] for t in report.json()["tasks"]}
        base = url.removesuffix("/dashboard")
        page = httpx.post(f"{base}/dashboard/login", data={"key": key}, headers={"origin": base}, timeout=10, trust_env=False, follow_redirects=True)
        assert page.status_code == 200 and "PAY-130" in page.text
    finally:
        cpu_before = _cpu_seconds(process.pid)
        process.send_signal(signal.SIGINT)
        status, cpu_after = _wait_with_cpu(process, timeout=15)
    assert status == 0
    # Stopping costs little CPU: at exit the interpreter does not walk everything the demo made (~0.5 s
    # of CPU, 3-10 s on a busy machine). Counted in CPU, not in wall time, so a loaded host cannot fail it.
    assert cpu_after - cpu_before < 0.3, f"{cpu_after - cpu_before:.2f} s of CPU to stop"


def test_a_command_leaves_its_sqlite_database_whole_in_its_file(tmp_path: Path) -> None:
    """The command closes its database connections at exit, so SQLite folds its write-ahead log into the
    file: copying the .db alone copies the data. (Exiting without the last collection left it all in
    the -wal file.)"""
    env = child_env(TASKPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}", TASKPROXY_ADMIN_KEY="tp-" + "x" * 43)
    for command in (("db", "upgrade"), ("items", "add", "PROJ-1")):
        result = run_cli_process(*command, env=env)
        assert result.returncode == 0, result.stderr
    assert not (tmp_path / "a.db-wal").exists(), sorted(p.name for p in tmp_path.iterdir())
    connection = sqlite3.connect(tmp_path / "a.db")
    assert connection.execute("SELECT id FROM work_items").fetchall() == [("PROJ-1",)]
    connection.close()


def _cpu_seconds(pid: int) -> float:
    """The CPU `pid` and its children it has waited for have used so far (/proc/<pid>/stat: utime, stime,
    cutime, cstime after the command's name), as `wait4` counts it at the end."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(field) for field in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _wait_with_cpu(process: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for `process` to end: its exit status and the CPU it used in all (its own and its waited-for children's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.02)
    process.kill()
    process.wait()
    raise AssertionError(f"still running {timeout} s after SIGINT")


# -- keys -------------------------------------------------------------------------------------------


def test_keys_create_list_revoke_against_a_running_server(server: ServerProcess) -> None:
    created = cli_json("keys", "create", "--owner", "fay", "--team", "web", "--json", config=server.config)
    assert {"id", "key", "owner", "team", "role"} <= set(created)
    assert created["key"].startswith("tp-") and len(created["key"]) > 20
    assert (created["owner"], created["team"], created["role"]) == ("fay", "web", "developer")

    listing = run_cli("keys", "list", "--json", config=server.config)
    assert listing.returncode == 0, listing.stderr
    assert created["key"] not in listing.stdout, "keys list must never print a secret"
    listed = [k for k in json.loads(listing.stdout) if k["id"] == created["id"]]
    assert len(listed) == 1
    assert "key" not in listed[0]
    assert (listed[0]["owner"], listed[0]["team"], listed[0]["revoked_at"]) == ("fay", "web", None)

    # The running server knows a key the CLI created a moment ago (one lookup on a cache miss).
    assert post_chat(server, created["key"], "KEY-1").status_code == 200

    revoked = run_cli("keys", "revoke", created["id"], config=server.config)
    assert revoked.returncode == 0, revoked.stderr
    assert created["id"] in revoked.stdout

    statuses = wait_until(lambda: post_chat(server, created["key"], "KEY-1"), lambda r: r.status_code == 401, timeout=5)
    assert statuses.status_code == 401
    assert statuses.json()["error"]["code"] == "invalid_api_key"
    after = [k for k in cli_json("keys", "list", "--json", config=server.config) if k["id"] == created["id"]]
    assert after[0]["revoked_at"] is not None


def test_keys_revoke_of_an_unknown_id_fails(server: ServerProcess) -> None:
    result = run_cli("keys", "revoke", "key_doesnotexist", config=server.config)
    assert result.returncode == 1
    assert "key_doesnotexist" in result.stderr


def test_keys_create_json_key_works_through_the_api(server: ServerProcess) -> None:
    created = cli_json("keys", "create", "--owner", "svc-bot", "--role", "service", "--json", config=server.config)
    assert created["role"] == "service" and created["team"] is None
    response = server.http.get("/v1/models", headers={"authorization": f"Bearer {created['key']}"})
    assert response.status_code == 200
    assert "gpt-4o-mini" in [m["id"] for m in response.json()["data"]]


# -- use / me -------------------------------------------------------------------------------------------


def test_use_binds_a_work_item_and_me_shows_own_usage(server: ServerProcess) -> None:
    key = cli_json("keys", "create", "--owner", "gus", "--team", "payments", "--json", config=server.config)["key"]
    over_http = ("--url", server.url, "--key", key)

    bound = run_cli("use", "PAY-9", *over_http)
    assert bound.returncode == 0, bound.stderr
    assert "PAY-9" in bound.stdout
    shown = run_cli("use", *over_http)
    assert shown.returncode == 0 and "bound to PAY-9" in shown.stdout

    client = server.openai(key)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=ASK)  # no work item anywhere in the request
    events = server.events("PAY-9", expected=1)
    assert len(events) == 1
    assert events[0]["attribution_source"] == "binding"
    assert events[0]["total_tokens"] == reply.usage.total_tokens

    ambiguous = run_cli("use", "PAY-8", "--clear", *over_http)  # cleared the binding and dropped PAY-8 without a word
    assert ambiguous.returncode == 2 and "takes no work item" in ambiguous.stderr, ambiguous
    assert run_cli("use", *over_http).stdout.startswith("bound to PAY-9")
    cleared = run_cli("use", "--clear", *over_http)
    assert cleared.returncode == 0, cleared.stderr
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert refused.value.body["code"] == "work_item_required"

    # Wait until the refusal is recorded, then read it back through the CLI.
    wait_until(
        lambda: server.http.get("/api/me/usage", headers={"authorization": f"Bearer {key}"}).json(),
        lambda data: data["rejected_requests"].get("work_item_required") == 1,
    )
    me = run_cli("me", "--json", *over_http)
    assert me.returncode == 0, me.stderr
    data = json.loads(me.stdout)
    assert (data["owner"], data["team"], data["work_item"]) == ("gus", "payments", None)
    assert [(w["work_item"], w["requests"], w["total_tokens"]) for w in data["work_items"]] == [("PAY-9", 1, reply.usage.total_tokens)]
    assert data["rejected_requests"] == {"work_item_required": 1}

    table = run_cli("me", *over_http)
    assert table.returncode == 0 and "PAY-9" in table.stdout and "work_item_required" in table.stdout


def test_use_refuses_a_malformed_work_item(server: ServerProcess) -> None:
    key = cli_json("keys", "create", "--owner", "hal", "--json", config=server.config)["key"]
    result = run_cli("use", "1; DROP TABLE usage_events;--", "--url", server.url, "--key", key)
    assert result.returncode != 0
    assert "work_item_invalid" in result.stderr
    assert run_cli("use", "--url", server.url, "--key", key).stdout.strip() == "no work item bound"


def test_developer_commands_explain_a_missing_key_or_proxy() -> None:
    no_key = run_cli("me", "--url", "http://127.0.0.1:9")
    assert no_key.returncode != 0 and "--key" in no_key.stderr
    unreachable = run_cli("me", "--url", f"http://127.0.0.1:{free_port()}", "--key", "tp-whatever")
    assert unreachable.returncode != 0 and "could not reach the proxy" in unreachable.stderr


def test_a_url_that_is_not_the_proxy_or_a_key_no_header_carries_is_one_line(tmp_path: Path) -> None:
    """A web page, a load balancer's redirect, broken JSON, an error of another shape at --url, or a
    key with a character a header cannot carry: one line, and `use --clear` does not claim it cleared."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, RedirectResponse, Response
    from starlette.routing import Route

    answers = {
        "html": HTMLResponse("<html>welcome</html>"),
        "redirect": RedirectResponse("https://proxy.example/api/me/work-item", status_code=301),
        "broken": Response(b"{not json", media_type="application/json"),
        "other-error": Response(b'{"error": "x"}', status_code=500, media_type="application/json"),
        "error-page": HTMLResponse("<html>\n<body>\n<h1>Not Found</h1>\n</body>\n</html>", status_code=404),
    }

    async def answer(request: Any) -> Response:
        return answers[request.path_params["kind"]]

    app = Starlette(routes=[Route("/{kind}/api/me/{rest:path}", answer, methods=["GET", "PUT", "DELETE"])])
    with serve_in_thread(app) as url:
        for kind in answers:
            for verb in (("use", "--clear"), ("use", "PROJ-1"), ("me",)):
                result = run_cli(*verb, "--url", f"{url}/{kind}", "--key", "tp-x")
                assert result.returncode != 0 and "Traceback" not in result.stderr and "cleared" not in result.stdout, (kind, verb, result)
                assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for key in ("tp-\u20ac", "tp-a\nb"):
        result = run_cli("me", "--url", "http://127.0.0.1:9", "--key", key)
        assert result.returncode != 0 and "not a proxy key" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [("report", "tasks", "--limit", "-1"), ("report", "tasks", "--limit", "0"), ("items", "list", "--status", "bogus"),
     ("items", "list", "--limit", "10001"),
     # The config's bounds (found by a review): port 99999 was served on 34463 (99999 - 65536); --workers -1 served, 0 took the config's.
     ("serve", "--port", "99999"), ("serve", "--workers", "-1"), ("serve", "--workers", "0")],
)  # fmt: skip
def test_the_cli_refuses_what_the_api_refuses(args: tuple[str, ...], tmp_path: Path) -> None:
    """`--limit -1` dropped the last row, `--limit 0` printed nothing, `--status bogus` listed nothing:
    where the API answers 400, argparse says what it takes."""
    result = run_cli(*args, env=child_env(TASKPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}"))
    assert result.returncode == 2 and "error: argument" in result.stderr, result


def test_a_reader_that_stops_early_ends_the_listing_quietly(tmp_path: Path) -> None:
    """`taskproxy items list | head -1`: no traceback and no error line when the reader has had enough."""
    env = child_env(TASKPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}", TASKPROXY_ADMIN_KEY="tp-" + "x" * 43)
    for n in range(300):
        assert run_cli("items", "add", f"PROJ-{n + 1}", env=env).returncode == 0
    done = subprocess.run(f"{shlex.quote(sys.executable)} -m taskproxy items list --json | head -1", shell=True, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.startswith("[") and done.stderr == "", done.stderr  # 300 items as JSON: more than a pipe holds


def test_an_admin_command_without_any_config_says_which_database_it_uses(tmp_path: Path) -> None:
    """No config and no $TASKPROXY_DATABASE_URL: a key created here is in ./taskproxy.db, which no running
    proxy may read. The command says so, on stderr (its output stays as it is)."""
    done = subprocess.run([sys.executable, "-m", "taskproxy", "keys", "list", "--json"], cwd=tmp_path, capture_output=True, text=True,
                          env=child_env(TASKPROXY_ADMIN_KEY="tp-" + "x" * 43), timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout) == [], done
    assert "no config" in done.stderr and "sqlite:///taskproxy.db" in done.stderr and str(tmp_path) in done.stderr, done.stderr


def test_a_database_that_cannot_be_used_is_one_line_and_exit_2(tmp_path: Path) -> None:
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("hello")
    cases = [
        (f"sqlite:///{tmp_path}/missing/dir/x.db", "No such file or directory"),
        (f"sqlite:///{not_a_database}", "file is not a database"),
        (f"postgresql://nobody@127.0.0.1:{free_port()}/db", "the database failed (OperationalError)"),
        # In memory, each connection has a database of its own (the writer's, the workers'): a traceback before (found by a review)
        ("sqlite://", "an in-memory SQLite database is private to one connection"),
        ("sqlite:///:memory:", "an in-memory SQLite database is private to one connection"),
    ]
    for url, says in cases:
        result = run_cli("keys", "list", env=child_env(TASKPROXY_DATABASE_URL=url, TASKPROXY_ADMIN_KEY="tp-" + "x" * 43))
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1, (url, result.stderr)
    # `serve` too, with one worker as with several: a replica started while its database does not answer
    # says why in one line and exits 2, for its supervisor to start it again (it was a traceback, exit 3).
    for workers in ("1", "2"):
        result = run_cli("serve", "--port", str(free_port()), "--workers", workers,
                         env=child_env(TASKPROXY_DATABASE_URL=cases[2][0], TASKPROXY_ADMIN_KEY="tp-" + "x" * 43))  # fmt: skip
        assert result.returncode == 2 and cases[2][1] in result.stderr and len(result.stderr.strip().splitlines()) == 1, (workers, result.stderr)


def test_revoked_or_unknown_key_is_refused_by_me(server: ServerProcess) -> None:
    result = run_cli("me", "--url", server.url, "--key", "tp-not-a-key")
    assert result.returncode != 0
    assert "401" in result.stderr and "invalid_api_key" in result.stderr


# -- report tasks ---------------------------------------------------------------------------------------


def test_report_tasks_json_matches_the_api(server: ServerProcess) -> None:
    key = server.new_key(owner="ivy", team="web")
    for item in ("REP-1", "REP-1", "Org/Repo#3"):
        assert post_chat(server, key, item).status_code == 200
    server.work_item("REP-1", expected_requests=2)
    server.work_item("org/repo#3", expected_requests=1)

    result = run_cli("report", "tasks", "--json", config=server.config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tasks = {t["work_item"]: t for t in report["tasks"]}
    for item_id, requests in (("REP-1", 2), ("org/repo#3", 1)):
        api = server.admin_get(f"/api/work-items/{quoted(item_id)}").json()
        assert tasks[item_id]["requests"] == api["requests"] == requests
        for field in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cost_usd", "models", "status"):
            assert tasks[item_id][field] == api[field], field
    # The CLI and the API call the same function: the whole report is identical.
    api_report = server.admin_get("/api/reports/tasks").json()
    assert report["tasks"] == api_report["tasks"]
    assert report["rejected_requests"] == api_report["rejected_requests"]

    table = run_cli("report", "tasks", config=server.config)
    assert table.returncode == 0 and "REP-1" in table.stdout and "org/repo#3" in table.stdout


def test_report_tasks_since_a_period(server: ServerProcess) -> None:
    key = server.new_key(owner="jo", team="web")
    assert post_chat(server, key, "REP-7").status_code == 200
    server.work_item("REP-7", expected_requests=1)
    recent = cli_json("report", "tasks", "--since", "1h", "--json", config=server.config)
    assert "REP-7" in [t["work_item"] for t in recent["tasks"]]
    assert recent["since"] is not None
    future = cli_json("report", "tasks", "--since", "2999-01-01", "--json", config=server.config)
    assert future["tasks"] == []


def test_report_tasks_with_a_bad_since_says_what_is_wrong(server: ServerProcess) -> None:
    result = run_cli("report", "tasks", "--since", "last tuesday", config=server.config)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "--since" in result.stderr or "since" in result.stderr


# -- items ----------------------------------------------------------------------------------------------


def test_items_add_list_show_agree_with_the_api(server: ServerProcess) -> None:
    added = cli_json("items", "add", "proj-77", "--title", "Refund retries", "--team", "payments", "--json", config=server.config)
    assert (added["id"], added["status"], added["source"], added["title"]) == ("PROJ-77", "open", "manual", "Refund retries")
    again = run_cli("items", "add", "PROJ-77", config=server.config)
    assert again.returncode == 1 and "exists" in again.stderr

    assert "PROJ-77" in [i["id"] for i in cli_json("items", "list", "--team", "payments", "--json", config=server.config)]
    key = server.new_key(owner="kai", team="payments")
    assert post_chat(server, key, "PROJ-77").status_code == 200
    api = server.work_item("PROJ-77", expected_requests=1)
    shown = cli_json("items", "show", "PROJ-77", "--json", config=server.config)
    assert shown == api
    assert (shown["status"], shown["requests"], shown["title"]) == ("open", 1, "Refund retries")  # usage kept the registered status

    missing = run_cli("items", "show", "PROJ-78", config=server.config)
    assert missing.returncode == 1 and "PROJ-78" in missing.stderr


# -- consistency with the API ------------------------------------------------------------------------


def test_keys_create_refuses_what_the_api_refuses(server: ServerProcess) -> None:
    refused = server.http.post("/api/keys", json={"owner": ""}, headers=server.admin_headers)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "owner"
    result = run_cli("keys", "create", "--owner", "", "--json", config=server.config)
    assert result.returncode != 0, result.stdout


def test_keys_revoke_of_the_bootstrap_admin_is_refused_like_the_api(server: ServerProcess) -> None:
    refused = server.http.delete("/api/keys/admin", headers=server.admin_headers)
    assert refused.status_code == 400
    result = run_cli("keys", "revoke", "admin", config=server.config)
    assert result.returncode != 0, result.stdout
    admin_row = [k for k in cli_json("keys", "list", "--json", config=server.config) if k["id"] == "admin"]
    assert admin_row and admin_row[0]["revoked_at"] is None


# -- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "where"),
    [
        pytest.param("models: [{name: a}]\n", "models[0].base_url", id="missing-base-url"),
        pytest.param("models: [{name: a, base_url: 'ftp://x'}]\n", "models[0].base_url", id="bad-base-url"),
        pytest.param("models: [{name: a, base_url: 'http://x', read_timeout_seconds: 0}]\n", "models[0].read_timeout_seconds", id="zero-timeout"),
        pytest.param("limits: {max_body_bytes: -1}\n", "limits.max_body_bytes", id="negative-limit"),
        pytest.param("databse_url: sqlite:///x.db\n", "databse_url", id="misspelt-key"),
        pytest.param("models: [{name: a, base_url: 'http://x'}, {name: a, base_url: 'http://y'}]\n", "models[1].name", id="duplicate-model"),
        pytest.param("models: [\n", "bad.yaml", id="unparseable-yaml"),
    ],
)
def test_bad_config_makes_serve_exit_2_with_one_line(tmp_path: Path, document: str, where: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(document, encoding="utf-8")
    result = run_cli("serve", "--port", str(free_port()), config=bad)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert where in lines[0]


def test_admin_commands_run_without_the_provider_keys_and_webhook_secrets_serve_needs(tmp_path: Path) -> None:
    """A report from a laptop or a job: the config names provider keys and webhook secrets that only the
    server uses. The admin commands run without them; `serve` still refuses to start without them."""
    config = tmp_path / "taskproxy.yaml"
    config.write_text(f"database_url: sqlite:///{tmp_path / 't.db'}\nmodels: [{{name: gpt-4o-mini, base_url: 'http://127.0.0.1:9/v1', "
                      "api_key_env: NOT_SET_PROVIDER_KEY}]\ntrackers: {github: {secret_env: NOT_SET_GH_SECRET}}\n", encoding="utf-8")  # fmt: skip
    env = child_env(TASKPROXY_ADMIN_KEY="tp-" + "x" * 43)
    for command in (("keys", "list", "--json"), ("report", "tasks", "--json"), ("items", "list", "--json")):
        result = run_cli(*command, config=config, env=env)
        assert result.returncode == 0, (command, result.stderr)
    served = run_cli("serve", "--port", str(free_port()), config=config, env=env)
    assert served.returncode == 2 and "NOT_SET_PROVIDER_KEY is not set" in served.stderr, served.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("keys", "list", config=tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.yaml" in result.stderr


# -- help -------------------------------------------------------------------------------------------------


def test_help_names_every_verb_and_serve_option() -> None:
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    for verb in ("serve", "demo", "keys", "items", "use", "me", "run", "env", "report", "db"):
        assert re.search(rf"^\s+{verb}\s", top.stdout, re.MULTILINE), (verb, top.stdout)

    serve = run_cli("serve", "--help")
    assert serve.returncode == 0, serve.stderr
    for option in ("--config", "--host", "--port", "--workers", "--log-level", "--access-log"):
        assert option in serve.stdout, (option, serve.stdout)

    for group, actions in (("keys", ("create", "list", "revoke")), ("items", ("add", "list", "show")), ("report", ("tasks",)), ("db", ("upgrade", "replay-set-aside"))):
        result = run_cli(group, "--help")
        assert result.returncode == 0, result.stderr
        for action in actions:
            assert action in result.stdout, (group, action)


def test_version_and_unknown_verb() -> None:
    version = run_cli_process("--version")  # the installed command itself
    assert version.returncode == 0 and version.stdout.startswith("taskproxy ")
    unknown = run_cli("frobnicate")
    assert unknown.returncode == 2 and "frobnicate" in unknown.stderr


def test_report_adoption_cli_matches_the_api(server: ServerProcess) -> None:
    key = server.new_key(owner="ada", team="payments")
    assert post_chat(server, key, "ADOPT-1").status_code == 200
    server.work_item("ADOPT-1", expected_requests=1)
    missing = run_cli("items", "complete", "ADOPT-404", config=server.config)
    assert missing.returncode == 1 and "taskproxy items add ADOPT-404" in missing.stderr
    cli_json("items", "add", "ADOPT-2", "--json", config=server.config)
    assert post_chat(server, key, "ADOPT-2").status_code == 200
    server.work_item("ADOPT-2", expected_requests=1)
    done = run_cli("items", "complete", "ADOPT-2", config=server.config)
    assert done.returncode == 0 and "done" in done.stdout

    since, until = "2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z"
    cli = cli_json("report", "adoption", "--since", since, "--until", until, "--json", config=server.config)
    api = server.admin_get("/api/reports/adoption", since=since, until=until).json()
    assert cli == api
    assert cli["overall"]["completed_items"] >= 1 and cli["overall"]["ai_assisted_items"] >= 1
    csv_text = run_cli("report", "adoption", "--since", since, "--until", until, "--csv", config=server.config).stdout
    assert csv_text.splitlines()[0].startswith("scope,team,completed_items")
    shown = run_cli("items", "show", "ADOPT-2", config=server.config).stdout
    assert "cycle time" in shown and "→ done (cli)" in shown


def test_report_signals_cli_matches_the_api(server: ServerProcess) -> None:
    since, until = "2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z"
    cli = cli_json("report", "signals", "--since", since, "--until", until, "--json", config=server.config)
    api = server.admin_get("/api/reports/signals", since=since, until=until).json()
    assert cli == api and isinstance(cli["signals"], list) and cli["thresholds"]["repeated_prompt_min_requests"] == 20
    assert run_cli("report", "signals", "--since", "2030-01-01", "--until", "2029-01-01", config=server.config).returncode != 0


def test_db_replay_set_aside_writes_what_was_set_aside_once_its_cause_is_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows the database refused are kept beside the spool with the reason; once the cause is fixed
    (here: a row mended by hand), `taskproxy db replay-set-aside` writes them, and says what it did."""
    import orjson

    from taskproxy.cli import main
    from taskproxy.storage.db import make_engine
    from taskproxy.storage.models import AuditEntry

    config = tmp_path / "c.yaml"
    config.write_text(f"database_url: sqlite:///{tmp_path / 't.db'}\nrecording: {{spool_path: {tmp_path / 'spool.jsonl'}}}\n")
    assert main(["db", "replay-set-aside", "--config", str(config)]) == 0
    assert "nothing is set aside" in capsys.readouterr().out
    row = {"id": "a1", "ts": "2026-12-01T10:00:00", "actor_key_id": "admin", "actor_owner": "admin", "action": "GET /api/keys", "target": None}
    kept = [{"reason": "IntegrityError: NOT NULL constraint failed: audit_log.actor_owner", "batch": {"audit": [row]}}]
    (tmp_path / "spool.rejected.jsonl").write_bytes(b"".join(orjson.dumps(entry) + b"\n" for entry in kept))
    assert main(["db", "replay-set-aside", "--config", str(config)]) == 0
    assert "wrote 1 set-aside row(s); 0 still refused" in capsys.readouterr().out
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    with engine.connect() as connection:
        assert connection.execute(AuditEntry.__table__.select()).first().id == "a1"
    engine.dispose()
    assert not (tmp_path / "spool.rejected.jsonl").exists()


def test_a_providers_own_key_in_openai_api_key_is_not_sent_to_the_proxy() -> None:
    """With no TASKPROXY_API_KEY the developer commands fell back to OPENAI_API_KEY whatever it held: a
    developer's own `sk-proj-...` went to the proxy (and was refused as "not valid")."""
    from taskproxy.config import ClientSettings

    assert ClientSettings.load(url=None, key=None, env={"OPENAI_API_KEY": "sk-proj-mine"}).key is None
    assert ClientSettings.load(url=None, key=None, env={"OPENAI_API_KEY": "tp-abc"}).key == "tp-abc"


def test_the_proxy_url_with_an_sdks_v1_still_reaches_the_proxys_own_api() -> None:
    from taskproxy.config import ClientSettings

    assert ClientSettings.load(url=None, key=None, env={"TASKPROXY_URL": "http://127.0.0.1:8080/v1/"}).url == "http://127.0.0.1:8080"


def test_a_branch_being_rebased_is_still_the_branch(tmp_path: Path) -> None:
    """Mid-rebase HEAD is detached: `run` said "no work item" though the work on the branch goes on."""
    from taskproxy.launch import current_branch

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (tmp_path / "f").write_text("a\n")
    git("add", "f")
    git("commit", "-qm", "a")
    git("switch", "-qc", "feature/PROJ-42-retry")
    (tmp_path / "f").write_text("b\n")
    git("commit", "-qam", "b")
    git("switch", "-q", "main")
    (tmp_path / "f").write_text("c\n")
    git("commit", "-qam", "c")
    git("switch", "-q", "feature/PROJ-42-retry")
    rebase = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "rebase", "main"], cwd=tmp_path, capture_output=True)
    assert rebase.returncode != 0  # stopped on the conflict, HEAD detached
    assert current_branch(tmp_path) == "feature/PROJ-42-retry"
    git("rebase", "--abort")
    git("checkout", "-q", "--detach")
    assert current_branch(tmp_path) is None


def test_an_argument_or_a_branch_not_in_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 in an argument (`--team $'\\xff'`) or in the checked-out branch's name
    failed with a UnicodeEncodeError or UnicodeDecodeError traceback (found by a review)."""
    env = child_env(TASKPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}", TASKPROXY_ADMIN_KEY="tp-" + "x" * 43)
    for command in ((b"items", b"list", b"--team", b"\xff"), (b"items", b"add", b"PAY-\xff")):
        result = subprocess.run([sys.executable.encode(), b"-m", b"taskproxy", *command], capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 2 and "is not valid UTF-8" in result.stderr and "Traceback" not in result.stderr, result.stderr
    from taskproxy.launch import current_branch

    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    subprocess.run([b"git", b"checkout", b"-q", b"-b", b"feature/PAY-1-\xff"], cwd=tmp_path / "repo", check=True)
    assert current_branch(tmp_path / "repo") == "feature/PAY-1-\ufffd"
