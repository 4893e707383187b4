"""`taskproxy run` and `taskproxy env`: one command points an agent at the proxy with the developer's
key and the work item, taken from `--item`, else the git branch (by the proxy's patterns), else the
key's binding; with none, it says how to give one before anything starts. The real Claude Code and
Codex CLI binaries (npm) run against a real `taskproxy serve` and the fake provider on loopback, in a
temporary repository on branch `feature/PROJ-42-x`.

The agents are looked for in $TASKPROXY_AGENTS_DIR (default ~/.cache/taskproxy-agents, where
`.ci/run` installs them), then on PATH; without them those tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, wait_until, write_config

from taskproxy.launch import WorkItemChoice, agent_of, choice_for_run, conflict, exports, launch

pytestmark = pytest.mark.serve

AGENTS_DIR = Path(os.environ.get("TASKPROXY_AGENTS_DIR", Path.home() / ".cache" / "taskproxy-agents")) / "node_modules" / ".bin"
BRANCH = "feature/PROJ-42-x"


def agent(name: str) -> str:
    found = AGENTS_DIR / name if (AGENTS_DIR / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed: `bash .ci/run` installs the agents into {AGENTS_DIR.parent.parent} "
                    "(npm install @anthropic-ai/claude-code @openai/codex)")  # fmt: skip
    return str(found)


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("agents")
    models = [
        {"name": "fake-tool", "provider": "anthropic", "base_url": upstream.url},
        {"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"},
        {"name": "fake-tool-codex", "base_url": f"{upstream.url}/v1", "upstream_model": "fake-tool"},
    ]
    config = write_config(folder, upstream.url, models=models)
    with running_server(config, folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as running:
        yield running


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    folder.mkdir()
    subprocess.run(["git", "init", "-q", "-b", BRANCH], cwd=folder, check=True)
    return folder


def developer_env(server: ServerProcess, key: str, home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(exist_ok=True)
    if "CODEX_HOME" in extra:
        Path(extra["CODEX_HOME"]).mkdir(exist_ok=True)
    env = child_env(TASKPROXY_URL=server.url, TASKPROXY_API_KEY=key, HOME=str(home))
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CODEX_HOME"):
        env.pop(name, None)  # the developer's own, on this machine
    env.update(extra)
    env["PATH"] = f"{AGENTS_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


def taskproxy(*args: str, cwd: Path, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # stdin closed: `codex exec` otherwise waits on an open stdin and appends it to the prompt.
    return subprocess.run([sys.executable, "-m", "taskproxy", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


# -- choosing the work item, and what each agent is given ------------------------------------------


def test_env_prints_exports_a_shell_evaluates_with_the_branchs_item(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    key = server.new_key(owner="kai")
    env = developer_env(server, key, tmp_path / "home")
    printed = taskproxy("env", cwd=repo, env=env)
    assert printed.returncode == 0, printed.stderr
    assert "PROJ-42 (from branch feature/PROJ-42-x)" in printed.stdout
    shell = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m taskproxy env)"; echo "$OPENAI_BASE_URL|$ANTHROPIC_BASE_URL|'
                            '$ANTHROPIC_AUTH_TOKEN|$ANTHROPIC_CUSTOM_HEADERS"'], cwd=repo, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert shell.stdout.strip() == f"{server.url}/v1|{server.url}|{key}|X-Git-Branch: {BRANCH}"
    # Not ANTHROPIC_API_KEY: Claude Code started from that shell sent it beside the token (found by a review)
    assert "ANTHROPIC_API_KEY" not in printed.stdout

    fish = taskproxy("env", "--shell", "fish", "--item", "acme/Web#12", cwd=repo, env=env)
    assert "set -gx ANTHROPIC_CUSTOM_HEADERS 'X-Work-Item: acme/web#12';" in fish.stdout  # normalized by the proxy


def test_run_starts_its_command_as_a_shell_would_and_names_the_branch(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    """SIGPIPE as a shell leaves it: `run -- yes | head -1` printed "Broken pipe" and failed, Python's
    ignored SIGPIPE and SIGXFSZ passing through the exec; a non-ASCII branch is named as itself, not
    as the item it names (found by a review)."""
    env = developer_env(server, server.new_key(owner="kai"), tmp_path / "home")
    piped = subprocess.run(f'set -o pipefail; {sys.executable} -m taskproxy run --item PROJ-5 -- yes | head -1', shell=True, executable="bash",
                           cwd=repo, env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert piped.stdout == "y\n" and "Broken pipe" not in piped.stderr and piped.returncode == 141, (piped.returncode, piped.stderr)
    subprocess.run(["git", "checkout", "-q", "-b", "feature/PROJ-43-naïve"], cwd=repo, check=True)
    named = taskproxy("run", "--", "true", cwd=repo, env=env)
    assert named.returncode == 0 and "work item PROJ-43 (from branch feature/PROJ-43-naïve)" in named.stderr, named.stderr


def test_with_no_item_anywhere_run_says_how_to_give_one_and_starts_nothing(server: ServerProcess, tmp_path: Path) -> None:
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    marker = tmp_path / "started"
    env = developer_env(server, server.new_key(owner="kai"), tmp_path / "home")
    done = taskproxy("run", "--", "touch", str(marker), cwd=outside, env=env)
    assert done.returncode != 0 and not marker.exists()
    assert "--item PROJ-123" in done.stderr and "taskproxy use PROJ-123" in done.stderr

    on_main = tmp_path / "main-repo"
    on_main.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=on_main, check=True)
    done = taskproxy("run", "--", "touch", str(marker), cwd=on_main, env=env)
    assert done.returncode != 0 and not marker.exists() and "branch 'main' names none" in done.stderr

    bad = taskproxy("run", "--item", "not an id", "--", "touch", str(marker), cwd=outside, env=env)
    assert bad.returncode != 0 and not marker.exists() and "work_item_invalid" in bad.stderr


def test_a_command_that_cannot_start_is_said_before_anything_is_bound(server: ServerProcess, tmp_path: Path) -> None:
    """`run -- /nonexistent` (or an empty command) bound the key for 12 h, then failed to start (or
    crashed with a traceback)."""
    key = server.new_key(owner="lou")
    env = developer_env(server, key, tmp_path / "home")
    for command in ("/nonexistent/agent", ""):
        done = taskproxy("run", "--item", "PROJ-77", "--", command, cwd=tmp_path, env=env)
        assert done.returncode != 0 and "could not run" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "bound" not in done.stderr
    bound = taskproxy("use", cwd=tmp_path, env=env)
    assert bound.returncode == 0 and "no work item bound" in bound.stdout, bound.stdout


def test_a_command_that_cannot_send_headers_gets_the_item_as_its_keys_binding(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    key = server.new_key(owner="kai")
    env = developer_env(server, key, tmp_path / "home")
    script = "import os, openai; c = openai.OpenAI(max_retries=0); print(c.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}]).id)"
    done = taskproxy("run", "--", sys.executable, "-c", script, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr
    assert "bound to PROJ-42" in done.stderr
    event = server.events("PROJ-42", 1)[0]
    assert event["attribution_source"] == "binding" and event["model"] == "gpt-4o-mini"

    in_binding = taskproxy("run", "--", sys.executable, "-c", "import os; print(os.environ['TASKPROXY_WORK_ITEM'])", cwd=tmp_path, env=env)
    assert in_binding.stdout.strip() == "PROJ-42" and "your key's binding" in in_binding.stderr  # outside the repo: the binding


def test_each_agent_is_given_its_own_way_to_send_the_item() -> None:
    branch = WorkItemChoice("PROJ-42", "branch", ("X-Git-Branch", BRANCH))
    binding = WorkItemChoice("PROJ-1", "binding", None)
    claude = launch(["claude", "-p", "hi"], "http://127.0.0.1:8080", "tp-k", branch)
    assert claude.env["ANTHROPIC_CUSTOM_HEADERS"] == f"X-Git-Branch: {BRANCH}" and not claude.needs_binding
    assert claude.args[:2] == ["claude", "--settings"] and claude.args[3:] == ["-p", "hi"]  # beats a settings file's env
    assert json.loads(claude.args[2])["env"]["ANTHROPIC_CUSTOM_HEADERS"] == f"X-Git-Branch: {BRANCH}"
    codex = launch(["/usr/bin/codex", "exec", "hi"], "http://127.0.0.1:8080", "tp-k", branch)
    assert codex.args[:4] == ["/usr/bin/codex", "-c", 'model_provider="taskproxy_run"', "-c"] and codex.args[5:] == ["exec", "hi"]
    assert codex.args[4].startswith('model_providers.taskproxy_run={ name = "taskproxy_run", base_url = "http://127.0.0.1:8080/v1"')
    assert f'http_headers = {{ "X-Git-Branch" = "{BRANCH}" }}' in codex.args[4] and codex.env["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"
    bound_codex = launch(["codex", "exec", "hi"], "http://h", "tp-k", binding)  # its built-in provider would go to OpenAI
    assert bound_codex.args[1:3] == ["-c", 'model_provider="taskproxy_run"'] and "http_headers" not in bound_codex.args[4]
    assert launch(["aider"], "http://h", "tp-k", branch).needs_binding
    assert not launch(["aider"], "http://h", "tp-k", binding).needs_binding
    programs = (["npx", "@openai/codex", "exec"], ["node", "/x/claude"], ["python"], ["node", "/x/@openai/codex/bin/codex.js", "exec"],
                ["llm", "-m", "claude"], ["aider", "--model", "openai/codex"], ["npx", "-y", "@anthropic-ai/claude-code@2", "-p", "x"])  # fmt: skip
    assert [agent_of(c) for c in programs] == ["codex", "claude", "other", "codex", "other", "other", "claude"]
    assert agent_of(["node", "-r", "dotenv/config", "/x/codex.js"]) == "codex"
    npx = launch(["npx", "-p", "@openai/codex", "codex", "exec"], "http://h", "tp-k", branch)
    assert npx.args[:6] == ["npx", "-p", "@openai/codex", "codex", "-c", 'model_provider="taskproxy_run"']  # after the program, not npx's -p
    assert conflict(["claude", "--settings", "mine.json"]) is not None and conflict(["claude", "-p", "x"]) is None
    assert exports({"A": "it's $HOME"}, "bash") == "export A='it'\"'\"'s $HOME'\n"


def test_what_a_developer_already_set_does_not_send_the_run_elsewhere() -> None:
    """A work-item header left from a setup by hand billed another item; Claude Code's Bedrock switch
    sent it past the proxy; the developer's own provider key travelled to the proxy with each request."""
    inherited = {"ANTHROPIC_CUSTOM_HEADERS": "X-Work-Item: PROJ-5\nX-Team-Tag: web", "CLAUDE_CODE_USE_BEDROCK": "1",
                 "ANTHROPIC_API_KEY": "sk-ant-mine", "OPENAI_API_KEY": "sk-proj-mine", "PATH": "/bin"}  # fmt: skip
    claude = launch(["claude", "-p", "hi"], "http://h", "tp-k", WorkItemChoice("PROJ-43", "item", ("X-Work-Item", "PROJ-43")), inherited)
    environ = claude.environ(inherited)
    assert environ["ANTHROPIC_CUSTOM_HEADERS"] == "X-Team-Tag: web\nX-Work-Item: PROJ-43"
    assert "CLAUDE_CODE_USE_BEDROCK" not in environ and "ANTHROPIC_API_KEY" not in environ and environ["OPENAI_API_KEY"] == "tp-k"
    settings = json.loads(claude.args[2])["env"]
    assert settings["CLAUDE_CODE_USE_BEDROCK"] == "" and settings["ANTHROPIC_API_KEY"] == "" and "tp-k" not in claude.args[2]  # (ps shows it)
    bound = launch(["claude"], "http://h", "tp-k", WorkItemChoice("PROJ-61", "binding", None), inherited).environ(inherited)
    assert bound["ANTHROPIC_CUSTOM_HEADERS"] == "X-Team-Tag: web"  # the binding applies: no leftover item
    other = launch(["aider"], "http://h", "tp-k", WorkItemChoice("PROJ-61", "binding", None), inherited).environ(inherited)
    assert other["ANTHROPIC_API_KEY"] == "tp-k" and other["OPENAI_API_KEY"] == "tp-k"
    non_ascii = choice_for_run({"work_item": "PROJ-42", "source": "branch"}, "feature/PROJ-42-naïve")
    assert non_ascii is not None and non_ascii.header == ("X-Work-Item", "PROJ-42")  # a header cannot carry the branch


