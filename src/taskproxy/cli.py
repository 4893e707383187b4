"""The `taskproxy` command: a thin shell over the functions the API uses.

Admin commands (keys, items, report, db) work on the configured database directly. Developer
commands (use, me, run, env: developer.py) talk to a running proxy over HTTP with the developer's own key.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from taskproxy import __version__
from taskproxy.errors import ApiError, ConfigError, MigrationBlocked, SchemaBehind, TrackerUnavailable
from taskproxy.developer import cmd_env, cmd_me, cmd_run, cmd_use
from taskproxy.launch import SHELLS
from taskproxy.render import print_json
from taskproxy.settings import DEFAULT_CONFIG_PATH, DEFAULT_PROXY_URL, Settings, load_settings
from taskproxy.workitems import ITEM_STATUSES, SETTABLE_STATUSES

DEFAULT_LOCK_WAIT_SECONDS = 10.0  # `db upgrade --lock-wait`: how long a migration may hold up the queries behind its wait


def _settings(args: argparse.Namespace) -> Settings:
    # Only the server reaches providers and takes webhooks: the admin commands run without their secrets.
    return load_settings(args.config, secrets_required=args.command == "serve")


def _engine(args: argparse.Namespace, *, report: bool = False):  # type: ignore[no-untyped-def]
    """The database's engine; `report`: one that computes a period report (`reports.work_mem_mb`)."""
    from taskproxy.storage.db import make_engine, prepare_schema

    settings = _settings(args)
    if not (args.config or os.environ.get("TASKPROXY_CONFIG") or os.environ.get("TASKPROXY_DATABASE_URL") or DEFAULT_CONFIG_PATH.exists()):
        # Keys created here would be in a database no running proxy reads: say which one it is.
        print(f"taskproxy: no config (--config, $TASKPROXY_CONFIG, {DEFAULT_CONFIG_PATH}) and no $TASKPROXY_DATABASE_URL: "
              f"using {settings.database_url} in {os.getcwd()}", file=sys.stderr)  # fmt: skip
    engine = make_engine(settings.database_url, work_mem_mb=settings.reports.work_mem_mb if report else 0)
    prepare_schema(engine)
    return engine


# -- serve / demo / db ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from taskproxy.process import serve

    settings = _settings(args)
    workers = args.workers or settings.server.workers
    if workers > 1:  # create the schema once here rather than racing in every worker's lifespan
        _engine(args).dispose()
    serve(
        settings, host=args.host or settings.server.host, port=args.port if args.port is not None else settings.server.port,
        workers=workers, log_level=args.log_level, access_log=args.access_log,
    )  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from taskproxy.demo import run_demo

    return run_demo(serve=args.serve)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from taskproxy.storage.db import make_engine, upgrade_schema

    settings = _settings(args)
    engine = make_engine(settings.database_url)
    before, after = upgrade_schema(engine, lock_wait_seconds=args.lock_wait)
    where = settings.database_url.split("@")[-1]
    print(f"database at revision {after}: {where}" if before == after else f"upgraded {where} from {before or 'nothing'} to {after}")
    return 0


def cmd_db_replay_set_aside(args: argparse.Namespace) -> int:
    from taskproxy.storage.writer import replay_set_aside

    settings = _settings(args)
    written, kept = replay_set_aside(_engine(args), settings.recording.spool_path)
    print(f"wrote {written} set-aside row(s); {kept} still refused by the database, kept for another try" if written or kept
          else "nothing is set aside")  # fmt: skip
    return 0 if not kept else 1


# -- keys -----------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    from taskproxy.guard.auth import issue_key
    from taskproxy.records import key_json

    key, token = issue_key(_engine(args), owner=args.owner, team=args.team, role=args.role)
    if args.json:
        print_json({**key_json(key), "key": token})
    else:
        print(f"created {key.id} for {key.owner} (team {key.team or '-'}, role {key.role})")
        print(f"key: {token}")
        print("It is shown once; taskproxy stores only its hash.")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from taskproxy.render import table
    from taskproxy.records import key_json
    from taskproxy.storage import repo

    keys = [key_json(k) for k in repo.list_keys(_engine(args))]
    if args.json:
        print_json(keys)
    else:
        columns = [("id", "id"), ("prefix", "key"), ("owner", "owner"), ("team", "team"), ("role", "role"), ("created_at", "created"), ("revoked_at", "revoked")]
        print(table(keys, columns))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from taskproxy.guard.auth import revoke

    key = revoke(_engine(args), args.key_id)
    print(f"revoked {key.id} ({key.owner}); running proxies refuse it within auth.key_refresh_seconds")
    return 0


