"""What each dashboard page shows, gathered from the reports (blocking: the views run these in a
worker thread, and the overview in a report process, reports/runner.py). The figures come from the
same functions as the API's, with the same settings, so a page and `GET /api/...` agree."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from taskproxy import privacy
from taskproxy.reports.adoption import adoption_report, completions_by_period
from taskproxy.reports.named import adoption_options
from taskproxy.reports.items import work_item_view
from taskproxy.reports.usage import rejections_by_reason, tasks_report, usage_for_key
from taskproxy.records import event_json
from taskproxy.reports.signals import gaming_signals
from taskproxy.reports.snapshots import latest, report_of
from taskproxy.settings import Settings, SignalSettings
from taskproxy.storage import repo
from taskproxy.storage.models import WorkItem

WEEKS = 12  # weeks in the cost-per-completed-item chart
TOP_ITEMS = 10  # rows of "most expensive work items"
RECENT_EVENTS = 20  # rows of "your recent requests"
SIGNALS_PER_KIND = 50  # signals of one kind the page shows; the API and the CLI list them all
MAX_CHART_DAYS = 90  # days in a work item's usage chart (its table lists them all)


def week_windows(until: datetime, weeks: int = WEEKS) -> list[tuple[datetime, datetime]]:
    """The last `weeks` calendar weeks (Monday 00:00 UTC) up to `until`, oldest first; the last is cut at `until`."""
    start = datetime.combine(until.date() - timedelta(days=until.weekday()), datetime.min.time())
    if start >= until:  # `until` is a Monday midnight: that week has not begun
        start -= timedelta(days=7)
    windows = []
    end = until
    for _ in range(weeks):
        windows.append((start, end))
        end, start = start, start - timedelta(days=7)
    return windows[::-1]


def weekly_figures(engine: Engine, until: datetime, weeks: int = WEEKS) -> list[dict[str, Any]]:
    """Per week: the adoption report's overall completed items and cost per completed item."""
    windows = week_windows(until, weeks)
    return [{"since": since, "until": end, **figures} for (since, end), figures in zip(windows, completions_by_period(engine, windows), strict=True)]


def titles(engine: Engine, ids: list[str]) -> dict[str, str | None]:
    if not ids:
        return {}
    w = WorkItem.__table__.c
    with engine.connect() as connection:
        return dict(connection.execute(select(w.id, w.title).where(w.id.in_(ids))).all())  # type: ignore[arg-type]


@dataclass
class Overview:
    report: dict[str, Any]
    weeks: list[dict[str, Any]]
    top_items: list[dict[str, Any]]


def overview(engine: Engine, settings: Settings, since: datetime, until: datetime, answer: dict[str, Any] | None = None) -> Overview:
    """What the overview shows: `answer`, the adoption report of this period if it is computed already
    (its snapshot's, reports/snapshots.py), else computed here. Computed in a report process: only
    the figures of the teams' rows the page shows go back to the serving process (5,000 teams' whole
    figures, unpickled there, left it 30 MiB larger on the seed organisation)."""
    report = answer if answer is not None else adoption_report(engine, since=since, until=until, **adoption_options(settings))
    report = {**report, "teams": [_team_row(team) for team in report["teams"]]}
    weeks = weekly_figures(engine, until)
    top = tasks_report(engine, since, until, TOP_ITEMS)
    names = titles(engine, [t["work_item"] for t in top])
    return Overview(report, weeks, [{**t, "title": names.get(t["work_item"])} for t in top])


@dataclass
class Kept:
    """A page's figures as their latest snapshot holds them, and the period and time of that snapshot."""

    view: Any
    since: datetime
    until: datetime
    computed_at: datetime
    seconds: float


def kept_overview(engine: Engine, name: str) -> Kept:
    """The overview's latest snapshot kept under `name` (NotFound before the first), decoded, its
    weeks' times made datetimes again (JSON kept them as text). Blocking; 0.14 MB gzipped on the seed
    organisation, read in a worker thread."""
    snapshot = latest(engine, name)
    kept = report_of(snapshot)
    weeks = [{**week, "since": datetime.fromisoformat(week["since"]), "until": datetime.fromisoformat(week["until"])} for week in kept["weeks"]]
    return Kept(Overview(kept["report"], weeks, kept["top_items"]), snapshot.since, snapshot.until, snapshot.computed_at, snapshot.seconds)


