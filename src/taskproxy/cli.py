"""The `taskproxy` command line: its parser, its argument types, and the one place its errors become
a line and an exit code. The verbs are thin shells over the functions the API uses: the operator's
(serve, demo, db, keys, items, report; on the configured database directly) in commands.py, the
developer's (use, me, run, env; over HTTP with the developer's own key) in developer.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from taskproxy import __version__
from taskproxy.commands import (
    cmd_db_replay_set_aside, cmd_db_upgrade, cmd_demo, cmd_items_add, cmd_items_close, cmd_items_complete, cmd_items_list,
    cmd_items_show, cmd_items_sync, cmd_keys_create, cmd_keys_list, cmd_keys_revoke, cmd_report_adoption, cmd_report_signals,
    cmd_report_tasks, cmd_serve,
)  # fmt: skip
from taskproxy.errors import ApiError, ConfigError, MigrationBlocked, SchemaBehind, TrackerUnavailable
from taskproxy.developer import cmd_env, cmd_me, cmd_run, cmd_use
from taskproxy.launch import SHELLS
from taskproxy.settings import DEFAULT_PROXY_URL, MAX_WORKERS
from taskproxy.workitems import ITEM_STATUSES, SETTABLE_STATUSES

DEFAULT_LOCK_WAIT_SECONDS = 10.0  # `db upgrade --lock-wait`: how long a migration may hold up the queries behind its wait


# -- the parser -----------------------------------------------------------------------------------


def _time_argument(value: str) -> Any:
    from taskproxy.timeutil import EARLIEST, LATEST, parse_time

    try:
        return parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time (2026-11-01, 2026-11-01T09:00:00Z) or a period (30m, 12h, 7d, 2w) "
                                         f"from {EARLIEST.year} to {LATEST.year - 1}") from None  # fmt: skip


def _count(maximum: int, minimum: int = 1) -> Callable[[str], int]:
    """An argument from `minimum` to `maximum`, as the API's `limit` parameters (and the config's
    bounds: a port past 65535 was handed to the server, which listened on another port)."""

    def parse(value: str) -> int:
        if not (value.isascii() and value.isdigit()) or not minimum <= int(value) <= maximum:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from {minimum} to {maximum:,}")
        return int(value)

    return parse


def _team(value: str) -> str | None:
    return value or None  # `--team ""`: every team, as the API's `team=`


def _lock_wait(value: str) -> float:
    """`db upgrade --lock-wait`: seconds, from 0 (no limit) to PostgreSQL's largest `lock_timeout`."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 2_147_483:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds from 0 (no limit) to 2147483")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskproxy",
        description="OpenAI-compatible proxy that only forwards AI requests linked to a work item, "
        "and reports token spend per work item.",
        epilog="Start with `taskproxy demo`. Config: --config PATH, else $TASKPROXY_CONFIG, else config/taskproxy.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"taskproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, handler: Callable[[argparse.Namespace], int], help: str, config: bool = True) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        if config:
            sub.add_argument("--config", metavar="PATH", help="YAML config file (default: $TASKPROXY_CONFIG or config/taskproxy.yaml)")
        sub.set_defaults(handler=handler)
        return sub

    serve = command(commands, "serve", cmd_serve, "run the proxy")
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=_count(65_535, minimum=0), help="port to listen on, 0 to 65535 (default: server.port, 8080)")
    serve.add_argument("--workers", type=_count(MAX_WORKERS), help=f"worker processes, 1 to {MAX_WORKERS} (default: server.workers, 1)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="(default: info)")
    serve.add_argument("--access-log", action="store_true", help="log every request line (off by default)")

    demo = command(commands, "demo", cmd_demo, "run the whole loop offline on a built-in fake provider: per-task usage, a refusal, completed "
                   "work, the adoption report and a gaming signal", config=False)  # fmt: skip
    demo.add_argument("--serve", action="store_true", help="then keep the proxy and its dashboard running with the demo's data, until Ctrl-C")

    db = commands.add_parser("db", help="database schema", description="The database's schema: create or upgrade it, replay what was set aside."
                             ).add_subparsers(dest="db_command", metavar="ACTION", required=True)  # fmt: skip
    upgrade = command(db, "upgrade", cmd_db_upgrade, "create or upgrade the database schema")
    upgrade.add_argument("--lock-wait", type=_lock_wait, default=DEFAULT_LOCK_WAIT_SECONDS, metavar="SECONDS",
                         help="PostgreSQL: give up, rolling everything back, when a migration waits longer than this for a "
                              f"table another session is using, instead of holding up every query behind it (default {DEFAULT_LOCK_WAIT_SECONDS:g}; "
                              "0: wait as long as it takes)")  # fmt: skip
    command(db, "replay-set-aside", cmd_db_replay_set_aside,
            "write the usage rows the database once refused (kept beside recording.spool_path), once their cause is fixed")  # fmt: skip

    keys = commands.add_parser("keys", help="proxy keys (admin)", description="Proxy keys: one per person or service, each in a team. "
                               "Works on the database the config names.").add_subparsers(dest="keys_command", metavar="ACTION", required=True)  # fmt: skip
    create = command(keys, "create", cmd_keys_create, "create a key; it is printed once")
    create.add_argument("--owner", required=True, help="the person or service the key belongs to")
    create.add_argument("--team", help="the owner's team (reports group by team)")
    create.add_argument("--role", default="developer", choices=["developer", "service", "admin"])
    create.add_argument("--json", action="store_true", help="print the key as JSON")
    command(keys, "list", cmd_keys_list, "list keys (never their secrets)").add_argument("--json", action="store_true", help="print JSON")
    command(keys, "revoke", cmd_keys_revoke, "revoke a key by id").add_argument("key_id", help="the key's id (key_…), as `taskproxy keys list` shows it")

    items = commands.add_parser("items", help="work items (admin)", description="Work items: register, complete, close, list and show them; "
                                "sync them from the trackers' APIs.").add_subparsers(dest="items_command", metavar="ACTION", required=True)  # fmt: skip
    add = command(items, "add", cmd_items_add, "register a work item")
    add.add_argument("id", help="PROJ-123, owner/repo#12 or a tracker URL")
    add.add_argument("--title", help="what the work is")
    add.add_argument("--url", help="the item in its tracker")
    add.add_argument("--team", help="the team doing it (else the team that spends most on it)")
    add.add_argument("--status", default="open", choices=SETTABLE_STATUSES, help="(default: open)")
    add.add_argument("--json", action="store_true", help="print JSON")
    listing = command(items, "list", cmd_items_list, "list work items")
    listing.add_argument("--status", choices=ITEM_STATUSES, help="only items in this status")
    listing.add_argument("--team", help="only this team's items")
    listing.add_argument("--limit", type=_count(10_000), default=1000, help="at most this many, the newest first (default: 1,000)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    command(items, "complete", cmd_items_complete, "mark a work item done (as a tracker webhook would)").add_argument("id")
    command(items, "close", cmd_items_close, "mark a work item closed without completion").add_argument("id")
    sync = command(items, "sync", cmd_items_sync, "ask the trackers' APIs for the status of items with spend and no final status "
                   "(webhooks missed); apply what changed")  # fmt: skip
    sync.add_argument("--tracker", choices=["github", "gitlab", "jira", "linear"], help="only this tracker (default: every one with a token_env)")
    sync.add_argument("--since", type=_time_argument, default="30d", help="items with spend since (default 30d)")
    sync.add_argument("--json", action="store_true", help="print JSON")
    show = command(items, "show", cmd_items_show, "what one work item cost")
    show.add_argument("id", help="PROJ-123, owner/repo#12 or a tracker URL")
    show.add_argument("--json", action="store_true", help="print JSON")

    report = commands.add_parser("report", help="reports (admin)", description="Reports: usage per task, AI adoption against completed work, "
                                 "gaming signals. Read from the database the config names.").add_subparsers(dest="report_command", metavar="REPORT", required=True)  # fmt: skip
    tasks = command(report, "tasks", cmd_report_tasks, "work items by cost")
    tasks.add_argument("--since", type=_time_argument, help="a time (2026-11-01) or a period back from now (7d, 12h); default: all time")
    tasks.add_argument("--limit", type=_count(10_000), default=50, help="the most expensive tasks first, at most this many (default: 50)")
    tasks.add_argument("--json", action="store_true", help="print JSON")
    adoption = command(report, "adoption", cmd_report_adoption, "AI spend against completed work, overall and per team")
    adoption.add_argument("--since", type=_time_argument, help="a time (2026-11-01) or a period back from now (30d); default: 30 days before --until")
    adoption.add_argument("--until", type=_time_argument, help="end of the period (default: now)")
    adoption.add_argument("--team", type=_team, help="only this team (with --latest: its part of the latest snapshot)")
    adoption.add_argument("--latest", action="store_true", help="the latest snapshot (last 30 days; reports.snapshot_minutes) instead of computing")
    output = adoption.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV, as GET /api/reports/adoption.csv")
    signals = command(report, "signals", cmd_report_signals, "gaming signals: advisory flags about keys, with their evidence")
    signals.add_argument("--since", type=_time_argument, help="a time (2026-11-01) or a period back from now (30d); default: 30 days before --until")
    signals.add_argument("--until", type=_time_argument, help="end of the period (default: now)")
    signals.add_argument("--latest", action="store_true", help="the latest snapshot (last 30 days; reports.snapshot_minutes) instead of computing")
    signals.add_argument("--json", action="store_true", help="print JSON")

    for name, handler, help_text in [("use", cmd_use, "bind a work item to your key, for clients that cannot send headers"),
                                     ("me", cmd_me, "your own usage, as the proxy recorded it")]:  # fmt: skip
        sub = command(commands, name, handler, help_text, config=False)
        sub.add_argument("--url", help=f"the proxy (default: $TASKPROXY_URL or {DEFAULT_PROXY_URL})")
        sub.add_argument("--key", help="your proxy key (default: $TASKPROXY_API_KEY, then $OPENAI_API_KEY)")
        if name == "use":
            sub.add_argument("work_item", nargs="?", help="PROJ-123, owner/repo#12 or a tracker URL; omit to show the binding. "
                             "The binding lasts work_items.binding_ttl_hours (12 by default)")  # fmt: skip
            sub.add_argument("--clear", action="store_true", help="remove the binding (takes no work item)")
        else:
            sub.add_argument("--json", action="store_true", help="print JSON")
    run = command(commands, "run", cmd_run, "run an agent or any command pointed at the proxy, with your key and the work item "
                  "(from --item, else the git branch, else your key's binding)", config=False)  # fmt: skip
    run.add_argument("agent_command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="e.g. -- claude -p 'fix the flaky test'; -- codex exec ...")
    env = command(commands, "env", cmd_env, "print the environment `run` would give, as export lines: eval \"$(taskproxy env)\"", config=False)
    env.add_argument("--shell", choices=SHELLS, default="bash", help="the syntax of the lines (default: bash; zsh is the same)")
    for sub in (run, env):
        sub.add_argument("--item", help="the work item (PROJ-123, owner/repo#12 or a tracker URL); default: from the git branch, else your key's binding")
        sub.add_argument("--url", help=f"the proxy (default: $TASKPROXY_URL or {DEFAULT_PROXY_URL})")
        sub.add_argument("--key", help="your proxy key (default: $TASKPROXY_API_KEY, then $OPENAI_API_KEY)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    # Python hands bytes that are not UTF-8 over as lone surrogates, which fail later wherever they are
    # printed or stored: a traceback, where the user needs to hear which argument it was.
    for argument in arguments:
        if any("\udc80" <= c <= "\udcff" for c in argument):
            print(f"taskproxy: the argument {argument.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8", file=sys.stderr)
            return 2
    args = build_parser().parse_args(arguments)
    try:
        return args.handler(args)
    except (ConfigError, SchemaBehind, MigrationBlocked, TrackerUnavailable) as exc:
        print(f"taskproxy: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"taskproxy: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `taskproxy items list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush does not fail again
        return 141
    except OSError as exc:  # a database file in a folder that is not there, say
        print(f"taskproxy: {exc.strerror or exc}: {exc.filename}" if exc.filename else f"taskproxy: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError  # the CLI's boundary for the database's errors (imported only here)

        if not isinstance(exc, SQLAlchemyError):
            raise
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0][:300]
        print(f"taskproxy: the database failed ({exc.__class__.__name__}): {reason}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `taskproxy` command (and `python -m taskproxy`): `main`, then exit without the interpreter's
    last garbage collections. Those walk every object the command made: ~0.5 s of CPU after the demo,
    which a busy machine stretched to 3-10 s between Ctrl-C and the prompt. What is left goes with the
    process. (Tests call `main`, in their own process, which this must not freeze.)"""
    status = main()
    # One collection first: what the command left in reference cycles (a database engine and its pool)
    # is finalized now, so connections close cleanly and SQLite folds its write-ahead log into the file.
    gc.collect()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
