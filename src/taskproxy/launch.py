"""Pointing an agent at the proxy with one command: `taskproxy run [--item ID] -- claude ...` and
`taskproxy env`.

Which work item: `--item`, else the current git branch when the proxy's branch patterns find an id in
it (sent as `X-Git-Branch`, so the proxy records the source `branch`), else the key's binding (nothing
is sent; the proxy applies it). The proxy answers which (`GET /api/me/work-item?item=&branch=`), so
its patterns are the only ones. What each agent reads:

- every command: `OPENAI_BASE_URL` (`OPENAI_API_BASE` for litellm-based tools such as Aider) and
  `OPENAI_API_KEY`; `ANTHROPIC_BASE_URL` (the host root) and `ANTHROPIC_AUTH_TOKEN` (and, but for
  Claude Code, `ANTHROPIC_API_KEY`): the proxy key, never the developer's own provider key;
- Claude Code: `ANTHROPIC_CUSTOM_HEADERS`, one `Name: value` per line, sent with every request (the
  developer's own lines kept, but a work item's left over from an earlier setup), and the same
  variables again in `--settings`, which beats a `~/.claude/settings.json` `env` pointing elsewhere;
  its Bedrock, Vertex and Foundry switches are taken away (each sends it past the proxy);
- Codex CLI: `-c` flags that give it a provider of its own (`codex_overrides`, under a name no config
  file uses) sending the header, on its WebSocket and on HTTP alike; always, a binding too: its
  built-in provider would go to OpenAI (it reads no `OPENAI_BASE_URL` when logged in with ChatGPT);
- anything else that reads only a base URL and a key has no way to send a header: the work item then
  rides on the key's binding, which `run` sets for it (and says so).

Pure: the CLI (cli.py) finds the branch, the key and the binding, and runs the command.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


HOW_TO_GIVE_AN_ITEM = (
    "no work item for this run: pass --item PROJ-123 (or owner/repo#12, or a tracker URL), work on a branch that "
    "names one (feature/PROJ-123-retry), or bind one to your key with `taskproxy use PROJ-123`"
)
SHELLS = ("bash", "zsh", "fish")


@dataclass(frozen=True)
class WorkItemChoice:
    """Where this run's work item comes from, and the header that carries it (none: the key's binding)."""

    work_item: str | None
    source: str  # item | branch | binding
    header: tuple[str, str] | None
    branch: str | None = None  # the branch that named it (source `branch`)

    def describe(self) -> str:
        if self.source == "binding":
            return f"work item {self.work_item} (your key's binding)"
        via = "--item" if self.source == "item" else f"branch {self.branch}"
        return f"work item {self.work_item} (from {via})"


def current_branch(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The checked-out branch, or the one being rebased (HEAD is detached meanwhile, the work goes on);
    None outside a repository or on another detached HEAD."""
    try:
        # A branch name is bytes to git: one not in UTF-8 is read with U+FFFD where it is not (its item still found).
        done = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"], cwd=cwd, capture_output=True, encoding="utf-8",
                              errors="replace", timeout=10)  # fmt: skip
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
        for state in ("rebase-merge", "rebase-apply"):
            where = subprocess.run(["git", "rev-parse", "--git-path", f"{state}/head-name"], cwd=cwd, capture_output=True, encoding="utf-8",
                                   errors="replace", timeout=10)  # fmt: skip
            path = Path(cwd or ".", where.stdout.strip())
            if where.returncode == 0 and path.is_file():
                return path.read_text(encoding="utf-8", errors="replace").strip().removeprefix("refs/heads/") or None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return None


