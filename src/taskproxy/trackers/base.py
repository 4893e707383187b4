"""What every tracker provides, and the pieces they share."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from starlette.datastructures import Headers

from taskproxy.timeutil import nameable, parse_iso
from taskproxy.errors import InvalidRequest, InvalidSignature
from taskproxy.workitems import WorkItemIds


@dataclass(frozen=True)
class ItemUpdate:
    """What a delivery says about one work item."""

    item_id: str  # as the tracker names it; normalized before use
    status: str | None  # open | in_progress | done | closed; None: fields only
    at: datetime | None = None  # when the change happened, if the tracker says
    created_at: datetime | None = None
    title: str | None = None
    url: str | None = None
    team: str | None = None
    # Tickets this item (a merged pull request) came out of, named in its branch or title.
    links: tuple[str, ...] = ()
    merged: bool = False  # a pull request merged: its status is final
    size: Size | None = None  # how big the work is, when the tracker says
    # When the item was last edited, if the tracker says: a size sent with a status already recorded
    # (points raised once the ticket was done) dates from then, not from the status's own time.
    edited_at: datetime | None = None
    reverts: str | None = None  # a merged revert: the pull request it undoes (rework)
    branch: str | None = None  # a pull request's source branch
    # A pull request merged into a branch other than its repository's default one: that branch. Its merge
    # is a step, not the outcome (status in_progress, not final): the work lands with that branch's own
    # pull request (stacks.py).
    merged_into: str | None = None


def merge_target(target: Any, default: Any, landing: tuple[str, ...] = ()) -> str | None:
    """The branch a pull request was merged into when it is not the repository's default one nor one of
    the `landing` branches (`trackers.landing_branches`, shell patterns); None when it is, or when the
    tracker did not say which is the default (the merge then counts, as it always did)."""
    if not (isinstance(target, str) and isinstance(default, str) and target and default and target != default):
        return None
    if any(fnmatch.fnmatchcase(target, pattern) for pattern in landing):
        return None
    return text(target)


@dataclass(frozen=True)
class Size:
    """A work item's size: a pull request's lines and files, or a ticket's story points (estimate)."""

    lines_added: int | None = None
    lines_deleted: int | None = None
    files_changed: int | None = None
    points: float | None = None


# The size columns are 32-bit integers: a count beyond is no real pull request's, and written it made
# the whole delivery fail (500, the merge lost, and every redelivery failing again).
MAX_COUNT = 2**31 - 1
MAX_POINTS = 1e6  # story points or an estimate: far above any real one


def count(value: Any) -> int | None:
    """A non-negative whole number from a tracker that a size column holds, or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT else None


def points(value: Any) -> float | None:
    """A finite, non-negative estimate up to MAX_POINTS, or None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_POINTS else None


@dataclass(frozen=True)
class Delivery:
    tracker: str
    delivery_id: str | None
    event: str
    updates: list[ItemUpdate] = field(default_factory=list)


class Tracker(Protocol):
    name: str

    def verify(self, headers: Headers, raw: bytes) -> None:
        """Raise InvalidSignature unless `raw` was signed with the configured secret."""

    def parse(self, headers: Headers, payload: dict[str, Any], now: datetime) -> Delivery:
        """Map a verified delivery to updates; unknown events give none. Raise InvalidRequest if malformed."""


def check_hmac_sha256(secret: str, raw: bytes, presented: str | None, *, prefix: str = "") -> None:
    """Constant-time check of a hex HMAC-SHA256 of the raw body, optionally written `sha256=<hex>`."""
    if not presented:
        raise InvalidSignature("The delivery is not signed. Configure the webhook with the secret taskproxy was given.")
    expected = prefix + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), presented.strip().encode("utf-8", "replace")):
        raise InvalidSignature("The delivery's signature does not match: it was not signed with the configured secret.")


def tracker_time(value: Any) -> datetime | None:
    """A tracker's timestamp (ISO 8601 with any offset, or epoch milliseconds) as naive UTC; None if it is
    neither, or not from 1970 to 9998 (`timeutil.EARLIEST`, `LATEST`: the reports' arithmetic on it must not overflow)."""
    found: datetime | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            found = datetime.fromtimestamp(value / 1000, UTC).replace(tzinfo=None)
        except (OverflowError, ValueError, OSError):
            return None
    elif isinstance(value, str) and value:
        if value.endswith(" UTC"):  # GitLab's hooks: "2013-12-03 17:23:34 UTC"
            value = value[:-4] + "+00:00"
        try:
            found = parse_iso(value)
        except ValueError:
            return None
    return found if found is not None and nameable(found) else None


_SEPARATORS = str.maketrans({c: "/" for c in " :[](){},;"})  # "[PAY-7] Fix refunds" → "/PAY-7//Fix/refunds"


def ticket_in(ids: WorkItemIds, value: Any) -> str | None:
    """A Jira/Linear key named in a pull request's branch or title (not the pull request itself)."""
    if not isinstance(value, str):
        return None
    try:
        return ids.from_branch(value.translate(_SEPARATORS)[:255])
    except Exception:  # a malformed key in a title is no link, not an error
        return None


def is_revert_title(title: Any) -> bool:
    """The title GitHub's and GitLab's revert buttons give: `Revert "<the reverted title>"`."""
    return isinstance(title, str) and title.startswith('Revert "')


def is_relanding_title(title: Any) -> bool:
    """A revert of a revert: the work landing again (`Revert "Revert "…""`, an even number of the
    revert button's prefixes), work completed. `Revert "Revert to v1"` undoes one change: a revert."""
    depth = 0
    while isinstance(title, str) and title.startswith('Revert "', len('Revert "') * depth):
        depth += 1
    return depth >= 2 and depth % 2 == 0


def need(payload: dict[str, Any], *path: str, kind: type | tuple[type, ...] = (dict, str, int)) -> Any:
    """payload[path[0]][path[1]]... of the given JSON type, or InvalidRequest naming what is missing."""
    value: Any = payload
    for depth, key in enumerate(path):
        if not isinstance(value, dict) or key not in value or value[key] is None:
            raise InvalidRequest(f"The delivery has no '{'.'.join(path[: depth + 1])}'.")
        value = value[key]
        expected = dict if depth < len(path) - 1 else kind
        if not isinstance(value, expected) or isinstance(value, bool):
            raise InvalidRequest(f"The delivery's '{'.'.join(path[: depth + 1])}' has the wrong type.")
    return value


_CONTROL = dict.fromkeys([*range(0x20), 0x7F], " ")  # the API refuses these in titles (bodies.PRINTABLE); PostgreSQL refuses NUL


def text(value: Any) -> str | None:
    """A tracker's title or URL: a non-empty string, its control characters made spaces; else None."""
    if not isinstance(value, str):
        return None
    return value.translate(_CONTROL).strip() or None
