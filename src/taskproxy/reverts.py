"""Reverts and relands (the registry's rework by revert; registry.py applies the deliveries).

A merged pull request that undoes another is a revert: closed, linking no ticket, and what it undoes
(merged within `reports.rework_days`) is rework, with the done tickets it came out of that have no
other merge standing. Undoing a merged revert, it is a reland: the work landing again. What a merge
undoes decides which it is, not its title; a revert delivered before the merge it undoes waits as a
`reverted_by` link.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Connection

from taskproxy.errors import WorkItemInvalid
from taskproxy.storage import changes
from taskproxy.storage.models import WorkItem, WorkItemLink
from taskproxy.storage.repo import link_items
from taskproxy.timeutil import utcnow
from taskproxy.trackers.base import ItemUpdate, is_relanding_title, is_revert_title
from taskproxy.workitems import MERGED_PR, REVERTED_BY, WorkItemIds

_ITEMS = WorkItem.__table__


def revert_or_reland(connection: Connection, ids: WorkItemIds, told: ItemUpdate) -> ItemUpdate:
    """A merged pull request that undoes another (its body or branch names it, or its title is a
    revert's) is a revert: closed, merged, linking no ticket (linked, it would count as that ticket's
    merged PR), and what it undoes becomes rework. Unless what it undoes is itself a merged revert: then
    it is the work landing again (a reland), done, its tickets' revert marks cleared. The title
    (`Revert "Revert "…""`) decides only when what it undoes is not known here: a title can be edited,
    and one retitled as a revert of a revert let a revert count as completed work."""
    if not told.merged or (told.reverts is None and not is_revert_title(told.title)):
        return told
    undoes_a_revert = _is_merged_revert(connection, ids, told.reverts)
    reland = is_relanding_title(told.title) if undoes_a_revert is None else undoes_a_revert
    if reland:
        return replace(told, reverts=None)
    return replace(told, status="closed", links=())


def _is_merged_revert(connection: Connection, ids: WorkItemIds, raw_target: str | None) -> bool | None:
    """Whether the item a revert names is itself a merged revert (closed, merged); None when it is not known here."""
    try:
        target = ids.normalize(raw_target) if raw_target is not None else None
    except WorkItemInvalid:
        return None
    row = None if target is None else connection.execute(select(_ITEMS.c.status, _ITEMS.c.merged_at).where(_ITEMS.c.id == target)).first()
    return None if row is None else row.status == "closed" and row.merged_at is not None


def mark_reverted(connection: Connection, ids: WorkItemIds, raw_target: str, by: str, at: datetime, rework_days: float) -> None:
    """A merged revert: the pull request it undoes is rework, if it was merged within `rework_days` before.
    A revert that arrives before the merge it undoes (deliveries come late and out of order) is kept as
    a `reverted_by` link, and applied when the merge arrives (`revert_waiting`)."""
    try:
        target = ids.normalize(raw_target)
    except WorkItemInvalid:
        return
    row = connection.execute(select(_ITEMS.c.status, _ITEMS.c.merged_into).where(_ITEMS.c.id == target)).first()
    if row is not None and row.merged_into is not None:
        # A stacked pull request (stacks.py): its merge is no completion, its work landed with the pull
        # requests it is linked to, and those merges did not hold. (Not landed yet: nothing was completed.)
        links = WorkItemLink.__table__.c
        landings = connection.execute(select(links.linked).where(links.work_item == target, links.kind == MERGED_PR)).scalars().all()
        for landing in sorted(landings):
            _rework_if_recent(connection, landing, by, at, rework_days)
        if not landings:  # kept, as for a merge not arrived yet: applied when it lands (`stacked_reverts_waiting`)
            link_items(connection, [(target, by, REVERTED_BY, at)])
        return
    if row is None or row.status != "done":
        link_items(connection, [(target, by, REVERTED_BY, at)])
        return
    _rework_if_recent(connection, target, by, at, rework_days)


def stacked_reverts_waiting(connection: Connection, item_id: str, rework_days: float) -> None:
    """A merge just linked stacked pull requests to a landing (stacks.py): a revert of one of them that
    arrived before it had landed, or before it was merged at all, is rework of the landing now."""
    links = WorkItemLink.__table__.c
    candidates = {item_id, *connection.execute(select(links.linked).where(links.work_item == item_id, links.kind == MERGED_PR)).scalars()}
    landings = connection.execute(select(_ITEMS.c.id).where(_ITEMS.c.id.in_(sorted(candidates)), _ITEMS.c.status == "done",
                                                            _ITEMS.c.merged_into.is_(None), _ITEMS.c.merged_at.is_not(None))).scalars().all()  # fmt: skip
    for landing in sorted(landings):
        members = select(links.work_item).where(links.linked == landing, links.kind == MERGED_PR)
        waiting = connection.execute(select(links.linked, links.ts).where(links.work_item.in_(members), links.kind == REVERTED_BY)
                                     .order_by(links.ts).limit(1)).first()  # fmt: skip
        if waiting is not None:
            _rework_if_recent(connection, landing, waiting.linked, waiting.ts, rework_days)


def revert_waiting(connection: Connection, item_id: str, rework_days: float) -> None:
    """A pull request just merged: a revert of it that arrived before is applied now."""
    links = WorkItemLink.__table__.c
    waiting = connection.execute(select(links.linked, links.ts).where(links.work_item == item_id, links.kind == REVERTED_BY)
                                 .order_by(links.ts).limit(1)).first()  # fmt: skip
    if waiting is not None:
        _rework_if_recent(connection, item_id, waiting.linked, waiting.ts, rework_days)


def _rework_if_recent(connection: Connection, target: str, by: str, at: datetime, rework_days: float) -> None:
    row = connection.execute(select(_ITEMS.c.status, _ITEMS.c.merged_at, _ITEMS.c.completed_at, _ITEMS.c.reworked_at)
                             .where(_ITEMS.c.id == target)).first()  # fmt: skip
    done_at = row and (row.merged_at or row.completed_at)
    if row is None or row.status != "done" or done_at is None or row.reworked_at is not None:
        return
    if timedelta(0) <= at - done_at <= timedelta(days=rework_days):
        _mark_reverted_by(connection, target, by, at)
        _tickets_reverted(connection, target, by, at, rework_days)


def _mark_reverted_by(connection: Connection, item_id: str, by: str, at: datetime) -> None:
    connection.execute(update(_ITEMS).where(_ITEMS.c.id == item_id).values(reworked_at=at, rework_reason="reverted", rework_by=by[:200]))
    changes.note(connection, changes.ITEM, [item_id], utcnow())


def _tickets_reverted(connection: Connection, pull: str, by: str, at: datetime, rework_days: float) -> None:
    """The tickets a reverted pull request came out of, done before the revert and within `rework_days`
    of it: their completion did not hold either. The work was on the ticket (the branch names it), and
    only the pull request was marked: the ticket stayed completed, AI-assisted and not reworked."""
    links = WorkItemLink.__table__.c
    tickets = connection.execute(select(links.work_item).where(links.linked == pull, links.kind == MERGED_PR)).scalars().all()
    for ticket in tickets:
        row = connection.execute(select(_ITEMS.c.status, _ITEMS.c.completed_at, _ITEMS.c.reworked_at).where(_ITEMS.c.id == ticket)).first()
        if row is None or row.status != "done" or row.completed_at is None or row.reworked_at is not None:
            continue
        others = (select(_ITEMS.c.id).select_from(WorkItemLink.__table__.join(_ITEMS, _ITEMS.c.id == links.linked))
                  .where(links.work_item == ticket, links.kind == MERGED_PR, links.linked != pull, _ITEMS.c.status == "done",
                         _ITEMS.c.merged_at.is_not(None), or_(_ITEMS.c.reworked_at.is_(None), _ITEMS.c.rework_reason != "reverted")))  # fmt: skip
        if connection.execute(others.limit(1)).first() is not None:  # another of its merges stands: the ticket's work did not all go
            continue
        if timedelta(0) <= at - row.completed_at <= timedelta(days=rework_days):
            _mark_reverted_by(connection, ticket, by, at)


def landed_again(connection: Connection, ticket: str, at: datetime) -> None:
    """A merge out of a done ticket marked `reverted` with its pull request (a revert of the revert, or
    the work done again): the ticket's work stands again, and so does its completion."""
    row = connection.execute(select(_ITEMS.c.status, _ITEMS.c.merged_at, _ITEMS.c.reworked_at, _ITEMS.c.rework_reason)
                             .where(_ITEMS.c.id == ticket)).first()  # fmt: skip
    if row is not None and row.status == "done" and row.merged_at is None and row.rework_reason == "reverted" and row.reworked_at <= at:
        connection.execute(update(_ITEMS).where(_ITEMS.c.id == ticket).values(reworked_at=None, rework_reason=None, rework_by=None))
        changes.note(connection, changes.ITEM, [ticket], utcnow())
