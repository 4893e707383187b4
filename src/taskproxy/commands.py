"""The operator's verbs of `taskproxy` (serve, demo, db, keys, items, report): each a thin shell over
the functions the API uses, on the configured database directly. cli.py parses the command line and
calls them; the developer's verbs (use, me, run, env) are in developer.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from taskproxy.render import print_json
from taskproxy.config import DEFAULT_CONFIG_PATH, database_named, load_settings
from taskproxy.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    # Only the server reaches providers and takes webhooks: the admin commands run without their secrets.
    return load_settings(args.config, secrets_required=args.command == "serve")


def _engine(args: argparse.Namespace, *, report: bool = False):  # type: ignore[no-untyped-def]
    """The database's engine; `report`: one that computes a period report (`reports.work_mem_mb`,
    `reports.statement_timeout_seconds`)."""
    from taskproxy.storage.db import ReportSession, make_engine, prepare_schema

    settings = _settings(args)
    if not database_named(args.config):
        # Keys created here would be in a database no running proxy reads, and a proxy started so serves
        # one that no admin command finds from elsewhere: say which one it is.
        print(f"taskproxy: no config (--config, $TASKPROXY_CONFIG, {DEFAULT_CONFIG_PATH}) and no $TASKPROXY_DATABASE_URL: "
              f"using {settings.database_url} in {os.getcwd()}", file=sys.stderr)  # fmt: skip
    engine = make_engine(settings.database_url, report=ReportSession.of(settings.reports) if report else None, role="cli")
    prepare_schema(engine)
    return engine


# -- serve / demo / db ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from taskproxy.process import serve

    settings = _settings(args)
    workers = args.workers if args.workers is not None else settings.server.workers
    # The schema, checked (created on SQLite) once here rather than racing in every worker's lifespan;
    # and a database that does not answer stops the start with one line and exit 2, not a traceback.
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
    return WorkItemIds(settings.work_items.patterns, settings.work_items.branch_patterns, frozenset(settings.work_items.teams))


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
    changed: list[dict] = []

    def apply(delivery: Any) -> None:  # a batch at a time: a backlog past a tracker's quota converges over runs
        result = apply_delivery(engine, ids, delivery, now, rework_days=settings.reports.rework_days)
        changed.extend(dict(item, tracker=delivery.tracker) for item in result["items"] if item["id"] not in result["kept"])

    rest, notes = sync_items(engine, ids, settings.trackers, since=args.since, now=now, only=args.tracker, apply=apply)
    for delivery in rest:
        apply(delivery)
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
    from taskproxy.reports.named import signal_options
    from taskproxy.reports.signals import gaming_signals, signals_text
    from taskproxy.timeutil import report_period

    settings = _settings(args)
    if args.latest:
        report = _latest_report(args, settings, "signals", {"--since": args.since, "--until": args.until})
    else:
        since, until = report_period(args.since, args.until)
        with collector_paused():  # as in a report's process (reports/runner.py)
            report = gaming_signals(_engine(args, report=True), since=since, until=until, **signal_options(settings))
    if args.json:
        print_json(report)
    else:
        print(signals_text(report))
    return 0
