"""Report snapshots: the latest computation of a period report, one row per report (`report_snapshots`).

Every replica may keep them (`reports.snapshot_minutes`), but one computes a given report at a time: a
replica first claims the row, atomically, for `hold` (an UPDATE that matches only a row nobody holds
and whose snapshot is due), computes, then stores the answer and lets the claim go. A replica that dies
while computing holds the row until its claim runs out; another then takes over.

Blocking functions; the caller runs them in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Engine

from taskproxy.storage.models import ReportSnapshot
from taskproxy.storage.repo import insert_ignoring_duplicates

_S = ReportSnapshot.__table__.c
READ_PIECE_BYTES = 1 << 20  # a snapshot is read a piece at a time: see `latest`


@dataclass(frozen=True)
class Snapshot:
    name: str
    since: datetime
    until: datetime
    computed_at: datetime
    seconds: float
    computed_by: str
    body: bytes


def claim(engine: Engine, name: str, now: datetime, every: timedelta, hold: timedelta) -> bool:
    """Claim the computation of `name` until `now + hold` if its snapshot is due (none yet, or computed
    `every` ago or more) and no other replica holds it. True: this caller computes it."""
    with engine.begin() as connection:
        connection.execute(insert_ignoring_duplicates(connection.dialect.name, ReportSnapshot.__table__), [{"name": name}])
        due = or_(_S.computed_at.is_(None), _S.computed_at <= now - every)
        free = or_(_S.claimed_until.is_(None), _S.claimed_until < now)
        claimed = connection.execute(update(ReportSnapshot.__table__).where(and_(_S.name == name, due, free)).values(claimed_until=now + hold))
        return claimed.rowcount == 1


def store(engine: Engine, name: str, *, since: datetime, until: datetime, computed_at: datetime, seconds: float, computed_by: str,
          body: bytes) -> None:  # fmt: skip
    """Keep a computation of `name` (replacing the previous one) and let the claim go."""
    values = {"since": since, "until": until, "computed_at": computed_at, "seconds": seconds, "computed_by": computed_by,
              "body": body, "claimed_until": None}  # fmt: skip
    with engine.begin() as connection:
        connection.execute(update(ReportSnapshot.__table__).where(_S.name == name).values(**values))


def release(engine: Engine, name: str) -> None:
    """Let the claim go without a new snapshot (the computation failed): another replica may try at once."""
    with engine.begin() as connection:
        connection.execute(update(ReportSnapshot.__table__).where(_S.name == name).values(claimed_until=None))


def latest(engine: Engine, name: str) -> Snapshot | None:
    """The latest snapshot of `name`; None before the first.

    The body is read in pieces of `READ_PIECE_BYTES`: libpq keeps its connection's input buffer as
    large as the largest message it received, so reading 7.9 MB at once left every pooled connection
    that did holding ~16 MB (the hex text) for good. A piece is read only from the version the first
    read found (its `computed_at`): one stored meanwhile starts the reading again."""
    head = select(_S.computed_at, _S.since, _S.until, _S.seconds, _S.computed_by, func.length(_S.body)).where(_S.name == name, _S.body.is_not(None))
    with engine.connect() as connection:
        while True:
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
