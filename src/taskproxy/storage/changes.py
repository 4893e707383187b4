"""The change feed: how every process learns what changed in keys and work items, by reading only the
changes, never the whole tables again.

A change is noted (`note`) in the transaction that makes it: a row of `changes` with a number from
the database (`seq`, increasing). Each process keeps a cursor and reads the rows after it with one
indexed query (`ChangeFeed.read`). On PostgreSQL numbers are handed out when a row is inserted, not
when its transaction commits, so a number can appear after a larger one: the feed reads from the
lowest number it has not seen yet, skips those it has, and gives up on a hole once it has been one for
`hole_seconds` (a transaction that rolled back leaves one for good). Each number is timed from when a
read first passed over it: under load holes follow one another, and a young one given up on with its
elders would be a change (a revocation) that process never reads. Rows older than `retention` are pruned; a
process that could not read the feed for longer than that has missed changes, and is told to forget
everything it holds (`Read.everything`). Processes read it on a timer, and on PostgreSQL also when a
change that refuses requests is committed (storage/listen.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import Connection, Engine

from taskproxy.storage.models import Change

KEY, ITEM = "key", "item"
CHANNEL = "taskproxy_changes"  # PostgreSQL's NOTIFY channel that wakes the readers (storage/listen.py)
_C = Change.__table__.c
_READ_LIMIT = 10_000  # rows per query; a longer backlog is read over the next refreshes


def note(connection: Connection, kind: str, refs: Iterable[str], at: datetime, *, wake: bool = True) -> None:
    """Note changes to `refs` (key ids or work-item ids) in the caller's transaction. On PostgreSQL,
    `wake` also notifies the processes listening (storage/listen.py) when it commits, so they read the
    feed at once rather than at their next refresh."""
    rows = [{"kind": kind, "ref": ref, "ts": at} for ref in sorted(set(refs))]
    if rows:
        connection.execute(Change.__table__.insert(), rows)
        if wake and connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


@dataclass
class Read:
    """What one read of the feed found: the changed refs by kind, or that everything must be forgotten."""

    refs: dict[str, set[str]] = field(default_factory=dict)
    everything: bool = False

    def of(self, kind: str) -> set[str]:
        return self.refs.get(kind, set())


class ChangeFeed:
    """A process's cursor on the change feed (blocking methods: run them in a worker thread)."""

    def __init__(self, engine: Engine, *, hole_seconds: float = 60.0, retention: timedelta = timedelta(days=1)) -> None:
        self._engine = engine
        self._hole_seconds = hole_seconds
        self._retention = retention
        self._low = 0  # every change numbered up to here has been read (or given up on)
        self._seen: set[int] = set()  # read, above `_low`
        # Runs of numbers a read passed over (first, last, when), oldest first: those not read since
        # (not in `_seen`) are holes. A run, not a number each: numbers can jump by millions (a sequence
        # moved on by hand), and a hole is timed from the read that first passed it.
        self._passed_over: deque[tuple[int, int, float]] = deque()
        self._passed = 0  # the highest number read so far
        self._last_read: float | None = None
        self._last_prune = 0.0

    def start(self) -> None:
        """Begin after the newest change: call it before the caches are filled, so nothing falls between."""
        with self._engine.connect() as connection:
            self._low = self._passed = int(connection.execute(select(func.coalesce(func.max(_C.seq), 0))).scalar_one())
        self._last_read = time.monotonic()

    def read(self, now: datetime) -> Read:
        monotonic = time.monotonic()
        found = Read()
        if self._last_read is not None and monotonic - self._last_read > self._retention.total_seconds() / 2:
            found.everything = True  # out of touch long enough for changes to have been pruned unread
        with self._engine.connect() as connection:
            rows = connection.execute(select(_C.seq, _C.kind, _C.ref).where(_C.seq > self._low).order_by(_C.seq).limit(_READ_LIMIT)).all()
        self._last_read = monotonic
        for seq, kind, ref in rows:
            if seq not in self._seen:
                self._seen.add(seq)
                found.refs.setdefault(kind, set()).add(ref)
        self._advance(monotonic)
        if monotonic - self._last_prune > 3600:
            self._last_prune = monotonic
            with self._engine.begin() as connection:
                connection.execute(delete(Change.__table__).where(_C.ts < now - self._retention))
        return found

    def _advance(self, monotonic: float) -> None:
        # Holes below what was read: transactions still open, or rolled back. Each is timed from the
        # read that first passed over it, not from the oldest hole: under load holes follow one another.
        top = max(self._seen, default=self._low)
        first = max(self._low, self._passed) + 1
        if first < top:
            self._passed_over.append((first, top - 1, monotonic))
        self._passed = max(self._passed, top)
        while True:
            following = self._low + 1
            if following in self._seen:
                self._seen.discard(following)
                self._low = following
                continue
            while self._passed_over and self._passed_over[0][1] < following:
                self._passed_over.popleft()
            if not self._passed_over or self._passed_over[0][0] > following or monotonic - self._passed_over[0][2] <= self._hole_seconds:
                return
            # Given up on: the unread numbers from here to the next one read, within this run.
            later = min((seq for seq in self._seen if seq > following), default=None)
            self._low = self._passed_over[0][1] if later is None else min(self._passed_over[0][1], later - 1)

    @property
    def position(self) -> int:
        return self._low
