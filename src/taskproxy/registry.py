"""The work-item registry's rules, shared by the API, the CLI and the tracker webhooks.

Every status change goes through `transition`, which keeps the history (`work_item_changes`),
`completed_at` (set on done or closed, cleared on reopening) and the item's fields consistent.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from taskproxy.errors import InvalidRequest, NotFound, WorkItemInvalid
from taskproxy.storage import repo
from taskproxy.storage.repo import insert_ignoring_duplicates
from taskproxy.storage.models import WebhookDelivery, WorkItem, WorkItemChange, WorkItemLink
from taskproxy.trackers.base import Delivery
from taskproxy.timeutil import utcnow
from taskproxy.validation import non_negative_number, one_of, printable
from taskproxy.workitems import WorkItemIds

ITEM_STATUSES = ("open", "in_progress", "done", "closed", "unverified")
SETTABLE_STATUSES = ("open", "in_progress", "done", "closed")
ITEM_SOURCES = ("jira", "github", "linear", "manual")
TRACKERS = ("jira", "github", "linear")
RESOLVED = ("done", "closed")
_ITEMS = WorkItem.__table__
log = logging.getLogger("taskproxy.registry")


def register_work_item(engine: Engine, ids: WorkItemIds, fields: dict[str, Any], *, source: str = "api") -> WorkItem:
    """Validate `fields` (the body of POST /api/work-items) and insert the item."""
    if "id" not in fields:
        raise InvalidRequest("'id' is required.", param="id")
    item_id = ids.normalize(fields["id"])
    status = one_of(fields.get("status", "open"), "status", SETTABLE_STATUSES)
    values = _checked_fields(fields)
    values["source"] = one_of(fields.get("source", "manual"), "source", ITEM_SOURCES)
    with engine.begin() as connection:
        if connection.execute(select(_ITEMS.c.id).where(_ITEMS.c.id == item_id)).first() is not None:
            raise InvalidRequest(f"The work item {item_id!r} exists already.", param="id")
        _apply(connection, item_id, status, source=source, at=utcnow(), fields=values)
    item = repo.get_work_item(engine, item_id)
    assert item is not None
    return item


def _checked_fields(fields: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, limit in (("title", 500), ("url", 2000), ("team", 200)):
        if name in fields:
            values[name] = printable(fields[name], name, max_length=limit)
    if "budget_tokens" in fields:
        tokens = non_negative_number(fields["budget_tokens"], "budget_tokens")
        values["budget_tokens"] = int(tokens) if tokens is not None else None
    if "budget_usd" in fields:
        values["budget_usd"] = non_negative_number(fields["budget_usd"], "budget_usd")
    return values


def update_work_item(engine: Engine, item_id: str, fields: dict[str, Any], *, source: str = "api") -> WorkItem:
    """PATCH: change any of title, url, team, budgets and status of an existing item."""
    unknown = set(fields) - {"title", "url", "team", "budget_tokens", "budget_usd", "status"}
    if unknown:
        raise InvalidRequest(f"These fields cannot be changed: {', '.join(sorted(unknown))}.", param=sorted(unknown)[0])
    values = _checked_fields(fields)
    status = one_of(fields["status"], "status", SETTABLE_STATUSES) if "status" in fields else None
    with engine.begin() as connection:
        current = connection.execute(select(_ITEMS).where(_ITEMS.c.id == item_id)).first()
        if current is None:
            raise NotFound(f"No work item {item_id!r} is registered.")
        _apply(connection, item_id, status or current.status, source=source, at=utcnow(), fields=values)
    item = repo.get_work_item(engine, item_id)
    assert item is not None
    return item


def transition(
    engine: Engine,
    item_id: str,
    status: str,
    *,
    source: str,
    at: datetime | None = None,
    delivery_id: str | None = None,
    fields: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> WorkItem:
    """Move an item to `status` (creating it if it is new), recording the change once."""
    with engine.begin() as connection:
        _apply(connection, item_id, status, source=source, at=at or utcnow(), fields=fields or {}, delivery_id=delivery_id, created_at=created_at)
    item = repo.get_work_item(engine, item_id)
    assert item is not None
    return item


def _apply(
    connection: Connection,
    item_id: str,
    status: str,
    *,
    source: str,
    at: datetime,
    fields: dict[str, Any],
    delivery_id: str | None = None,
    created_at: datetime | None = None,
) -> None:
    tracker_source = source if source in ITEM_SOURCES else "manual"
    row = {"source": tracker_source, **fields}  # fields may name the item's source (POST /api/work-items)
    values_new = {"id": item_id, "status": status, "created_at": created_at or at, "completed_at": at if status in RESOLVED else None,
                  "updated_at": at, **row}  # fmt: skip
    created = connection.execute(insert_ignoring_duplicates(connection.dialect.name, _ITEMS).values(**values_new).returning(_ITEMS.c.id)).first()
    if created is not None:  # new: concurrent creators (a webhook, the writer's registration) lose the insert, not the request
        _record_change(connection, item_id, None, status, source, at, delivery_id)
        return
    # Locked until commit on PostgreSQL: two deliveries for one item apply one after the other.
    current = connection.execute(select(_ITEMS).where(_ITEMS.c.id == item_id).with_for_update()).first()
    assert current is not None
    values: dict[str, Any] = {**{k: v for k, v in fields.items() if k != "source"}, "updated_at": at}
    if current.source == "auto":  # a tracker or an admin confirms an item first seen in a request
        values["source"] = tracker_source
    if created_at is not None and created_at < current.created_at:  # the tracker knows when the work began
        values["created_at"] = created_at
    stale = source in TRACKERS and current.updated_at is not None and at < current.updated_at
    if stale:  # trackers deliver out of order: an older change must not undo a newer one
        log.info("ignored an out-of-order %s status for %s (%s, older than %s)", source, item_id, at, current.updated_at)
        values["updated_at"] = current.updated_at
    if status != current.status and not stale:
        values["status"] = status
        values["completed_at"] = at if status in RESOLVED else None
        _record_change(connection, item_id, current.status, status, source, at, delivery_id)
    connection.execute(update(_ITEMS).where(_ITEMS.c.id == item_id).values(**values))


def _record_change(connection: Connection, item_id: str, before: str | None, after: str, source: str, at: datetime, delivery_id: str | None) -> None:
    connection.execute(
        WorkItemChange.__table__.insert().values(
            id=uuid.uuid4().hex, work_item=item_id, ts=at, from_status=before, to_status=after, source=source, delivery_id=delivery_id
        )
    )


def apply_delivery(engine: Engine, ids: WorkItemIds, delivery: Delivery, now: datetime) -> dict[str, Any]:
    """Apply a verified tracker delivery once: a delivery id seen before changes nothing."""
    applied: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        with engine.begin() as connection:
            if delivery.delivery_id:
                # Inserted first, in the same transaction: a concurrent redelivery fails here and changes nothing.
                connection.execute(
                    WebhookDelivery.__table__.insert().values(
                        tracker=delivery.tracker, delivery_id=delivery.delivery_id[:200], received_at=now, event=delivery.event[:64],
                        outcome="applied" if delivery.updates else "ignored",
                    )
                )  # fmt: skip
            for update in delivery.updates:
                try:
                    item_id = ids.normalize(update.item_id)
                except WorkItemInvalid:  # an id the configured patterns do not accept is not tracked
                    skipped.append(update.item_id[:200])
                    continue
                fields = {k: v for k, v in (("title", update.title), ("url", update.url), ("team", update.team)) if v is not None}
                current = connection.execute(select(_ITEMS.c.status).where(_ITEMS.c.id == item_id)).scalar()
                status = update.status or current or "open"
                _apply(connection, item_id, status, source=delivery.tracker, at=update.at or now, fields=fields,
                       delivery_id=delivery.delivery_id, created_at=update.created_at)  # fmt: skip
                for ticket in update.links:
                    _link(connection, ticket, item_id, "merged_pr", update.at or now)
                applied.append({"id": item_id, "status": status, "linked": list(update.links)})
    except IntegrityError:
        if delivery.delivery_id and _seen(engine, delivery):
            return {"status": "duplicate", "delivery": delivery.delivery_id}
        raise
    return {"status": "applied" if applied else "ignored", "event": delivery.event, "items": applied, "skipped": skipped}


def _seen(engine: Engine, delivery: Delivery) -> bool:
    table = WebhookDelivery.__table__
    with engine.connect() as connection:
        row = connection.execute(
            select(table.c.delivery_id).where(table.c.tracker == delivery.tracker, table.c.delivery_id == (delivery.delivery_id or "")[:200])
        ).first()
    return row is not None


def link(engine: Engine, ticket: str, linked: str, *, kind: str = "merged_pr", at: datetime | None = None) -> None:
    """Record that `linked` (a merged PR) came out of the work on `ticket`; recording it twice is harmless."""
    with engine.begin() as connection:
        _link(connection, ticket, linked, kind, at or utcnow())


def _link(connection: Connection, ticket: str, linked: str, kind: str, at: datetime) -> None:
    table = WorkItemLink.__table__
    connection.execute(insert_ignoring_duplicates(connection.dialect.name, table), [{"work_item": ticket, "linked": linked, "kind": kind, "ts": at}])


def history(engine: Engine, item_id: str) -> list[WorkItemChange]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(WorkItemChange.__table__).where(WorkItemChange.__table__.c.work_item == item_id).order_by(WorkItemChange.__table__.c.ts)
        ).all()
    return [WorkItemChange(**row._mapping) for row in rows]


def links_of(engine: Engine, item_id: str) -> list[str]:
    table = WorkItemLink.__table__
    with engine.connect() as connection:
        return list(connection.execute(select(table.c.linked).where(table.c.work_item == item_id).order_by(table.c.linked)).scalars())
