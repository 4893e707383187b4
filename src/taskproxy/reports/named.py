"""Report functions named rather than imported, and the options they are computed with.

A report is computed in a process of its own (reports/runner.py), which imports the report's module
(the fork server has it preloaded). The serving process only passes the function along, and the
API's and the dashboard's report modules would cost it 3.5 MiB of resident memory for nothing
(measured: docs/scale-runs.md). A `NamedReport` is passed instead: it pickles as two strings, and it
imports its module when it is called (in the report's process, or, where reports run in a worker
thread, at the first report).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from taskproxy.settings import Settings


@dataclass(frozen=True, slots=True)
class NamedReport:
    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(self.module), self.name)(*args, **kwargs)


ADOPTION = NamedReport("taskproxy.reports.adoption", "adoption_report")
SIGNALS = NamedReport("taskproxy.reports.signals", "gaming_signals")
# The admin API's usage by group and per task read every event of their period: in the serving
# process, ten at once took it to 3.7 GiB, and its other clients to p99 1.5-2.7 s (2026-12-06).
USAGE = NamedReport("taskproxy.reports.usage", "usage_grouped")
TASKS = NamedReport("taskproxy.reports.usage", "tasks_view")
OVERVIEW = NamedReport("taskproxy.dashboard.data", "overview")  # the dashboard's, made from the adoption report


def adoption_options(settings: Settings) -> dict[str, Any]:
    """The adoption report's options from the settings: what the route, the CLI and the dashboard pass."""
    reports = settings.reports
    return {"min_group_size": settings.privacy.min_group_size, "stale_after_days": reports.stale_after_days, "size_bands": reports.size_bands,
            "item_teams": settings.work_items.teams}  # fmt: skip


def signal_options(settings: Settings) -> dict[str, Any]:
    """The signals' options from the settings: what the route, the CLI, the dashboard and the snapshots pass."""
    return {"thresholds": settings.signals, "item_teams": settings.work_items.teams}


def overview_snapshot_name(settings: Settings) -> str:
    """The name the dashboard overview's snapshot is kept under (reports/snapshots.py), with `settings`."""
    from taskproxy.reports.snapshots import snapshot_name

    return snapshot_name("overview", adoption_options(settings))
