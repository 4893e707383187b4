"""The developer commands, over HTTP with the developer's own key: `use`, `me`, `run`, `env`.

They talk to a running proxy (`--url`/$TASKPROXY_URL, `--key`/$TASKPROXY_API_KEY, or $OPENAI_API_KEY when
it holds a proxy key), never to its database; cli.py builds their parser.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from taskproxy.render import print_json
from taskproxy.config import ClientSettings

def _developer_call(args: argparse.Namespace, method: str, path: str, body: dict | None = None, *, expect: str = "work_item") -> dict:
    """The proxy's JSON answer, which holds `expect`; anything else ends the command with one line."""
    import httpx

    client = ClientSettings.load(url=args.url, key=args.key)
    key, url = client.key, client.url
    if not key:
        raise SystemExit("taskproxy: no key: pass --key or set TASKPROXY_API_KEY to your proxy key")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise SystemExit("taskproxy: that is not a proxy key: it starts with tp- and has only letters, digits, '-' and '_'")
    try:
        response = httpx.request(method, url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)
    except httpx.HTTPError as exc:
        raise SystemExit(f"taskproxy: could not reach the proxy at {url} ({exc.__class__.__name__}); set --url or TASKPROXY_URL") from None
    try:
        data = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    except ValueError:
        data = None
    if response.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            raise SystemExit(f"taskproxy: {response.status_code} {error.get('code', '')}: {error.get('message', '')}")
        raise SystemExit(f"taskproxy: {response.status_code} from {url}: {' '.join(response.text[:200].split())}")
    if not isinstance(data, dict) or expect not in data:  # a web server, a login page, a load balancer's redirect
        redirect = f", a redirect to {response.headers.get('location')}" if response.is_redirect else ""
        raise SystemExit(f"taskproxy: {url} did not answer as taskproxy does (HTTP {response.status_code}{redirect}): "
                         "set --url or TASKPROXY_URL to the proxy's address")  # fmt: skip
    return data


def cmd_use(args: argparse.Namespace) -> int:
    if args.clear and args.work_item:  # which one was meant? Clearing silently dropped the item
        print(f"taskproxy: --clear removes the binding and takes no work item (got {args.work_item!r})", file=sys.stderr)
        return 2
    if args.clear:
        _developer_call(args, "DELETE", "/api/me/work-item")
        print("cleared: requests without a work item are refused again")
        return 0
    if not args.work_item:
        data = _developer_call(args, "GET", "/api/me/work-item")
        print(f"bound to {data['work_item']} until {data['expires_at']}" if data["work_item"] else "no work item bound")
        return 0
    data = _developer_call(args, "PUT", "/api/me/work-item", {"work_item": args.work_item})
    print(f"requests with no other work item now count for {data['work_item']} until {data['expires_at']}")
    return 0


def cmd_me(args: argparse.Namespace) -> int:
    from taskproxy.money import format_usd as money
    from taskproxy.render import table

    data = _developer_call(args, "GET", "/api/me/usage", expect="owner")
    if args.json:
        print_json(data)
        return 0
    print(f"{data['owner']} (team {data['team'] or '-'}), key {data['key_id']}; bound work item: {data['work_item'] or 'none'}\n")
    rows = [{**r, "cost": money(r["cost_usd"])} for r in data["work_items"]]
    print(table(rows, [("work_item", "work item"), ("requests", "requests"), ("total_tokens", "tokens"), ("cost", "cost (USD)"), ("last_used", "last used")]))
    if data["work_items_total"] > len(rows):
        print(f"(the {len(rows)} work items used most recently, of {data['work_items_total']})")
    if data["rejected_requests"]:
        print("\nrefused: " + ", ".join(f"{k} × {v}" for k, v in data["rejected_requests"].items()))
    return 0


def _work_item_choice(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """This run's proxy (address and key) and work item, as the proxy's patterns read `--item` or the branch."""
    from urllib.parse import urlencode

    from taskproxy import launch

    client = ClientSettings.load(url=args.url, key=args.key)
    if not client.key:
        raise SystemExit("taskproxy: no key: pass --key or set TASKPROXY_API_KEY to your proxy key (an admin creates one with `taskproxy keys create`)")
    branch = None if args.item else launch.current_branch()
    query = urlencode({"item": args.item} if args.item else {"branch": branch or ""})
    answer = _developer_call(args, "GET", f"/api/me/work-item?{query}")  # the proxy's patterns decide; also checks the key
    choice = launch.choice_for_run(answer.get("run"), branch)
    if choice is None:
        on = f" (branch {branch!r} names none)" if branch else ""
        raise SystemExit(f"taskproxy: {launch.HOW_TO_GIVE_AN_ITEM}{on}")
    return client, choice


def cmd_run(args: argparse.Namespace) -> int:
    import shutil

    command = args.agent_command[1:] if args.agent_command[:1] == ["--"] else args.agent_command
    if not command:
        raise SystemExit("taskproxy: nothing to run: `taskproxy run [--item ID] -- claude ...` (or codex, aider, any command)")
    from taskproxy.launch import conflict, launch

    if (why := conflict(command)) is not None:
        raise SystemExit(f"taskproxy: {why}")
    client, choice = _work_item_choice(args)
    started = launch(command, client.url, client.key, choice, os.environ)
    if not shutil.which(started.args[0]):  # said before the key is bound for it
        raise SystemExit(f"taskproxy: could not run {started.args[0]!r}: no such command")
    if started.needs_binding:
        data = _developer_call(args, "PUT", "/api/me/work-item", {"work_item": choice.work_item})
        print(f"taskproxy: {command[0]} cannot send a work item header; your key is bound to {data['work_item']} "
              f"until {data['expires_at']} (`taskproxy use --clear` ends it)", file=sys.stderr)  # fmt: skip
    print(f"taskproxy: {command[0]} → {started.env['TASKPROXY_URL']}, {choice.describe()}", file=sys.stderr)
    sys.stderr.flush()
    # Python ignores SIGPIPE and SIGXFSZ, and an exec keeps what is ignored: `yes | head -1` under run
    # printed "Broken pipe" and failed. The agent starts with the defaults, as from a shell.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvpe(started.args[0], started.args, started.environ(os.environ))
    except OSError as exc:
        raise SystemExit(f"taskproxy: could not run {started.args[0]!r}: {exc.strerror}") from None
    return 0  # pragma: no cover  (exec does not return)


def cmd_env(args: argparse.Namespace) -> int:
    from taskproxy.launch import environment, exports

    client, choice = _work_item_choice(args)
    print(f"# taskproxy: {choice.describe()}")
    if choice.header is not None:  # only Claude Code reads a header from the environment: the others go by the binding
        data = _developer_call(args, "PUT", "/api/me/work-item", {"work_item": choice.work_item})
        print(f"# your key is bound to {data['work_item']} until {data['expires_at']}, for the tools that cannot send a header "
              "(`taskproxy use --clear` ends it)")  # fmt: skip
    # What every command gets, without ANTHROPIC_API_KEY: Claude Code, started from this shell, would ask
    # whether to use it and send it beside the token (`run` gives it to the commands that need it).
    print(exports(environment(client.url, client.key, choice, os.environ), args.shell), end="")
    return 0
