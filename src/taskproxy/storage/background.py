"""The background responses whose usage is still owed (`background_responses`).

A Responses create with `background: true` is answered before anything is generated: its event is
recorded `deferred`, with no tokens, and its usage is recorded later, when a read of it shows it
finished, under an id made from the response's (`deferred_event_id`): written once, however many
reads see it. The writer keeps this table in the transaction that inserts the events: a deferred
create adds its response, the event that settles it removes it. So the table holds only what is
owed, and the proxy's own reads of it (background.Collector) cost what is owed, not the history.

Blocking functions: the collector runs them in a thread of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection, Engine

from taskproxy.storage import bulk
from taskproxy.storage.models import BackgroundResponse

_B = BackgroundResponse.__table__.c
DEFERRED_USAGE = uuid.UUID("6f1e2c0a-4d7b-4f3e-9a51-2b8c7d0e9f13")  # namespace of the ids of deferred usage events


def deferred_event_id(response_id: str) -> str:
    """The id of the event that records a background response's usage."""
    return uuid.uuid5(DEFERRED_USAGE, response_id).hex


@dataclass(frozen=True)
class Owed:
    response_id: str
    created_at: datetime
    checks: int  # reads so far that found it unfinished


def note(connection: Connection, events: Iterable[Mapping]) -> None:
    """Keep the table in step with a batch of events (the writer's transaction): a deferred create
    is owed, an event that settles one is not. Both in one batch: nothing is owed. A replay of a
    create already settled makes it owed again, and the collector's next read settles it again
    (its event is written once: the events' key)."""
    owed: dict[str, datetime] = {}
    settled: set[str] = set()
    for event in events:
        response_id = event.get("response_id")
        if not response_id:
            continue
        if event["usage_source"] == "deferred":
            owed.setdefault(response_id, event["ts"])
        elif event["id"] == deferred_event_id(response_id):
            settled.add(response_id)
    if rows := [{"response_id": r, "created_at": ts, "next_check": ts, "checks": 0} for r, ts in sorted(owed.items()) if r not in settled]:
        bulk.insert_new(connection, BackgroundResponse.__table__, rows)
    if settled:
        connection.execute(delete(BackgroundResponse.__table__).where(_B.response_id.in_(sorted(settled))))


def claim(engine: Engine, now: datetime, first_after: timedelta, hold_until: datetime, limit: int) -> list[Owed]:
    """Up to `limit` responses due for a read (`next_check` reached, and created at least
    `first_after` ago), oldest due first, claimed until `hold_until`: another replica skips them
    (PostgreSQL: rows locked by another claim are skipped, not waited for). A claimer that dies leaves
    them due again at `hold_until`."""
    due = (select(_B.response_id).where(_B.next_check <= now, _B.created_at <= now - first_after).order_by(_B.next_check).limit(limit)
           .with_for_update(skip_locked=True))  # fmt: skip
    with engine.begin() as connection:
        claimed = connection.execute(update(BackgroundResponse.__table__).where(_B.response_id.in_(due.scalar_subquery()))
                                     .values(next_check=hold_until).returning(_B.response_id, _B.created_at, _B.checks))  # fmt: skip
        return sorted((Owed(r, created, checks or 0) for r, created, checks in claimed), key=lambda owed: owed.created_at)


def check_again(engine: Engine, response_id: str, at: datetime, checks: int) -> None:
    with engine.begin() as connection:
        connection.execute(update(BackgroundResponse.__table__).where(_B.response_id == response_id).values(next_check=at, checks=checks))


def forget(engine: Engine, response_ids: Iterable[str]) -> None:
    """Given up on: no longer read. (One settled is removed by the writer, with its event.)"""
    with engine.begin() as connection:
        connection.execute(delete(BackgroundResponse.__table__).where(_B.response_id.in_(sorted(set(response_ids)))))
