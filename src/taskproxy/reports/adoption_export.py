"""The adoption report as CSV (`GET /api/reports/adoption.csv`, `--csv`) and as text for the CLI."""

from __future__ import annotations

import csv
import io
from typing import Any

CSV_COLUMNS = (
    "scope",  # overall | team | overall_size_band | team_size_band
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
    # Added with size and rework: after the earlier columns, so that a sheet reading by position still works.
    "size_band",  # size band rows: the band's label (their other figures: ai_assisted_items and the cost columns)
    "cost_per_item_median_excluding_reworked",
    "cost_per_100_changed_lines",
    "rework_rate_ai_assisted",
    "rework_rate_other",
    "reworked_items",
    "spend_without_outcome_reworked_usd",
    "spend_usd",  # all the period's spend on the scope's items
)


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


def _row(cells: dict[str, Any]) -> list[Any]:
    """A CSV row from named cells; columns not named are empty."""
    return [_cell(cells[column]) if column in cells else "" for column in CSV_COLUMNS]


def _csv_row(scope: str, team: str | None, figures: dict[str, Any]) -> list[Any]:
    if figures.get("withheld"):
        return _row({"scope": scope, "team": _text(team), "withheld": True})
    cost, tokens, cycle = figures["cost_per_completed_item"], figures["tokens_per_completed_item"], figures["cycle_time_hours"]
    rework = figures["rework"]
    return _row({
        "scope": scope,
        "team": _text(team),
        "completed_items": figures["completed_items"],
        "ai_assisted_items": figures["ai_assisted_items"],
        "ai_assisted_share": figures["ai_assisted_share"],
        "cost_per_item_median": cost["median"],
        "cost_per_item_p90": cost["p90"],
        "cost_total": cost["total"],
        "tokens_per_item_median": tokens["median"],
        "tokens_per_item_p90": tokens["p90"],
        "tokens_total": tokens["total"],
        "spend_without_outcome_usd": figures["spend_without_outcome_usd"],
        "spend_after_completion_usd": figures["spend_after_completion_usd"],
        "cycle_time_ai_assisted_hours": cycle["ai_assisted"],
        "cycle_time_other_hours": cycle["other"],
        "rejected_requests_total": sum(figures["rejected_requests"].values()),
        "withheld": False,
        "cost_per_item_median_excluding_reworked": cost["excluding_reworked"]["median"],
        "cost_per_100_changed_lines": figures["cost_per_100_changed_lines"]["usd"],
        "rework_rate_ai_assisted": rework["ai_assisted"]["rate"],
        "rework_rate_other": rework["other"]["rate"],
        "reworked_items": rework["ai_assisted"]["reworked"] + rework["other"]["reworked"],
        "spend_without_outcome_reworked_usd": figures["spend_without_outcome_breakdown"]["reworked"],
        "spend_usd": figures.get("spend_usd"),  # absent from a snapshot stored before it was added
    })  # fmt: skip


def _band_rows(scope: str, team: str | None, figures: dict[str, Any]) -> list[list[Any]]:
    if figures.get("withheld"):
        return []
    filled = {"ai_assisted_items": "items", "cost_per_item_median": "median", "cost_per_item_p90": "p90", "cost_total": "total"}
    return [
        _row({"scope": f"{scope}_size_band", "team": _text(team), "size_band": band["label"], "withheld": False,
              **{column: band[name] for column, name in filled.items()}})
        for band in figures["cost_by_size"]
    ]  # fmt: skip


def adoption_csv(report: dict[str, Any]) -> str:
    """The report as CSV: a header, one row for `overall`, one per team, then the size bands of each
    (`overall_size_band`, `team_size_band` rows; withheld teams have none)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerow(_csv_row("overall", report.get("team"), report["overall"]))
    for entry in report["teams"]:
        writer.writerow(_csv_row("team", entry["team"], entry))
    writer.writerows(_band_rows("overall", report.get("team"), report["overall"]))
    for entry in report["teams"]:
        writer.writerows(_band_rows("team", entry["team"], entry))
    return out.getvalue()


def adoption_text(report: dict[str, Any]) -> str:
    """The report as a plain-text table, one line for `overall` and one per team."""
    from taskproxy.money import format_usd as money
    from taskproxy.render import table

    def price(value: float | None) -> str:
        return "-" if value is None else money(value)

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    def row(scope: str, figures: dict[str, Any]) -> dict[str, Any]:
        if figures.get("withheld"):
            return {"scope": scope, "completed": figures["reason"]}
        cost, cycle = figures["cost_per_completed_item"], figures["cycle_time_hours"]
        share = figures["ai_assisted_share"]
        return {
            "scope": scope,
            "completed": figures["completed_items"],
            "assisted": figures["ai_assisted_items"],
            "share": None if share is None else percent(share),
            "median": price(cost["median"]),
            "p90": price(cost["p90"]),
            "total": money(cost["total"]),
            "spend": price(figures.get("spend_usd")),  # absent from a snapshot stored before it was added
            "without": money(figures["spend_without_outcome_usd"]),
            "after": money(figures["spend_after_completion_usd"]),
            "cycle": " / ".join("-" if h is None else f"{h:.1f}h" for h in (cycle["ai_assisted"], cycle["other"])),
            "rework": " / ".join(percent(r["rate"]) for r in (figures["rework"]["ai_assisted"], figures["rework"]["other"])),
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
        ("spend", "spend"),
        ("without", "no outcome"),
        ("after", "after done"),
        ("rework", "rework AI / other"),
        ("cycle", "cycle AI / other"),
        ("rejected", "rejected"),
    ]
    header = f"adoption {report['since']} .. {report['until']} (teams under {report['min_group_size']} people withheld)"
    text = header + "\n\n" + table(rows, columns)
    figures = report["overall"]
    if figures.get("withheld"):
        return text
    bands = [{"band": b["label"], "items": b["items"], "median": price(b["median"]), "p90": price(b["p90"]), "total": money(b["total"])}
             for b in figures["cost_by_size"]]  # fmt: skip
    band_columns = [("band", "size"), ("items", "AI-assisted items"), ("median", "cost/item median"), ("p90", "p90"), ("total", "cost total")]
    rework, per_lines = figures["rework"], figures["cost_per_100_changed_lines"]
    held = figures["cost_per_completed_item"]["excluding_reworked"]
    notes = [
        f"rework: {rework['ai_assisted']['reworked']} of {rework['ai_assisted']['items']} AI-assisted and {rework['other']['reworked']} of "
        f"{rework['other']['items']} other items completed in the period (reopened ones included) did not hold: "
        f"{rework['by_reason']['reverted']} reverted, {rework['by_reason']['reopened']} reopened",
        f"spend on reworked items in the period, counted as no outcome: {money(figures['spend_without_outcome_breakdown']['reworked'])}",
        f"cost/item median without the reworked items: {price(held['median'])} over {held['items']} items",
        f"cost per 100 changed lines: {price(per_lines['usd'])} over {per_lines['items']} items with a line count ({per_lines['lines']} lines)",
    ]
    return text + "\n\n" + "\n".join(notes) + "\n\n" + table(bands, band_columns)
