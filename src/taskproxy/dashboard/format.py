"""How numbers, money, shares, durations and times read on the dashboard. Pure functions, also
used by the tests to check that a page shows exactly what the API answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from taskproxy.money import format_usd
from taskproxy.timeutil import iso, parse_iso

NONE = "—"  # shown for a figure that has no value (nothing completed, no known price)


def number(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def money(value: float | None, *, none: str = NONE) -> str:
    """US dollars, as everywhere a person reads them (money.format_usd); `none` for an unknown price."""
    return format_usd(value, unknown=none)


def share(value: float | None) -> str:
    if value is None:
        return NONE
    percent = value * 100
    return f"{percent:.0f}%" if abs(percent - round(percent)) < 0.05 else f"{percent:.1f}%"


def hours(value: float | None) -> str:
    """A duration given in hours: minutes under an hour, hours under two days, then days."""
    if value is None:
        return NONE
    if value < 1:
        return f"{max(value * 60, 0):.0f} min"
    if value < 48:
        return f"{value:.1f} h"
    return f"{value / 24:.1f} days"


def _as_datetime(value: datetime | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return parse_iso(value)  # a report's field, written by `iso`


def when(value: datetime | str | None) -> str:
    """`22 Nov 2026, 05:21 UTC` from a naive UTC datetime or an ISO 8601 string."""
    moment = _as_datetime(value)
    if moment is None:
        return NONE
    return f"{moment.day} {moment:%b %Y, %H:%M} UTC"


def day(value: datetime | str | None) -> str:
    """`22 Nov 2026`."""
    moment = _as_datetime(value)
    if moment is None:
        return NONE
    return f"{moment.day} {moment:%b %Y}"


def iso_attr(value: datetime | str | None) -> str:
    """The machine-readable form for `<time datetime=...>`."""
    if isinstance(value, str) and len(value) == 10:  # a day: 2026-11-22
        return value
    return iso(_as_datetime(value)) or ""


def label(value: str | None) -> str:
    """`spend_without_outcome` → `spend without outcome`; `stale_open` → `stale open`."""
    if value is None:
        return NONE
    text = str(value)
    if text.endswith("_usd"):
        text = text[:-4] + " (USD)"
    return text.replace("_", " ")


FILTERS = {"number": number, "money": money, "share": share, "hours": hours, "when": when, "day": day, "iso_attr": iso_attr, "label": label}
