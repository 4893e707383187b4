"""The work-item registry's rules, shared by the API, the CLI and the tracker webhooks.

Every status change goes through `_apply`, which keeps the history (`work_item_changes`),
`completed_at` (set on done or closed, cleared on reopening) and the item's fields consistent.

Ordering: trackers deliver late and out of order (GitHub redelivers a failed delivery with its
original times). A tracker's event is compared only with that same tracker's earlier events for the
item (`tracker`, `tracker_event_at`): an older one does not undo a newer one (it joins the history when
its place there is known: `_round_trip`), and nothing done locally
(an admin's edit, a registration) ever makes a tracker's event stale. A status set by an admin or the
CLI takes effect at the time it is made. A merged pull request is final: no later tracker event
changes its status. A tracker time in the future is taken as the time the delivery was received, and
the history row says so.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import datetime
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError

from taskproxy.errors import InvalidRequest, NotFound, WorkItemInvalid
from taskproxy import reverts, stacks
from taskproxy.storage import changes, repo
from taskproxy.storage.repo import insert_ignoring_duplicates
from taskproxy.storage.models import WebhookDelivery, WorkItem, WorkItemChange, WorkItemSize
from taskproxy.trackers.base import Delivery, Size, text
from taskproxy.timeutil import utcnow
from taskproxy.bodies import NewWorkItem, WorkItemChanges, parse
from taskproxy.workitems import ITEM_SOURCES, MERGED_PR, RESOLVED, WorkItemIds

TRACKERS = ("jira", "github", "gitlab", "linear")
_ITEMS = WorkItem.__table__
_C = WorkItemChange.__table__.c
log = logging.getLogger("taskproxy.registry")


def register_work_item(engine: Engine, ids: WorkItemIds, fields: Mapping[str, Any], *, source: str = "api") -> Row:
    """Validate `fields` (the body of POST /api/work-items, bodies.NewWorkItem) and insert the item."""
    new = parse(NewWorkItem, fields)
    item_id = ids.normalize(new.id)
    values = new.model_dump(exclude={"id", "status"})
    with engine.begin() as connection:
        if connection.execute(select(_ITEMS.c.id).where(_ITEMS.c.id == item_id)).first() is not None:
            raise InvalidRequest(f"The work item {item_id!r} exists already.", param="id")
        _apply(connection, item_id, new.status, source=source, at=utcnow(), fields=values)
    return _read_back(engine, item_id)


def update_work_item(engine: Engine, item_id: str, fields: Mapping[str, Any], *, source: str = "api") -> Row:
    """PATCH: change any of title, url, team, budgets and status of an existing item (bodies.WorkItemChanges)."""
    values = parse(WorkItemChanges, fields).changed()
    status = values.pop("status", None)
    with engine.begin() as connection:
        current = connection.execute(select(_ITEMS).where(_ITEMS.c.id == item_id)).first()
        if current is None:
            raise NotFound(f"No work item {item_id!r} is registered; register it first (POST /api/work-items, or `taskproxy items add {item_id}`).")
        _apply(connection, item_id, status or current.status, source=source, at=utcnow(), fields=values)
    return _read_back(engine, item_id)


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
    merged: bool = False,
) -> Row:
    """Move an item to `status` (creating it if it is new), recording the change once."""
    with engine.begin() as connection:
        _apply(connection, item_id, status, source=source, at=at or utcnow(), fields=fields or {}, delivery_id=delivery_id,
               created_at=created_at, merged=merged)  # fmt: skip
    return _read_back(engine, item_id)


def _read_back(engine: Engine, item_id: str) -> Row:
    """The item as just committed."""
    item = repo.get_work_item(engine, item_id)
    assert item is not None, item_id
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
    merged: bool = False,
    note: str | None = None,
    orders: bool = True,
) -> str:
    """Apply a change to the item (see the module docstring); answers the status it leaves the item in
    (an event older than its tracker's last one, or one against a merge, changes none). `orders`: the
    event names a status, and so orders the tracker's later events (one that only edits a title does
    not: its time is no status's, and made a real status event delivered after it stale)."""
    changes.note(connection, changes.ITEM, [item_id], utcnow())  # every process refreshes its copy of the item
    tracker_source = source if source in ITEM_SOURCES else "manual"
    by_tracker = source in TRACKERS
    row = {"source": tracker_source, **fields}  # fields may name the item's source (POST /api/work-items)
    # Nothing is completed before it was created: a tracker saying so (hostile or broken data) would give
    # negative cycle times. The earliest time known is then the item's creation.
    created = min(created_at, at) if created_at is not None else at
    values_new = {"id": item_id, "status": status, "created_at": created, "completed_at": at if status in RESOLVED else None,
                  "updated_at": at, "tracker": source if by_tracker else None, "tracker_event_at": at if by_tracker and orders else None,
                  "merged_at": at if merged else None, **row}  # fmt: skip
    created = connection.execute(insert_ignoring_duplicates(connection.dialect.name, _ITEMS).values(**values_new).returning(_ITEMS.c.id)).first()
    if created is not None:  # new: concurrent creators (a webhook, the writer's registration) lose the insert, not the request
        _record_change(connection, item_id, None, status, source, at, delivery_id, note)
        return status
    # Locked until commit on PostgreSQL: two deliveries for one item apply one after the other.
    current = connection.execute(select(_ITEMS).where(_ITEMS.c.id == item_id).with_for_update()).first()
    assert current is not None
    values: dict[str, Any] = {**{k: v for k, v in fields.items() if k != "source"}, "updated_at": max(at, current.updated_at or at)}
    if current.source == "auto":  # a tracker or an admin confirms an item first seen in a request
        values["source"] = tracker_source
    if created_at is not None and created_at < current.created_at:  # the tracker knows when the work began
        values["created_at"] = created_at
    stale = final = False
    if by_tracker:
        stale = current.tracker == source and current.tracker_event_at is not None and at < current.tracker_event_at
        final = current.merged_at is not None
        if stale or final:  # an older event must not undo a newer one; a merge is never undone
            why = "a merged pull request is final" if final else f"older than its last {source} event at {current.tracker_event_at}"
            log.info("kept the status of %s against a %s event of %s (%s)", item_id, source, at, why)
        elif orders:
            values["tracker"], values["tracker_event_at"] = source, at
        if stale:  # nor its title, link or team
            values = {k: v for k, v in values.items() if k not in fields}
            if not final and status != current.status:
                values.update(_round_trip(connection, current, status, source=source, at=at, delivery_id=delivery_id))
    if merged and current.merged_at is None:
        values["merged_at"] = at
    if status != current.status and not stale and not final:
        values["status"] = status
        values["completed_at"] = at if status in RESOLVED else None
        # Done, then anything else (closed included: a Done changed to Won't Do) is a completion that did
        # not hold: rework, as a reopening is. Only the first is kept.
        # A ticket marked `reverted` with its pull request (reverts.py) and then reopened is marked
        # by its reopening: the completion it undoes is dated, and a later Done is a completion that held.
        if current.status == "done" and status != "done" and _first_rework(current):
            values.update(reworked_at=at, rework_reason="reopened", rework_by=(delivery_id or source)[:200])
        _record_change(connection, item_id, current.status, status, source, at, delivery_id, note)
    if values.get("completed_at") is not None and values["completed_at"] < values.get("created_at", current.created_at):
        values["created_at"] = values["completed_at"]
    connection.execute(update(_ITEMS).where(_ITEMS.c.id == item_id).values(**values))
    return str(values.get("status", current.status))


def _first_rework(current: Row) -> bool:
    """No rework recorded yet, or only a `reverted` mark taken from the ticket's pull request: a reopening
    of the ticket itself marks it instead (the completion it undoes is dated)."""
    return current.reworked_at is None or (current.rework_reason == "reverted" and current.merged_at is None)


def _round_trip(connection: Connection, current: Row, status: str, *, source: str, at: datetime, delivery_id: str | None) -> dict[str, Any]:
    """A tracker's event older than its last one, saying a status the item does not have. If the item is
    done or closed and has been since before `at` (its last change is earlier), it left that status at
    `at` and was completed again at the tracker's last event, which said so: both changes join the
    history, and the completion and the rework are what they would be had the events come in order (done, reopened, done
    again delivered as done, done, reopened kept the first completion and lost the rework). When the item
    changed since `at`, or nothing is recorded before it, where the event goes is not known: it changes
    nothing."""
    # Only back into a completion: its time is the tracker's completion time (Jira's resolution date,
    # Linear's completedAt, GitHub's closed_at). An open item's last event time is any later edit (a
    # comment), not when it went back: the return would be misdated, and with it the rework.
    if current.status not in RESOLVED:
        return {}
    last = connection.execute(select(_C.ts, _C.to_status).where(_C.work_item == current.id).order_by(_C.ts.desc()).limit(1)).first()
    back_at = current.tracker_event_at
    if last is None or last.ts >= at or last.to_status != current.status or back_at is None:
        return {}
    _record_change(connection, current.id, current.status, status, source, at, delivery_id, "delivered after the tracker's later event")
    _record_change(connection, current.id, status, current.status, source, back_at, None, "as the tracker's later event said")
    values: dict[str, Any] = {"completed_at": back_at}
    if _first_rework(current) and "done" in (current.status, status):
        # Done and then anything else is rework: left at `at`, or, done at `at`, left by the later event.
        values.update(reworked_at=at if current.status == "done" else back_at, rework_reason="reopened",
                      rework_by=((delivery_id or source) if current.status == "done" else source)[:200])  # fmt: skip
    return values


_SIZE_FIELDS = ("lines_added", "lines_deleted", "files_changed", "points")


def record_size(engine: Engine, item_id: str, size: Size, *, source: str, at: datetime, delivery_id: str | None = None) -> None:
    """A tracker's size for an item, as a delivery would record it (kept as history when it changes)."""
    with engine.begin() as connection:
        _record_size(connection, item_id, size, source, at, delivery_id)


def _record_size(connection: Connection, item_id: str, size: Size, source: str, at: datetime, delivery_id: str | None) -> None:
    """The item's size as the tracker says at `at` (fields it did not send are kept); a change is kept as
    history, and the item holds the latest: a report older than the last one recorded only joins the history."""
    current = connection.execute(select(*(_ITEMS.c[name] for name in _SIZE_FIELDS)).where(_ITEMS.c.id == item_id)).first()
    reported = {name: getattr(size, name) for name in _SIZE_FIELDS if getattr(size, name) is not None}
    if current is None or all(getattr(current, name) == value for name, value in reported.items()):
        return
    sizes = WorkItemSize.__table__.c
    latest = connection.execute(select(func.max(sizes.ts)).where(sizes.work_item == item_id)).scalar()
    if latest is None or at >= latest:
        connection.execute(update(_ITEMS).where(_ITEMS.c.id == item_id).values(**reported))
    connection.execute(WorkItemSize.__table__.insert().values(id=uuid.uuid4().hex, work_item=item_id, ts=at, source=source,
                                                              delivery_id=delivery_id, **reported))  # fmt: skip


def _record_change(
    connection: Connection, item_id: str, before: str | None, after: str, source: str, at: datetime, delivery_id: str | None, note: str | None = None
) -> None:
    connection.execute(
        WorkItemChange.__table__.insert().values(
            id=uuid.uuid4().hex, work_item=item_id, ts=at, from_status=before, to_status=after, source=source, delivery_id=delivery_id, note=note
        )
    )


def _clamped(at: datetime | None, now: datetime) -> tuple[datetime, str | None]:
    """A tracker's time, or the time received when it gave none or one in the future (noted)."""
    if at is None:
        return now, None
    if at > now:
        return now, f"the tracker's time {at.isoformat()}Z is in the future: recorded at the time the delivery was received"
    return at, None


def apply_delivery(engine: Engine, ids: WorkItemIds, delivery: Delivery, now: datetime, *, rework_days: float = 14.0) -> dict[str, Any]:
    """Apply a verified tracker delivery once: a delivery id seen before changes nothing. A merged revert
    marks the pull request it undoes as rework, when that was merged within `rework_days`."""
    applied: list[dict[str, Any]] = []
    skipped: list[str] = []
    kept: list[str] = []  # items whose status the delivery did not change (older than the tracker's last event, or a merge)
    if delivery.delivery_id is not None:  # kept with every row it writes, each column 200 characters
        delivery = replace(delivery, delivery_id=delivery.delivery_id[:200])
    try:
        with engine.begin() as connection:
            if delivery.delivery_id:
                # Inserted first, in the same transaction: a concurrent redelivery fails here and changes nothing.
                connection.execute(
                    WebhookDelivery.__table__.insert().values(
                        tracker=delivery.tracker, delivery_id=delivery.delivery_id, received_at=now, event=(text(delivery.event) or "")[:64],  # a payload's field: NUL is refused by PostgreSQL
                        outcome="applied" if delivery.updates else "ignored",
                    )
                )  # fmt: skip
            for told in delivery.updates:
                try:
                    item_id = ids.normalize(told.item_id)
                except WorkItemInvalid:  # an id the configured patterns do not accept is not tracked
                    skipped.append(told.item_id[:200])
                    continue
                fields = {k: v for k, v in (("title", told.title), ("url", told.url), ("team", told.team), ("branch", told.branch),
                                            ("merged_into", told.merged_into)) if v is not None}  # fmt: skip
                for name in ("branch", "merged_into"):
                    if name in fields:
                        fields[name] = fields[name][: stacks.BRANCH_CHARS]
                found = connection.execute(select(_ITEMS.c.status, _ITEMS.c.tracker, _ITEMS.c.merged_into).where(_ITEMS.c.id == item_id)).first()
                if found is not None and found.tracker not in (None, delivery.tracker):
                    # Another tracker's item under the same id (a GitLab project named as a GitHub repository,
                    # a Jira key that is also a Linear id): its own tracker decides it, not this one.
                    log.warning("ignored a %s event for %s, an item of %s", delivery.tracker, item_id, found.tracker)
                    skipped.append(f"{item_id[:200]}: an item of {found.tracker}")
                    continue
                if found is not None and found.merged_into is not None and (told.merged or told.merged_into is not None):
                    # Merged into a branch once, it is merged for good: `items sync` reading GitLab's REST API,
                    # which does not say which branch is the default, must not make it a completed merge.
                    told = replace(told, status="in_progress", merged=False, merged_into=found.merged_into, reverts=None)
                told = reverts.revert_or_reland(connection, ids, told)
                current = found.status if found is not None else None
                status = told.status or current or "open"
                at, note = _clamped(told.at, now)
                if told.merged_into is not None:
                    stacked = f"merged into {told.merged_into[:stacks.BRANCH_CHARS]!r}, not the default branch: its work lands with that branch's pull request"
                    note = stacked if note is None else f"{stacked}; {note}"
                created_at = min(told.created_at, now) if told.created_at is not None else None
                now_status = _apply(connection, item_id, status, source=delivery.tracker, at=at, fields=fields,
                                    delivery_id=delivery.delivery_id, created_at=created_at, merged=told.merged or told.merged_into is not None,
                                    note=note, orders=told.status is not None)  # fmt: skip
                for ticket in told.links:
                    _link(connection, ticket, item_id, MERGED_PR, at)
                    if told.merged:
                        reverts.landed_again(connection, ticket, at)
                if told.size is not None:
                    # Sent with the status that this delivery recorded: the size as of that status (a ticket
                    # pointed as it is done). Else as of the tracker's last edit: points raised on a done
                    # ticket were dated at its completion (Jira's and Linear's status time), as if they had been so.
                    moved = now_status != current or found is None
                    size_at = at if moved or told.edited_at is None else max(at, _clamped(told.edited_at, now)[0])
                    _record_size(connection, item_id, told.size, delivery.tracker, size_at, delivery.delivery_id)
                if told.reverts is not None and told.merged:
                    reverts.mark_reverted(connection, ids, told.reverts, item_id, at, rework_days)
                if told.merged:
                    reverts.revert_waiting(connection, item_id, rework_days)
                if (told.merged and now_status == "done") or (told.merged_into is not None and now_status == "in_progress"):
                    stacks.landed(connection, item_id, branch=told.branch, merged_into=told.merged_into, at=at)
                    reverts.stacked_reverts_waiting(connection, item_id, rework_days)
                if now_status != status and not told.links and told.size is None:
                    kept.append(item_id)
                applied.append({"id": item_id, "status": now_status, "linked": list(told.links)})
    except IntegrityError:
        if delivery.delivery_id and _seen(engine, delivery):
            return {"status": "duplicate", "delivery": delivery.delivery_id}
        raise
    return {"status": "applied" if applied else "ignored", "event": delivery.event, "items": applied, "skipped": skipped, "kept": kept}


def _seen(engine: Engine, delivery: Delivery) -> bool:
    table = WebhookDelivery.__table__
    with engine.connect() as connection:
        row = connection.execute(
            select(table.c.delivery_id).where(table.c.tracker == delivery.tracker, table.c.delivery_id == (delivery.delivery_id or "")[:200])
        ).first()
    return row is not None


def link(engine: Engine, ticket: str, linked: str, *, kind: str = MERGED_PR, at: datetime | None = None) -> None:
    """Record that `linked` (a merged PR) came out of the work on `ticket`; recording it twice is harmless."""
    with engine.begin() as connection:
        _link(connection, ticket, linked, kind, at or utcnow())


def _link(connection: Connection, ticket: str, linked: str, kind: str, at: datetime) -> None:
    repo.link_items(connection, [(ticket, linked, kind, at)])


class ItemNotes(Protocol):
    """A running proxy's view of the registry, told of each change made through it."""

    def note(self, item: Row) -> None: ...

    def note_changes(self, statuses: dict[str, str]) -> None: ...


class WorkItems:
    """The registry as the API, the CLI and the webhooks use it: each change is written to the database
    and, in a running proxy, noted in its view of the items, so no caller has to remember to."""

    def __init__(self, engine: Engine, ids: WorkItemIds, view: ItemNotes | None = None, *, rework_days: float = 14.0) -> None:
        self.engine, self.ids, self._view, self.rework_days = engine, ids, view, rework_days

    def _noted(self, item: Row) -> Row:
        if self._view is not None:
            self._view.note(item)
        return item

    def register(self, fields: dict[str, Any], *, source: str = "api") -> Row:
        return self._noted(register_work_item(self.engine, self.ids, fields, source=source))

    def update(self, raw_id: str, fields: dict[str, Any], *, source: str = "api") -> Row:
        return self._noted(update_work_item(self.engine, self.ids.normalize(raw_id), fields, source=source))

    def resolve(self, raw_id: str, status: str, *, source: str) -> Row:
        """Mark a registered item done or closed (POST /api/work-items/{id}/complete and /close, `taskproxy items complete|close`)."""
        item_id = self.ids.normalize(raw_id)
        if repo.get_work_item(self.engine, item_id) is None:
            raise NotFound(f"No work item {item_id!r} is registered; register it first (POST /api/work-items, or `taskproxy items add {item_id}`).")
        assert status in RESOLVED, status
        return self._noted(transition(self.engine, item_id, status, source=source))

    def apply_delivery(self, delivery: Delivery, now: datetime) -> dict[str, Any]:
        result = apply_delivery(self.engine, self.ids, delivery, now, rework_days=self.rework_days)
        if self._view is not None and result["status"] == "applied":
            self._view.note_changes({item["id"]: item["status"] for item in result["items"]})
        return result
