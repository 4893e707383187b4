"""The adoption report as CSV (`GET /api/reports/adoption.csv`, `--csv`) and as text for the CLI."""

from __future__ import annotations

import csv
import io
from typing import Any

CSV_COLUMNS = (
    "scope",
    "team",
    "completed_items",
    "ai_assisted_items",
    "ai_assisted_share",
    "cost_per_item_median",
    "cost_per_item_p90",
    "cost_total",
    "tokens_per_item_median",
    "tokens_per_item_p90",
    "tokens_total",
    "spend_without_outcome_usd",
    "spend_after_completion_usd",
    "cycle_time_ai_assisted_hours",
    "cycle_time_other_hours",
    "rejected_requests_total",
    "withheld",
)


# -- arithmetic -----------------------------------------------------------------------------------



def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _text(value: str | None) -> str:
    """A name as a CSV cell that a spreadsheet will not run as a formula."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value or ""


def _csv_row(scope: str, team: str | None, figures: dict[str, Any]) -> list[Any]:
    if figures.get("withheld"):
        return [scope, _text(team), *([""] * (len(CSV_COLUMNS) - 3)), "true"]
    cost, tokens, cycle = figures["cost_per_completed_item"], figures["tokens_per_completed_item"], figures["cycle_time_hours"]
    values = [
        figures["completed_items"],
        figures["ai_assisted_items"],
        figures["ai_assisted_share"],
        cost["median"],
        cost["p90"],
        cost["total"],
        tokens["median"],
        tokens["p90"],
        tokens["total"],
        figures["spend_without_outcome_usd"],
        figures["spend_after_completion_usd"],
        cycle["ai_assisted"],
        cycle["other"],
        sum(figures["rejected_requests"].values()),
        False,
    ]
    return [scope, _text(team), *(_cell(v) for v in values)]


def adoption_csv(report: dict[str, Any]) -> str:
    """The report as CSV: a header, one row for `overall`, one per team."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerow(_csv_row("overall", report.get("team"), report["overall"]))
    for entry in report["teams"]:
        writer.writerow(_csv_row("team", entry["team"], entry))
    return out.getvalue()


# -- one work item --------------------------------------------------------------------------------


def adoption_text(report: dict[str, Any]) -> str:
    """The report as a plain-text table, one line for `overall` and one per team."""
    from taskproxy.money import format_usd as money
    from taskproxy.render import table

    def row(scope: str, figures: dict[str, Any]) -> dict[str, Any]:
        if figures.get("withheld"):
            return {"scope": scope, "completed": figures["reason"]}
        cost, cycle = figures["cost_per_completed_item"], figures["cycle_time_hours"]
        share = figures["ai_assisted_share"]
        return {
            "scope": scope,
            "completed": figures["completed_items"],
            "assisted": figures["ai_assisted_items"],
            "share": None if share is None else f"{share:.0%}",
            "median": None if cost["median"] is None else money(cost["median"]),
            "p90": None if cost["p90"] is None else money(cost["p90"]),
            "total": money(cost["total"]),
            "without": money(figures["spend_without_outcome_usd"]),
            "after": money(figures["spend_after_completion_usd"]),
            "cycle": " / ".join("-" if h is None else f"{h:.1f}h" for h in (cycle["ai_assisted"], cycle["other"])),
            "rejected": sum(figures["rejected_requests"].values()),
        }

    overall = "overall" if report.get("team") is None else f"team {report['team']}"
    rows = [row(overall, report["overall"])]
    if report.get("team") is None:
        rows += [row(entry["team"], entry) for entry in report["teams"]]
    columns = [
        ("scope", "scope"),
        ("completed", "completed"),
        ("assisted", "AI-assisted"),
        ("share", "share"),
        ("median", "cost/item median"),
        ("p90", "p90"),
        ("total", "cost total"),
        ("without", "no outcome"),
        ("after", "after done"),
        ("cycle", "cycle AI / other"),
        ("rejected", "rejected"),
    ]
    header = f"adoption {report['since']} .. {report['until']} (teams under {report['min_group_size']} people withheld)"
    return header + "\n\n" + table(rows, columns)