# -- the real agents -------------------------------------------------------------------------------


def test_claude_code_through_taskproxy_run_records_every_turn_on_the_branchs_ticket(
    server: ServerProcess, upstream: FakeUpstream, repo: Path, tmp_path: Path
) -> None:
    claude = agent("claude")
    key = server.new_key(owner="kai")
    env = developer_env(server, key, tmp_path / "home", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    since = len(upstream.received)
    done = taskproxy("run", "--", claude, "-p", "Print a word with the shell.", "--model", "fake-tool", cwd=repo, env=env, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    turns = [r for r in upstream.received[since:] if r["path"] == "/v1/messages" and r["body"]["model"] == "fake-tool"]
    assert len(turns) >= 2, "Claude Code did not run the tool loop (a tool call, then the answer to its result)"
    assert any(block.get("type") == "tool_result" for block in turns[-1]["body"]["messages"][-1]["content"])
    claude_events = lambda: [e for e in server.events("PROJ-42", 1) if e["model"] == "fake-tool"]
    mine = wait_until(claude_events, lambda found: len(found) >= len(turns), 10)
    assert len(mine) == len(turns) and {e["attribution_source"] for e in mine} == {"branch"}
    assert all(e["status"] == 200 and e["usage_source"] == "provider" for e in mine)


def codex_turns(upstream: FakeUpstream, since: int) -> list[dict]:
    return [r for r in upstream.received[since:] if r["path"] == "/v1/responses" and r["body"]["model"] == "fake-tool"]


def codex_events(server: ServerProcess, item: str, expected: int) -> list[dict]:
    return wait_until(lambda: [e for e in server.events(item, 1) if e["model"] == "fake-tool-codex"], lambda found: len(found) >= expected, 10)


def test_codex_through_taskproxy_run_records_every_turn_on_the_branchs_ticket_over_its_websocket(
    server: ServerProcess, upstream: FakeUpstream, repo: Path, tmp_path: Path
) -> None:
    codex = agent("codex")
    env = developer_env(server, server.new_key(owner="kai"), tmp_path / "home", CODEX_HOME=str(tmp_path / "codex"))
    since = len(upstream.received)
    done = taskproxy("run", "--", codex, "exec", "--skip-git-repo-check", "-m", "fake-tool-codex", "Print a word with the shell.",
                     cwd=repo, env=env, timeout=180)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Falling back from WebSockets" not in output and "Reconnecting" not in output, output[-3000:]

    turns = codex_turns(upstream, since)
    assert len(turns) == 2 and turns[1]["body"]["input"][-1]["type"] == "function_call_output"  # the tool loop, sent whole
    mine = codex_events(server, "PROJ-42", len(turns))
    assert len(mine) == 2 and {e["attribution_source"] for e in mine} == {"branch"}
    assert all(e["status"] == 200 and e["usage_source"] == "provider" and e["stream"] for e in mine)


def test_codex_with_its_built_in_provider_and_the_keys_binding(server: ServerProcess, upstream: FakeUpstream, repo: Path, tmp_path: Path) -> None:
    """No `taskproxy run`: Codex's own provider, pointed at the proxy as its docs say (`openai_base_url`, and
    `codex login --with-api-key`), and the work item bound to the key with `taskproxy use`."""
    codex = agent("codex")
    key = server.new_key(owner="ari")
    env = developer_env(server, key, tmp_path / "home", CODEX_HOME=str(tmp_path / "codex"))
    assert taskproxy("use", "PROJ-61", cwd=repo, env=env).returncode == 0
    subprocess.run([codex, "login", "--with-api-key"], input=key, env=env, cwd=repo, capture_output=True, text=True, check=True, timeout=60)
    since = len(upstream.received)
    done = subprocess.run([codex, "-c", f'openai_base_url="{server.url}/v1"', "exec", "--skip-git-repo-check", "-m", "fake-tool-codex",
                           "Print a word with the shell."], env=env, cwd=repo, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Falling back from WebSockets" not in output, output[-3000:]
    turns = codex_turns(upstream, since)
    mine = codex_events(server, "PROJ-61", len(turns))
    assert len(turns) == 2 and len(mine) == 2 and {e["attribution_source"] for e in mine} == {"binding"}
    provider_usage = [(t["body"]["model"], e["prompt_tokens"]) for t, e in zip(turns, sorted(mine, key=lambda e: e["ts"]), strict=True)]
    assert all(tokens > 0 for _, tokens in provider_usage)


def test_codex_through_taskproxy_run_on_the_keys_binding_still_goes_through_the_proxy(
    server: ServerProcess, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """With the key's binding as the run's item, `run` gave Codex nothing but OPENAI_BASE_URL, which its
    built-in provider does not read when logged in: every request went to OpenAI, unrecorded."""
    codex = agent("codex")
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    env = developer_env(server, server.new_key(owner="bo"), tmp_path / "home", CODEX_HOME=str(tmp_path / "codex"))
    assert taskproxy("use", "PROJ-62", cwd=outside, env=env).returncode == 0
    since = len(upstream.received)
    done = taskproxy("run", "--", codex, "exec", "--skip-git-repo-check", "-m", "fake-tool-codex", "Print a word with the shell.",
                     cwd=outside, env=env, timeout=180)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "your key's binding" in done.stderr
    turns = codex_turns(upstream, since)
    mine = codex_events(server, "PROJ-62", len(turns))
    assert len(turns) == 2 and len(mine) == 2 and {e["attribution_source"] for e in mine} == {"binding"}


def test_claude_code_through_taskproxy_run_beats_a_setup_by_hand_pointing_elsewhere(
    server: ServerProcess, upstream: FakeUpstream, repo: Path, tmp_path: Path
) -> None:
    """The docs' setup by hand left in place (a work-item header in the shell and in ~/.claude/settings.json,
    whose env beats the process's), and Claude Code's Bedrock switch: each sent the run's requests to
    another item, or past the proxy."""
    claude = agent("claude")
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text(json.dumps({"env": {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "ANTHROPIC_CUSTOM_HEADERS": "X-Work-Item: PROJ-5", "CLAUDE_CODE_USE_BEDROCK": "1"}}))
    env = developer_env(server, server.new_key(owner="cy"), home, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
                        ANTHROPIC_CUSTOM_HEADERS="X-Work-Item: PROJ-5", CLAUDE_CODE_USE_BEDROCK="1", ANTHROPIC_API_KEY="sk-ant-mine")  # fmt: skip
    since = len(upstream.received)
    done = taskproxy("run", "--item", "PROJ-43", "--", claude, "-p", "Print a word with the shell.", "--model", "fake-tool",
                     cwd=repo, env=env, timeout=180)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    turns = [r for r in upstream.received[since:] if r["path"] == "/v1/messages" and r["body"]["model"] == "fake-tool"]
    mine = wait_until(lambda: [e for e in server.events("PROJ-43", 1) if e["model"] == "fake-tool"], lambda found: len(found) >= len(turns), 10)
    assert len(turns) >= 2 and len(mine) == len(turns) and {e["attribution_source"] for e in mine} == {"header"}
    assert server.events("PROJ-5", 0) == []