# -- items ----------------------------------------------------------------------------------------


def _ids(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from taskproxy.workitems import WorkItemIds

    settings = _settings(args)
    return WorkItemIds(settings.work_items.patterns, settings.work_items.branch_patterns)


def _work_items(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from taskproxy.registry import WorkItems

    return WorkItems(_engine(args), _ids(args), rework_days=_settings(args).reports.rework_days)


def cmd_items_add(args: argparse.Namespace) -> int:
    from taskproxy.records import item_json

    fields = {"id": args.id, "title": args.title, "url": args.url, "team": args.team, "status": args.status}
    item = _work_items(args).register(fields, source="cli")
    if args.json:
        print_json(item_json(item))
    else:
        print(f"added {item.id} ({item.status})")
    return 0


def cmd_items_list(args: argparse.Namespace) -> int:
    from taskproxy.render import table
    from taskproxy.records import item_json
    from taskproxy.storage import repo

    items = [item_json(i) for i in repo.list_work_items(_engine(args), status=args.status, team=args.team, limit=args.limit)]
    if args.json:
        print_json(items)
    else:
        print(table(items, [("id", "id"), ("status", "status"), ("source", "source"), ("team", "team"), ("title", "title"), ("created_at", "created")]))
    return 0


def cmd_items_show(args: argparse.Namespace) -> int:
    from taskproxy.money import format_usd as money
    from taskproxy.reports.items import work_item_view

    item_id = _ids(args).normalize(args.id)
    summary = work_item_view(_engine(args), item_id)
    if summary is None:
        print(f"taskproxy: no work item {item_id}", file=sys.stderr)
        return 1
    if args.json:
        print_json(summary)
        return 0
    for label, key in [("id", "id"), ("status", "status"), ("title", "title"), ("team", "team"), ("requests", "requests"),
                       ("prompt tokens", "prompt_tokens"), ("completion tokens", "completion_tokens"), ("cached tokens", "cached_tokens"),
                       ("total tokens", "total_tokens"), ("models", "models"), ("people", "people"), ("first used", "first_used"), ("last used", "last_used")]:  # fmt: skip
        value = summary[key]
        print(f"{label:>18}: {', '.join(value) if isinstance(value, list) else ('-' if value is None else value)}")
    print(f"{'cost':>18}: {money(summary['cost_usd'])}" + (f" ({summary['unpriced_attempts']} attempts without a known price)" if summary["unpriced_attempts"] else ""))
    if summary["cycle_time_hours"] is not None:
        print(f"{'cycle time':>18}: {summary['cycle_time_hours']:.1f} h")
    for change in summary["history"]:
        print(f"{'':>18}  {change['ts']}  {change['from'] or '-'} → {change['to']} ({change['source']})")
    return 0


def _resolve(args: argparse.Namespace, status: str) -> int:
    item = _work_items(args).resolve(args.id, status, source="cli")
    print(f"{item.id} is {item.status}; running proxies see it within work_items.refresh_seconds")
    return 0


def cmd_items_complete(args: argparse.Namespace) -> int:
    return _resolve(args, "done")


def cmd_items_close(args: argparse.Namespace) -> int:
    return _resolve(args, "closed")


def cmd_items_sync(args: argparse.Namespace) -> int:
    from taskproxy.registry import apply_delivery
    from taskproxy.timeutil import utcnow
    from taskproxy.trackers.sync import sync_items

    settings, now = _settings(args), utcnow()
    engine, ids = _engine(args), _ids(args)
    deliveries, notes = sync_items(engine, ids, settings.trackers, since=args.since, now=now, only=args.tracker)  # asks everything first
    applied = (apply_delivery(engine, ids, d, now, rework_days=settings.reports.rework_days) for d in deliveries)
    changed = [dict(item, tracker=d.tracker) for d, result in zip(deliveries, applied, strict=True) for item in result["items"]]
    if args.json:
        print_json({"changed": changed, "notes": notes})
        return 0
    for item in changed:
        linked = f", linked {', '.join(item['linked'])}" if item["linked"] else ""
        print(f"{item['id']}: now {item['status']} ({item['tracker']}){linked}")
    for note in notes:
        print(f"skipped {note}")
    print(f"{len(changed)} work item(s) changed" if changed else "nothing to change: every pending item is as its tracker says")
    return 0


# -- report ---------------------------------------------------------------------------------------


def cmd_report_tasks(args: argparse.Namespace) -> int:
    from taskproxy.render import tasks_table
    from taskproxy.reports.usage import tasks_view

    view = tasks_view(_engine(args), args.since, None, args.limit)
    if args.json:
        print_json(view)
        return 0
    print(tasks_table(view["tasks"]))
    if rejected := view["rejected_requests"]:
        print("\nrefused requests: " + ", ".join(f"{reason} × {count}" for reason, count in sorted(rejected.items())))
    return 0


def _latest_report(args: argparse.Namespace, settings: Any, name: str, period_or_team: dict[str, object]) -> dict[str, Any]:
    """The report `name` as its latest snapshot holds it (`--latest`), as `?snapshot=latest` serves it."""
    from taskproxy.reports.snapshots import check_asked_alone, check_on, kept_name, latest, report_of

    check_asked_alone(period_or_team)
    check_on(settings)
    snapshot = latest(_engine(args), kept_name(settings, name))
    print(f"(the snapshot computed at {snapshot.computed_at:%Y-%m-%d %H:%M} UTC, in {snapshot.seconds:.0f} s)", file=sys.stderr)
    return report_of(snapshot)


def cmd_report_adoption(args: argparse.Namespace) -> int:
    from taskproxy.memory import collector_paused
    from taskproxy.reports.adoption import adoption_report
    from taskproxy.reports.snapshots import for_team
    from taskproxy.reports.named import adoption_options
    from taskproxy.reports.adoption_export import adoption_csv, adoption_text
    from taskproxy.timeutil import report_period

    settings = _settings(args)
    if args.latest:
        report = _latest_report(args, settings, "adoption", {"--since": args.since, "--until": args.until})
        if args.team:
            report = for_team(report, args.team)
    else:
        since, until = report_period(args.since, args.until)
        with collector_paused():  # as in a report's process (reports/runner.py)
            report = adoption_report(_engine(args, report=True), since=since, until=until, team=args.team, **adoption_options(settings))
    if args.json:
        print_json(report)
    elif args.csv:
        sys.stdout.write(adoption_csv(report))
    else:
        print(adoption_text(report))
    return 0


def cmd_report_signals(args: argparse.Namespace) -> int:
    from taskproxy.memory import collector_paused
    from taskproxy.reports.signals import gaming_signals, signals_text
    from taskproxy.timeutil import report_period

    settings = _settings(args)
    if args.latest:
        report = _latest_report(args, settings, "signals", {"--since": args.since, "--until": args.until})
    else:
        since, until = report_period(args.since, args.until)
        with collector_paused():  # as in a report's process (reports/runner.py)
            report = gaming_signals(_engine(args, report=True), since=since, until=until, thresholds=settings.signals)
    if args.json:
        print_json(report)
    else:
        print(signals_text(report))
    return 0


# -- the parser -----------------------------------------------------------------------------------


def _time_argument(value: str) -> Any:
    from taskproxy.timeutil import EARLIEST, LATEST, parse_time

    try:
        return parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time (2026-11-01, 2026-11-01T09:00:00Z) or a period (30m, 12h, 7d, 2w) "
                                         f"from {EARLIEST.year} to {LATEST.year - 1}") from None  # fmt: skip


def _count(maximum: int) -> Callable[[str], int]:
    """An argument from 1 to `maximum`, as the API's `limit` parameters take."""

    def parse(value: str) -> int:
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= maximum:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to {maximum:,}")
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
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers, 1)")
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
            sub.add_argument("--clear", action="store_true", help="remove the binding")
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
    args = build_parser().parse_args(argv)
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
