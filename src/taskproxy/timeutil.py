"""Time helpers: naive UTC datetimes inside, ISO 8601 with `Z` outside, `7d`-style periods."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_PERIOD = re.compile(r"^([0-9]+)([mhdw])$")  # ASCII digits: `\d` took `٣d` and `３d` as 3 days
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds") + "Z"


def parse_iso(value: str) -> datetime:
    """An ISO 8601 date or time with any offset (`Z`, `+02:00`, Jira's `+0000`), as naive UTC; ValueError otherwise."""
    parsed = datetime.fromisoformat(value.strip())
    try:
        return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo is not None else parsed
    except OverflowError:  # 0001-01-01T00:00:00+01:00: in UTC, before year 1
        raise ValueError(f"{value!r} is outside the calendar in UTC") from None


# The times a query may name. Reports round their periods out to whole hours and days and count back
# 30 days from `until`: a time at the calendar's very ends would overflow there (a 500), not be refused.
EARLIEST = datetime(1970, 1, 1)
LATEST = datetime(9999, 1, 1)  # excluded


def nameable(moment: datetime) -> bool:
    """From `EARLIEST` to before `LATEST`: a time taskproxy takes from a query or a tracker."""
    return EARLIEST <= moment < LATEST


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """`2026-11-01`, `2026-11-01T10:00:00Z`, `...+02:00`, or a period back from now: `30m`, `12h`, `7d`,
    `2w`; from `EARLIEST` to before `LATEST`. ValueError otherwise."""
    value = value.strip()
    try:
        if match := _PERIOD.match(value):
            parsed = (now or utcnow()) - timedelta(**{_UNITS[match[2]]: int(match[1])})
        else:
            parsed = parse_iso(value)
    except OverflowError:  # a period reaching before year 1, or larger than a timedelta holds
        raise ValueError(f"{value!r} reaches outside the calendar") from None
    if not nameable(parsed):
        raise ValueError(f"{value!r} is not from {EARLIEST.year} to {LATEST.year - 1}")
    return parsed


def rounded_hours(value: float | None) -> float | None:
    """A duration in hours as the reports give it (to 6 decimals: a few milliseconds)."""
    return None if value is None else round(value, 6)


DEFAULT_REPORT_DAYS = 30


def report_period(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """A report's period: `until` defaults to now, `since` to 30 days before `until`; since < until."""
    from taskproxy.errors import InvalidRequest

    until = until or utcnow()
    if since is None and until <= EARLIEST:
        raise InvalidRequest(f"'until' must be after {EARLIEST.year}-01-01.", param="until")
    since = since or max(until - timedelta(days=DEFAULT_REPORT_DAYS), EARLIEST)  # a period inside the times a query may name
    if since >= until:
        raise InvalidRequest("'since' must be before 'until'.", param="since")
    return since, until
