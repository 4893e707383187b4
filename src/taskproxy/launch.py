"""Pointing an agent at the proxy with one command: `taskproxy run [--item ID] -- claude ...` and
`taskproxy env`.

Which work item: `--item`, else the current git branch when the proxy's branch patterns find an id in
it (sent as `X-Git-Branch`, so the proxy records the source `branch`), else the key's binding (nothing
is sent; the proxy applies it). The proxy answers which (`GET /api/me/work-item?item=&branch=`), so
its patterns are the only ones. What each agent reads:

- every command: `OPENAI_BASE_URL` (`OPENAI_API_BASE` for litellm-based tools such as Aider) and
  `OPENAI_API_KEY`; `ANTHROPIC_BASE_URL` (the host root) and `ANTHROPIC_AUTH_TOKEN`;
- Claude Code: `ANTHROPIC_CUSTOM_HEADERS`, one `Name: value` per line, sent with every request;
- Codex CLI: `-c` flags that give it a provider of its own (`codex_overrides`) sending the header,
  on its WebSocket and on HTTP alike;
- anything else that reads only a base URL and a key has no way to send a header: the work item then
  rides on the key's binding, which `run` sets for it (and says so).

Pure: the CLI (cli.py) finds the branch, the key and the binding, and runs the command.
"""

from __future__ import annotations

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

    def describe(self) -> str:
        if self.source == "binding":
            return f"work item {self.work_item} (your key's binding)"
        via = "--item" if self.source == "item" else f"branch {self.header[1] if self.header else ''}"
        return f"work item {self.work_item} (from {via})"


def current_branch(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The checked-out branch, or None outside a repository (or on a detached HEAD)."""
    try:
        done = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    branch = done.stdout.strip()
    return branch if done.returncode == 0 and branch else None


def choice_for_run(run: Mapping[str, str] | None, branch: str | None) -> WorkItemChoice | None:
    """The proxy's answer to `GET /api/me/work-item?item=&branch=` as this run's choice (None: no item)."""
    if not run:
        return None
    work_item, source = run["work_item"], run["source"]
    if source == "item":
        return WorkItemChoice(work_item, source, ("X-Work-Item", work_item))
    if source == "branch" and branch:
        return WorkItemChoice(work_item, source, ("X-Git-Branch", branch))
    return WorkItemChoice(work_item, "binding", None)


def agent_of(command: Sequence[str]) -> str:
    """`claude`, `codex` or `other`, by the program's name (a path or a wrapper such as `npx` is looked through)."""
    words = [Path(word).name for word in command if not word.startswith("-")]
    for word in words[:3]:
        if word in ("claude", "claude-code") or word.startswith("@anthropic-ai/claude-code"):
            return "claude"
        if word == "codex" or word.startswith("@openai/codex"):
            return "codex"
    return "other"


@dataclass(frozen=True)
class Launch:
    env: dict[str, str]
    args: list[str]  # the command, with the agent's own flags added where it takes them
    # The command cannot send the work item's header: the item must be the key's binding for it to count.
    needs_binding: bool = False


def _toml_string(value: str) -> str:
    """A TOML basic string (Codex parses `-c` values as TOML)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def environment(url: str, key: str, choice: WorkItemChoice) -> dict[str, str]:
    """What every command gets: both APIs' base URLs and the key, and the work item for tools that read it."""
    env = {
        "OPENAI_BASE_URL": f"{url}/v1",
        "OPENAI_API_BASE": f"{url}/v1",
        "OPENAI_API_KEY": key,
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_AUTH_TOKEN": key,
        "TASKPROXY_URL": url,
        "TASKPROXY_API_KEY": key,
    }
    if choice.header is not None:
        env["ANTHROPIC_CUSTOM_HEADERS"] = f"{choice.header[0]}: {choice.header[1]}"
    if choice.work_item:
        env["TASKPROXY_WORK_ITEM"] = choice.work_item
    return env


def launch(command: Sequence[str], url: str, key: str, choice: WorkItemChoice) -> Launch:
    env = environment(url, key, choice)
    args = list(command)
    if choice.header is None:  # the key's binding applies: nothing to send
        return Launch(env, args)
    agent = agent_of(command)
    if agent == "claude":
        return Launch(env, args)  # ANTHROPIC_CUSTOM_HEADERS
    if agent == "codex":
        position = next((i for i, word in enumerate(args) if agent_of([word]) == "codex"), 0) + 1
        # Right after the program, before its subcommand (`codex exec ...`): `-c` is a global flag.
        return Launch(env, args[:position] + codex_overrides(url, choice.header) + args[position:])
    return Launch(env, args, needs_binding=True)


CODEX_PROVIDER = "taskproxy"


def codex_overrides(url: str, header: tuple[str, str]) -> list[str]:
    """Codex's `-c` flags for a provider of its own that sends the header. Codex's built-in `openai`
    provider takes `OPENAI_BASE_URL` but cannot be given headers (it refuses an override of a built-in
    provider), so the run uses one named `taskproxy`, with the same Responses WebSocket transport."""
    name, value = header
    provider = (f"{{ name = {_toml_string(CODEX_PROVIDER)}, base_url = {_toml_string(url + '/v1')}, env_key = \"OPENAI_API_KEY\", "
                f"wire_api = \"responses\", supports_websockets = true, http_headers = {{ {_toml_string(name)} = {_toml_string(value)} }} }}")  # fmt: skip
    return ["-c", f"model_provider={_toml_string(CODEX_PROVIDER)}", "-c", f"model_providers.{CODEX_PROVIDER}={provider}"]


def exports(env: Mapping[str, str], shell: str) -> str:
    """`env` as the lines a shell evaluates: `eval "$(taskproxy env)"`, or `taskproxy env --shell fish | source`."""
    if shell == "fish":
        def quote(value: str) -> str:
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

        return "".join(f"set -gx {name} {quote(value)};\n" for name, value in env.items())
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