def choice_for_run(run: Mapping[str, str] | None, branch: str | None) -> WorkItemChoice | None:
    """The proxy's answer to `GET /api/me/work-item?item=&branch=` as this run's choice (None: no item).
    A branch is sent as it is (the proxy records the source `branch`) unless a header cannot carry it
    (non-ASCII: Claude Code refuses to start); then the item it names is sent."""
    if not run:
        return None
    work_item, source = run["work_item"], run["source"]
    if source == "item":
        return WorkItemChoice(work_item, source, ("X-Work-Item", work_item))
    if source == "branch" and branch:
        sendable = branch.isascii() and branch.isprintable()
        return WorkItemChoice(work_item, source, ("X-Git-Branch", branch) if sendable else ("X-Work-Item", work_item), branch)
    return WorkItemChoice(work_item, "binding", None)


_RUNNERS = ("npx", "bunx", "pnpm", "npm", "yarn", "node", "bun", "deno")  # programs that run the next word
_RUNNER_WORDS = ("exec", "dlx", "x", "run")
_RUNNER_VALUE_FLAGS = ("-p", "--package", "-c", "--call", "-r", "--require", "--max-old-space-size")  # the next word is theirs


def _agent_at(command: Sequence[str]) -> tuple[str, int]:
    """The agent (`claude`, `codex`, `other`) and where its program is in `command`: the first word, or
    the script or package a runner (`npx`, `node`, ...) is given. Words after it are its arguments: `llm
    -m claude` is not Claude Code."""
    if not command:
        return "other", 0
    position = 0
    if Path(command[0]).name in _RUNNERS:
        position = next((n for n, word in enumerate(command) if n and not word.startswith("-") and word not in _RUNNER_WORDS
                         and command[n - 1] not in _RUNNER_VALUE_FLAGS), 0)  # fmt: skip
    word = command[position]
    name = Path(word).name
    if name in ("claude", "claude-code") or "@anthropic-ai/claude-code" in word:
        return "claude", position
    if name == "codex" or name.startswith(("codex-", "codex.")) or "@openai/codex" in word:
        return "codex", position
    return "other", position


def agent_of(command: Sequence[str]) -> str:
    """`claude`, `codex` or `other`, by the program's name (a path or a runner such as `npx` is looked through)."""
    return _agent_at(command)[0]


@dataclass(frozen=True)
class Launch:
    env: dict[str, str]
    args: list[str]  # the command, with the agent's own flags added where it takes them
    # The command cannot send the work item's header: the item must be the key's binding for it to count.
    needs_binding: bool = False
    unset: tuple[str, ...] = ()  # taken from the command's environment

    def environ(self, inherited: Mapping[str, str]) -> dict[str, str]:
        """The command's environment: the developer's, less `unset`, with `env`."""
        return {**{name: value for name, value in inherited.items() if name not in self.unset}, **self.env}


# Claude Code's switches to other clouds: each sends it past the proxy, to a provider of its own.
CLAUDE_ELSEWHERE = ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "CLAUDE_CODE_USE_FOUNDRY")
_ITEM_HEADERS = ("x-work-item", "x-git-branch")


def custom_headers(inherited: str | None, header: tuple[str, str] | None) -> str:
    """Claude Code's `ANTHROPIC_CUSTOM_HEADERS`: the developer's own lines, but a work item's (a
    leftover from a setup by hand would bill another item), then this run's."""
    lines = [line for line in (inherited or "").splitlines() if line.strip() and line.split(":", 1)[0].strip().lower() not in _ITEM_HEADERS]
    return "\n".join([*lines, *([f"{header[0]}: {header[1]}"] if header else [])])


def _toml_string(value: str) -> str:
    """A TOML basic string (Codex parses `-c` values as TOML)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def environment(url: str, key: str, choice: WorkItemChoice, inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every command gets (and `taskproxy env` prints): both APIs' base URLs and the proxy key,
    Claude Code's headers, and the work item for tools that read it. `inherited`: the developer's
    environment. Not `ANTHROPIC_API_KEY`: Claude Code asks whether to use one it finds, and sends it
    beside the token; `launch` gives it to the other commands."""
    env = {
        "OPENAI_BASE_URL": f"{url}/v1",
        "OPENAI_API_BASE": f"{url}/v1",
        "OPENAI_API_KEY": key,
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_AUTH_TOKEN": key,
        "ANTHROPIC_CUSTOM_HEADERS": custom_headers((inherited or {}).get("ANTHROPIC_CUSTOM_HEADERS"), choice.header),
        "TASKPROXY_URL": url,
        "TASKPROXY_API_KEY": key,
    }
    if choice.work_item:
        env["TASKPROXY_WORK_ITEM"] = choice.work_item
    return env


