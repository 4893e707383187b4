"""Report snapshots: the latest computation of a period report, one row per report (`report_snapshots`).

Every serving process may keep them (`reports.snapshot_minutes`), but one computes a given report at a
time: it first claims the row, atomically, for `hold` (an UPDATE that matches only a row nobody holds
and whose snapshot is due, and names the claimant), computes, then stores the answer and lets the
claim go, both only while it holds the claim. A process that dies while computing holds the row until
its claim runs out; another then takes over. One that lives renews its claim while it computes, so a
computation longer than the claim is not started a second time beside it.

Blocking functions; the caller runs them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.engine import Engine

from taskproxy.storage.models import ReportSnapshot
from taskproxy.storage.repo import insert_ignoring_duplicates

_S = ReportSnapshot.__table__.c
READ_PIECE_BYTES = 1 << 20  # a snapshot is read a piece at a time: see `latest`
READ_ATTEMPTS = 5


@dataclass(frozen=True)
class Snapshot:
    name: str
    since: datetime
    until: datetime
    computed_at: datetime
    seconds: float
    computed_by: str
    body: bytes


@dataclass(frozen=True)
class State:
    """A snapshot's row without its body."""

    computed_at: datetime | None = None  # None: none stored yet
    seconds: float | None = None
    claimed_until: datetime | None = None

    def is_due(self, now: datetime, every: timedelta) -> bool:
        """None stored yet, or one computed `every` ago or more; and no replica holds it."""
        return (self.computed_at is None or self.computed_at <= now - every) and (self.claimed_until is None or self.claimed_until < now)


def state(engine: Engine, name: str) -> State:
    query = select(_S.computed_at, _S.seconds, _S.claimed_until).where(_S.name == name)
    with engine.connect() as connection:
        row = connection.execute(query).first()
    return State() if row is None else State(row.computed_at, row.seconds, row.claimed_until)


def is_due(engine: Engine, name: str, now: datetime, every: timedelta) -> bool:
    """`name` has no snapshot, or one computed `every` ago or more, and no replica holds it (a read)."""
    return state(engine, name).is_due(now, every)


def claim(engine: Engine, name: str, me: str, now: datetime, every: timedelta, hold: timedelta) -> bool:
    """Claim the computation of `name` for `me` until `now + hold` if its snapshot is due (none yet, or
    computed `every` ago or more) and no other replica holds it. True: `me` computes it."""
    with engine.begin() as connection:
        connection.execute(insert_ignoring_duplicates(connection.dialect.name, ReportSnapshot.__table__), [{"name": name}])
        due = or_(_S.computed_at.is_(None), _S.computed_at <= now - every)
        free = or_(_S.claimed_until.is_(None), _S.claimed_until < now)
        claimed = connection.execute(update(ReportSnapshot.__table__).where(and_(_S.name == name, due, free))
                                     .values(claimed_until=now + hold, claimed_by=me))  # fmt: skip
        return claimed.rowcount == 1


def store(engine: Engine, name: str, me: str, *, since: datetime, until: datetime, computed_at: datetime, seconds: float,
          body: bytes) -> bool:  # fmt: skip
    """Keep `me`'s computation of `name` (replacing the previous one) and let the claim go. Only while
    `me` holds the claim, and only a later period than the one kept: a computation that outlived its
    claim, while another replica computed a newer one, changes nothing. True: kept."""
    values = {"since": since, "until": until, "computed_at": computed_at, "seconds": seconds, "computed_by": me,
              "body": body, "claimed_until": None, "claimed_by": None}  # fmt: skip
    mine = and_(_S.name == name, _S.claimed_by == me, or_(_S.until.is_(None), _S.until < until))
    with engine.begin() as connection:
        return connection.execute(update(ReportSnapshot.__table__).where(mine).values(**values)).rowcount == 1


def renew(engine: Engine, name: str, me: str, until: datetime) -> bool:
    """Extend `me`'s claim of `name` to `until` (a computation still running). False: `me` does not
    hold it (stored and let go, or taken over by another process after it ran out)."""
    with engine.begin() as connection:
        held = connection.execute(update(ReportSnapshot.__table__).where(_S.name == name, _S.claimed_by == me).values(claimed_until=until))
        return held.rowcount == 1


def back_off(engine: Engine, name: str, me: str, until: datetime) -> None:
    """After a computation of `me`'s failed: nobody tries again before `until` (a report that fails
    every time, say killed for its memory, is not started again every minute)."""
    with engine.begin() as connection:
        connection.execute(update(ReportSnapshot.__table__).where(_S.name == name, _S.claimed_by == me).values(claimed_until=until))


def release(engine: Engine, me: str) -> None:
    """Let go of every claim `me` holds (a replica stopping): another replica takes them at once."""
    with engine.begin() as connection:
        connection.execute(update(ReportSnapshot.__table__).where(_S.claimed_by == me).values(claimed_until=None, claimed_by=None))


def prune(engine: Engine, keep: Collection[str], now: datetime, unused_for: timedelta) -> int:
    """Delete the snapshots under other names than `keep` (an earlier version's, or computed with other
    options) that no process has stored for `unused_for` and none holds: a process that still
    computes one refreshes it sooner, and one that finds its own gone computes it again. Returns how
    many went."""
    unused = and_(_S.name.not_in(list(keep)), or_(_S.computed_at.is_(None), _S.computed_at < now - unused_for),
                  or_(_S.claimed_until.is_(None), _S.claimed_until < now))  # fmt: skip
    with engine.begin() as connection:
        return int(connection.execute(delete(ReportSnapshot.__table__).where(unused)).rowcount)


def latest(engine: Engine, name: str) -> Snapshot | None:
    """The latest snapshot of `name`; None before the first.

    The body is read in pieces of `READ_PIECE_BYTES`: libpq keeps its connection's input buffer as
    large as the largest message it received, so reading 7.9 MB at once left every pooled connection
    that did holding ~16 MB (the hex text) for good. A piece is read only from the version the first
    read found (its `computed_at`): one stored meanwhile starts the reading again, a few times, and
    then the body is read whole."""
    head = select(_S.computed_at, _S.since, _S.until, _S.seconds, _S.computed_by, func.length(_S.body)).where(_S.name == name, _S.body.is_not(None))
    with engine.connect() as connection:
        for _ in range(READ_ATTEMPTS):
            row = connection.execute(head).first()
            if row is None:
                return None
            pieces = []
            for start in range(0, int(row[5]), READ_PIECE_BYTES):
                piece = select(func.substr(_S.body, start + 1, READ_PIECE_BYTES)).where(_S.name == name, _S.computed_at == row.computed_at)
                found = connection.execute(piece).scalar()
                if found is None:
                    break  # replaced while being read
                pieces.append(bytes(found))
            else:
                return Snapshot(name, row.since, row.until, row.computed_at, float(row.seconds), row.computed_by, b"".join(pieces))
        columns = (_S.computed_at, _S.since, _S.until, _S.seconds, _S.computed_by, _S.body)
        whole = connection.execute(select(*columns).where(_S.name == name, _S.body.is_not(None))).first()
    if whole is None:
        return None
    return Snapshot(name, whole.since, whole.until, whole.computed_at, float(whole.seconds), whole.computed_by, bytes(whole.body))
