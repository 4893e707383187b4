"""Stacked pull requests: one merged into another branch of its repository, not the default one.

Such a merge is a step of the work, not its outcome: the tracker parsers record it `in_progress`, and
the registry keeps its time in `merged_at` (a pull request is merged once: no later event changes it).
The work lands when that branch is merged into the default branch; then the stacked pull request, and
every item linked to it (its tickets, the pull requests stacked on it), are linked to the pull request
that landed it, as a ticket is to its merged pull request. Their usage up to that merge is its cost
(adoption.py, carried tickets), their spend before it is not spend without outcome, and merging many
pull requests into one's own branch, then that branch once, is one completed item, not many (counting
each merge was a way to game the cost per merged pull request).

Which pull request lands a stacked merge into branch B at time t: those of B (opened from B in the
same repository: a fork's branch of the same name is another branch) merged after t, in the order
merged, up to and including the first merged into the default branch. A branch name is reused: a
landing of B before t took none of this work. Deliveries arrive in any order: whichever merge is
applied second makes the links, and a landing delivered after a later one of the same branch takes
back from it what it landed. Links are kept closed under stacking (everything below a pull request
is linked to everything it landed with), so each merge writes its links in one statement and reads
nothing recursively, and a ring of merges ends.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from taskproxy.storage.models import WorkItem, WorkItemLink
from taskproxy.storage.repo import link_items
from taskproxy.workitems import MERGED_PR

_W = WorkItem.__table__.c
_L = WorkItemLink.__table__.c
BRANCH_CHARS = 200  # as stored (models.WorkItem.branch): a longer name is matched by its first 200 characters


def repository_of(item_id: str) -> str | None:
    """The id's repository prefix, its mark included (`acme/web#`, `group/project!`); None for a ticket."""
    cut = max(item_id.rfind("#"), item_id.rfind("!"))
    return item_id[: cut + 1] if cut > 0 else None


def landed(connection: Connection, item_id: str, *, branch: str | None, merged_into: str | None, at: datetime) -> None:
    """A pull request's merge was just applied, at `at`: into the default branch (`merged_into` None) or
    into `merged_into`. Links to it what was stacked on its branch since that branch last landed, and,
    stacked itself, links it to the pull requests of `merged_into` that have landed it already."""
    repository = repository_of(item_id)
    if repository is None:
        return
    in_repository = _W.id.startswith(repository, autoescape=True)
    if branch:
        branch = branch[:BRANCH_CHARS]
        previous = connection.execute(
            select(_W.merged_at).where(_W.branch == branch, in_repository, _W.id != item_id, _W.status == "done",
                                       _W.merged_into.is_(None), _W.merged_at < at).order_by(_W.merged_at.desc()).limit(1)
        ).scalar()  # fmt: skip
        since = [] if previous is None else [_W.merged_at > previous]
        stacked_on_it = connection.execute(
            select(_W.id, _W.merged_at).where(_W.merged_into == branch, in_repository, _W.id != item_id, _W.merged_at <= at, *since).order_by(_W.id)
        ).all()  # fmt: skip
        for child, child_merged in stacked_on_it:
            _link_closed(connection, child, item_id, child_merged or at)
        if merged_into is None and stacked_on_it:
            _unlink_later_landings(connection, [child for child, _ in stacked_on_it], branch, in_repository, item_id, at)
    if merged_into:
        later = connection.execute(
            select(_W.id, _W.merged_into).where(_W.branch == merged_into[:BRANCH_CHARS], in_repository, _W.id != item_id, _W.merged_at >= at)
            .order_by(_W.merged_at, _W.id)
        ).all()  # fmt: skip
        for parent, stacked in later:
            _link_closed(connection, item_id, parent, at)
            if stacked is None:  # landed in the default branch: later merges of the branch took none of it
                break


def _unlink_later_landings(connection: Connection, children: list[str], branch: str, in_repository: Any, landing: str, at: datetime) -> None:
    """This landing of `branch` arrived after a later one of the same branch (a reused name, deliveries
    out of order): what it landed had been linked to the later one, which would carry it. Those links
    go. A stack link is dated at the stacked merge (`_link_closed`), so those made for what merged
    before this landing are told from the later landing's own (its tickets, dated at its merge)."""
    later = connection.execute(select(_W.id).where(_W.branch == branch, in_repository, _W.id != landing, _W.merged_at > at)).scalars().all()
    if not later:
        return
    members = {*children, *connection.execute(select(_L.work_item).where(_L.linked.in_(children), _L.kind == MERGED_PR)).scalars()}
    targets = {*later, *connection.execute(select(_L.linked).where(_L.work_item.in_(later), _L.kind == MERGED_PR)).scalars()} - {landing}
    connection.execute(delete(WorkItemLink.__table__).where(_L.work_item.in_(sorted(members)), _L.linked.in_(sorted(targets)),
                                                            _L.kind == MERGED_PR, _L.ts <= at))  # fmt: skip


def _link_closed(connection: Connection, child: str, parent: str, at: datetime) -> None:
    """Link `child` and everything linked to it to `parent` and to everything `parent` is linked to,
    dated `at`: the child's own merge (what `_unlink_later_landings` tells them by)."""
    below = connection.execute(select(_L.work_item).where(_L.linked == child, _L.kind == MERGED_PR)).scalars().all()
    above = connection.execute(select(_L.linked).where(_L.work_item == parent, _L.kind == MERGED_PR)).scalars().all()
    pairs = {(item, target) for item in (child, *below) for target in (parent, *above) if item != target}
    link_items(connection, [(item, target, MERGED_PR, at) for item, target in sorted(pairs)])
