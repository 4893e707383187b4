"""Stacked pull requests: one merged into another pull request's branch, not its repository's default one.

Such a merge is a step of the work, not its outcome: the tracker parsers record it `in_progress`, not
done and not final. The work lands when the pull request of that branch is merged into the default
branch; then the stacked one, and every item linked to it (its tickets, the pull requests stacked on
it), are linked to the pull request that landed them, as a ticket is to its merged pull request. Their
usage up to that merge is its cost (adoption.py, carried tickets), their spend before it is not spend
without outcome, and merging many pull requests into one's own branch, then that branch once, is one
completed item, not many (counting each merge was a way to game the cost per merged pull request).

Matched within one repository (GitHub's `owner/repo#`, GitLab's `group/project!`), by branch name and
by time: a stacked merge lands with the pull request of its branch only if that one was opened before
the merge and merged after it (branch names are reused, and a merge into a branch whose pull request had
already landed did not land with it). Deliveries arrive in any order: whichever of the two merges is
applied second makes the link, and a link made below a stacked pull request already linked upward is
carried up too.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Connection

from taskproxy.storage.models import WorkItem, WorkItemLink
from taskproxy.storage.repo import link_items
from taskproxy.workitems import MERGED_PR

_W = WorkItem.__table__.c
_L = WorkItemLink.__table__.c
MAX_DEPTH = 16  # stacks deeper than this are not followed further (a link cycle made by hand ends here too)
BRANCH_CHARS = 200  # as stored (models.WorkItem.branch): a longer name is matched by its first 200 characters


def repository_of(item_id: str) -> str | None:
    """The id's repository prefix, its mark included (`acme/web#`, `group/project!`); None for a ticket."""
    cut = max(item_id.rfind("#"), item_id.rfind("!"))
    return item_id[: cut + 1] if cut > 0 else None


def landed(connection: Connection, item_id: str, *, branch: str | None, merged_into: str | None, at: datetime) -> None:
    """A pull request's merge was just applied, at `at`: into the default branch (`merged_into` None) or
    into `merged_into`. Links to it what was stacked on its branch while it was open, and, stacked
    itself, links it to the pull request of the branch it went into if that one has landed already."""
    repository = repository_of(item_id)
    if repository is None:
        return
    opened = connection.execute(select(_W.created_at).where(_W.id == item_id)).scalar_one()
    if branch:
        stacked_on_it = connection.execute(
            select(_W.id).where(_W.merged_into == branch[:BRANCH_CHARS], _W.id.startswith(repository, autoescape=True), _W.id != item_id,
                                _W.tracker_event_at >= opened, _W.tracker_event_at <= at).order_by(_W.id)
        ).scalars().all()  # fmt: skip
        for child in stacked_on_it:
            _carry(connection, child, item_id, at, depth=0)
    if merged_into:
        # The pull request of that branch, opened before this merge and merged after it (into the default
        # branch, or stacked in turn); the latest opened, should a branch have had two.
        merge_time = or_(and_(_W.merged_at.is_not(None), _W.merged_at >= at), and_(_W.merged_into.is_not(None), _W.tracker_event_at >= at))
        parent = connection.execute(
            select(_W.id).where(_W.branch == merged_into[:BRANCH_CHARS], _W.id.startswith(repository, autoescape=True), _W.id != item_id,
                                _W.created_at <= at, merge_time).order_by(_W.created_at.desc(), _W.id).limit(1)
        ).scalar()  # fmt: skip
        if parent is not None:
            _carry(connection, item_id, parent, at, depth=0)


def _carry(connection: Connection, child: str, parent: str, at: datetime, *, depth: int) -> None:
    """Link `child` and everything linked to it to `parent`, then to whatever `parent` itself landed with."""
    if depth >= MAX_DEPTH or child == parent:
        return
    below = connection.execute(select(_L.work_item).where(_L.linked == child, _L.kind == MERGED_PR)).scalars().all()
    link_items(connection, [(item, parent, MERGED_PR, at) for item in (child, *below) if item != parent])
    above = connection.execute(select(_L.linked).where(_L.work_item == parent, _L.kind == MERGED_PR)).scalars().all()
    for grandparent in above:
        _carry(connection, child, grandparent, at, depth=depth + 1)