def conflict(command: Sequence[str]) -> str | None:
    """Why `run` cannot point `command` at the proxy as given, or None."""
    if agent_of(command) == "claude" and any(word == "--settings" or word.startswith("--settings=") for word in command):
        return ("Claude Code takes one --settings, and run gives it its own (the proxy's address and headers): "
                "put yours in ~/.claude/settings.json or .claude/settings.json instead")  # fmt: skip
    return None


def launch(command: Sequence[str], url: str, key: str, choice: WorkItemChoice, inherited: Mapping[str, str] | None = None) -> Launch:
    env = environment(url, key, choice, inherited)
    args = list(command)
    agent, position = _agent_at(command)
    after = position + 1  # the agent's own flags go right after its program, before a subcommand (`codex exec ...`)
    if agent == "claude":
        # Its settings file's `env` beats the process's: the same variables again, as settings of this run.
        # No ANTHROPIC_API_KEY: Claude Code asks whether to use one it finds, and sends both.
        # Not the key: a command line is readable by every user of the machine (a settings file's token
        # left in place fails loudly, 401, at the proxy).
        names = ("ANTHROPIC_BASE_URL", "ANTHROPIC_CUSTOM_HEADERS")
        settings = {"env": {**{name: env[name] for name in names}, "ANTHROPIC_API_KEY": "", **dict.fromkeys(CLAUDE_ELSEWHERE, "")}}
        return Launch(env, args[:after] + ["--settings", json.dumps(settings)] + args[after:], unset=("ANTHROPIC_API_KEY", *CLAUDE_ELSEWHERE))
    if agent == "codex":  # a binding too: Codex's built-in provider would go to OpenAI
        return Launch(env, args[:after] + codex_overrides(url, choice.header) + args[after:])
    # A litellm-based tool (Aider) reads Anthropic's key from ANTHROPIC_API_KEY: the proxy key, not the developer's own.
    return Launch({**env, "ANTHROPIC_API_KEY": key}, args, needs_binding=choice.header is not None)


CODEX_PROVIDER = "taskproxy_run"  # not `taskproxy`, which a developer's config.toml may define (Codex would merge the two)


def codex_overrides(url: str, header: tuple[str, str] | None) -> list[str]:
    """Codex's `-c` flags for a provider of its own that sends the header, if any. Codex's built-in
    `openai` provider takes `OPENAI_BASE_URL` but cannot be given headers (it refuses an override of a
    built-in provider), so the run uses one of its own, with the same Responses WebSocket transport."""
    headers = f", http_headers = {{ {_toml_string(header[0])} = {_toml_string(header[1])} }}" if header else ""
    provider = (f"{{ name = {_toml_string(CODEX_PROVIDER)}, base_url = {_toml_string(url + '/v1')}, env_key = \"OPENAI_API_KEY\", "
                f"wire_api = \"responses\", supports_websockets = true{headers} }}")  # fmt: skip
    return ["-c", f"model_provider={_toml_string(CODEX_PROVIDER)}", "-c", f"model_providers.{CODEX_PROVIDER}={provider}"]


def exports(env: Mapping[str, str], shell: str) -> str:
    """`env` as the lines a shell evaluates: `eval "$(taskproxy env)"`, or `taskproxy env --shell fish | source`."""
    if shell == "fish":
        def quote(value: str) -> str:
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

        return "".join(f"set -gx {name} {quote(value)};\n" for name, value in env.items())
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
