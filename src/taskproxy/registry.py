"""The work-item registry's rules, shared by the API and the CLI."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from taskproxy.errors import InvalidRequest
from taskproxy.storage import repo
from taskproxy.storage.models import WorkItem
from taskproxy.timeutil import utcnow
from taskproxy.validation import non_negative_number, one_of, printable
from taskproxy.workitems import WorkItemIds

ITEM_STATUSES = ("open", "in_progress", "done", "closed", "unverified")
ITEM_SOURCES = ("jira", "github", "linear", "manual")


def register_work_item(engine: Engine, ids: WorkItemIds, fields: dict[str, Any]) -> WorkItem:
    """Validate `fields` (the body of POST /api/work-items) and insert the item."""
    if "id" not in fields:
        raise InvalidRequest("'id' is required.", param="id")
    status = one_of(fields.get("status", "open"), "status", ITEM_STATUSES)
    budget_tokens = non_negative_number(fields.get("budget_tokens"), "budget_tokens")
    now = utcnow()
    item = WorkItem(
        id=ids.normalize(fields["id"]),
        source=one_of(fields.get("source", "manual"), "source", ITEM_SOURCES),
        title=printable(fields.get("title"), "title", max_length=500),
        url=printable(fields.get("url"), "url", max_length=2000),
        team=printable(fields.get("team"), "team"),
        status=status,
        created_at=now,
        completed_at=now if status == "done" else None,
        budget_tokens=int(budget_tokens) if budget_tokens is not None else None,
        budget_usd=non_negative_number(fields.get("budget_usd"), "budget_usd"),
    )
    if not repo.add_work_item(engine, item):
        raise InvalidRequest(f"The work item {item.id!r} exists already.", param="id")
    return item
