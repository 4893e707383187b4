"""The admin API under /api/: keys, work items, usage. Every route needs an admin key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.errors import InvalidRequest, NotFound
from taskproxy.guard.auth import BOOTSTRAP_ADMIN_ID, ROLES, issue_key
from taskproxy.reports import usage as usage_reports
from taskproxy.routes.common import JSON, admin, event_json, in_thread, int_param, item_json, json_object, key_json, optional_str, time_param
from taskproxy.services import services
from taskproxy.storage import repo
from taskproxy.storage.models import WorkItem
from taskproxy.timeutil import iso, utcnow
from taskproxy.workitems import WorkItemIds

ITEM_STATUSES = ("open", "in_progress", "done", "closed", "unverified")
ITEM_SOURCES = ("jira", "github", "linear", "manual")


async def create_key(request: Request) -> Response:
    await admin(request)
    body = await json_object(request)
    owner = optional_str(body, "owner")
    if not owner:
        raise InvalidRequest("'owner' is required: the person or service the key belongs to.", param="owner")
    team = optional_str(body, "team")
    role = body.get("role", "developer")
    if role not in ROLES:
        raise InvalidRequest(f"'role' must be one of {', '.join(ROLES)}.", param="role")
    key, token = await in_thread(issue_key, services(request).engine, owner=owner, team=team, role=role)
    return JSON({**key_json(key), "key": token}, status_code=201)


async def list_keys(request: Request) -> Response:
    await admin(request)
    keys = await in_thread(repo.list_keys, services(request).engine)
    return JSON([key_json(k) for k in keys])


async def revoke_key(request: Request) -> Response:
    await admin(request)
    key_id = request.path_params["key_id"]
    if key_id == BOOTSTRAP_ADMIN_ID:
        raise InvalidRequest("The bootstrap admin key comes from TASKPROXY_ADMIN_KEY; change that variable to replace it.")
    svc = services(request)
    key = await in_thread(repo.revoke_key, svc.engine, key_id, utcnow())
    if key is None:
        raise NotFound(f"No key with id {key_id[:64]!r}.")
    svc.keys.forget(key_id)
    return JSON(key_json(key))


def _ids(request: Request) -> WorkItemIds:
    return services(request).attribution.ids


async def get_work_item(request: Request) -> Response:
    await admin(request)
    item_id = _ids(request).normalize(request.path_params["item_id"])
    summary = await in_thread(usage_reports.work_item_summary, services(request).engine, item_id)
    if summary is None:
        raise NotFound(f"No work item {item_id!r} is registered or has usage.")
    return JSON(summary)


async def list_work_items(request: Request) -> Response:
    await admin(request)
    status = request.query_params.get("status")
    if status and status not in ITEM_STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(ITEM_STATUSES)}.", param="status")
    items = await in_thread(
        repo.list_work_items, services(request).engine, status=status, team=request.query_params.get("team"),
        limit=int_param(request, "limit", 1000, 10_000),
    )  # fmt: skip
    return JSON([item_json(i) for i in items])


async def create_work_item(request: Request) -> Response:
    await admin(request)
    body = await json_object(request)
    if "id" not in body:
        raise InvalidRequest("'id' is required.", param="id")
    status = body.get("status", "open")
    if status not in ITEM_STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(ITEM_STATUSES)}.", param="status")
    source = body.get("source", "manual")
    if source not in ITEM_SOURCES:
        raise InvalidRequest(f"'source' must be one of {', '.join(ITEM_SOURCES)}.", param="source")
    for name in ("budget_tokens", "budget_usd"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise InvalidRequest(f"'{name}' must be a non-negative number.", param=name)
    item = WorkItem(
        id=_ids(request).normalize(body["id"]),
        source=source,
        title=optional_str(body, "title", max_length=500),
        url=optional_str(body, "url", max_length=2000),
        team=optional_str(body, "team"),
        status=status,
        created_at=utcnow(),
        completed_at=utcnow() if status == "done" else None,
        budget_tokens=body.get("budget_tokens"),
        budget_usd=body.get("budget_usd"),
    )
    if not await in_thread(repo.add_work_item, services(request).engine, item):
        raise InvalidRequest(f"The work item {item.id!r} exists already.", param="id")
    return JSON(item_json(item), status_code=201)


async def usage(request: Request) -> Response:
    await admin(request)
    group_by = request.query_params.get("group_by", "work_item")
    if group_by not in usage_reports.GROUP_COLUMNS:
        raise InvalidRequest("'group_by' must be work_item, team or model.", param="group_by")
    since, until = time_param(request, "since"), time_param(request, "until")
    rows = await in_thread(usage_reports.usage_grouped, services(request).engine, group_by, since, until)
    return JSON({"group_by": group_by, "since": iso(since), "until": iso(until), "groups": rows})


async def usage_events(request: Request) -> Response:
    await admin(request)
    item = request.query_params.get("work_item")
    work_item = _ids(request).normalize(item) if item else None
    limit = int_param(request, "limit", 100, 10_000)
    events = await in_thread(repo.list_events, services(request).engine, work_item=work_item, key_id=request.query_params.get("key_id"), limit=limit)
    return JSON([event_json(e) for e in events])


async def tasks_report(request: Request) -> Response:
    await admin(request)
    since, until = time_param(request, "since"), time_param(request, "until")
    limit = int_param(request, "limit", 50, 10_000)
    engine = services(request).engine
    rows = await in_thread(usage_reports.tasks_report, engine, since, until, limit)
    rejected = await in_thread(usage_reports.rejections_by_reason, engine, since, until)
    return JSON({"since": iso(since), "until": iso(until), "tasks": rows, "rejected_requests": rejected})


routes = [
    Route("/api/keys", create_key, methods=["POST"]),
    Route("/api/keys", list_keys, methods=["GET"]),
    Route("/api/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/api/work-items", list_work_items, methods=["GET"]),
    Route("/api/work-items", create_work_item, methods=["POST"]),
    Route("/api/work-items/{item_id:path}", get_work_item, methods=["GET"]),
    Route("/api/usage", usage, methods=["GET"]),
    Route("/api/usage/events", usage_events, methods=["GET"]),
    Route("/api/reports/tasks", tasks_report, methods=["GET"]),
]