def kept_signals_page(engine: Engine, *, name: str, per_kind: int = SIGNALS_PER_KIND) -> Kept:
    """In a report process (the whole report is decoded: 46 MB on the seed organisation): the signals
    page from the signals' latest snapshot kept under `name` (NotFound before the first)."""
    snapshot = latest(engine, name)
    return Kept(shown_signals(report_of(snapshot), per_kind), snapshot.since, snapshot.until, snapshot.computed_at, snapshot.seconds)


def _team_row(team: dict[str, Any]) -> dict[str, Any]:
    """A team's figures as the overview's table shows them (templates/overview.html)."""
    if team.get("withheld"):
        return team
    cost, rework = team["cost_per_completed_item"], team["rework"]
    return {
        "team": team["team"],
        "completed_items": team["completed_items"],
        "ai_assisted_items": team["ai_assisted_items"],
        "ai_assisted_share": team["ai_assisted_share"],
        "cost_per_completed_item": {"median": cost["median"], "p90": cost["p90"]},
        "spend_without_outcome_usd": team["spend_without_outcome_usd"],
        "spend_after_completion_usd": team["spend_after_completion_usd"],
        "rework": {"ai_assisted": {"rate": rework["ai_assisted"]["rate"]}, "other": {"rate": rework["other"]["rate"]}},
        "cycle_time_hours": team["cycle_time_hours"],
    }


def signals_page(
    engine: Engine, since: datetime, until: datetime, thresholds: SignalSettings, item_teams: Mapping[str, str] | None = None,
    per_kind: int = SIGNALS_PER_KIND,
) -> dict[str, Any]:
    """The signals report as the page shows it (`shown_signals`). A large organisation's period has
    tens of thousands of signals (57,524 over 30 days of the seed organisation), more than a page can
    hold; computed in the report process, so only what is shown comes back."""
    return shown_signals(gaming_signals(engine, since=since, until=until, thresholds=thresholds, item_teams=item_teams), per_kind)


def shown_signals(report: dict[str, Any], per_kind: int = SIGNALS_PER_KIND) -> dict[str, Any]:
    """Every kind's count, and at most `per_kind` signals of each (in the report's order)."""
    counts = Counter(s["kind"] for s in report["signals"])
    shown: Counter[str] = Counter()
    kept = []
    for signal in report["signals"]:
        if shown[signal["kind"]] < per_kind:
            shown[signal["kind"]] += 1
            kept.append(signal)
    return {**report, "signals": kept, "counts": dict(counts), "per_kind": per_kind}


def usage_days(usage_by_day: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`usage_by_day` with the days between its first and last filled in with zeros (for the chart),
    the last `MAX_CHART_DAYS` of them."""
    if not usage_by_day:
        return []
    known = {row["day"]: row for row in usage_by_day}
    first, last = date.fromisoformat(usage_by_day[0]["day"]), date.fromisoformat(usage_by_day[-1]["day"])
    first = max(first, last - timedelta(days=MAX_CHART_DAYS - 1))
    days = []
    current = first
    while current <= last:
        key = current.isoformat()
        days.append(known.get(key, {"day": key, "requests": 0, "total_tokens": 0, "cost_usd": None}))
        current += timedelta(days=1)
    return days


def work_item(engine: Engine, item_id: str) -> dict[str, Any] | None:
    return work_item_view(engine, item_id)


def my_data(engine: Engine, key_id: str, team: str | None) -> dict[str, Any]:
    """What "My data" shows a key's owner: its events, its usage per item, its refusals, who administers."""
    events = [event_json(e) for e in repo.list_events(engine, key_id=key_id, limit=RECENT_EVENTS)]
    # The one team's people and the admins alone: every key and every team's size were read for each
    # view (~95 ms of 135 at 20,000 keys), and 40 developers reloading their page at once made the
    # database too busy for /readyz.
    with engine.connect() as connection:
        team_people = privacy.team_size(connection, team) if team else None
    per_item, items_used = usage_for_key(engine, key_id)
    return {
        "events": events,
        "per_item": per_item,
        "items_used": items_used,
        "rejected": rejections_by_reason(engine, key_id=key_id),
        "team_people": team_people,
        "admins": repo.admin_owners(engine),
    }
