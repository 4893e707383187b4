"""The admin API under /api/: keys, work items, usage. Every route needs an admin key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy import privacy
from taskproxy.errors import InvalidRequest, NotFound
from taskproxy.guard.auth import issue_key, revoke
from taskproxy.reports import usage as usage_reports
from taskproxy.reports.items import work_item_view
from taskproxy.audit import audit_read
from taskproxy.registry import ITEM_STATUSES, register_work_item, transition, update_work_item
from taskproxy.records import event_json, item_json, key_json
from taskproxy.routes.common import JSON, admin, in_thread, int_param, json_object, time_param
from taskproxy.services import services
from taskproxy.storage import repo
from taskproxy.timeutil import iso
from taskproxy.workitems import WorkItemIds



async def create_key(request: Request) -> Response:
    await admin(request)
    body = await json_object(request)
    svc = services(request)
    key, token = await in_thread(issue_key, svc.engine, owner=body.get("owner"), team=body.get("team"), role=body.get("role", "developer"))
    svc.keys.note_issued(key)
    return JSON({**key_json(key), "key": token}, status_code=201)


async def list_keys(request: Request) -> Response:
    principal = await admin(request)
    audit_read(services(request).writer, request, principal)
    keys = await in_thread(repo.list_keys, services(request).engine)
    return JSON([key_json(k) for k in keys])


async def revoke_key(request: Request) -> Response:
    await admin(request)
    key_id = request.path_params["key_id"]
    svc = services(request)
    key = await in_thread(revoke, svc.engine, key_id)
    svc.keys.forget(key_id)
    return JSON(key_json(key))


def _ids(request: Request) -> WorkItemIds:
    return services(request).attribution.ids


async def get_work_item(request: Request) -> Response:
    await admin(request)
    item_id = _ids(request).normalize(request.path_params["item_id"])
    view = await in_thread(work_item_view, services(request).engine, item_id)
    if view is None:
        raise NotFound(f"No work item {item_id!r} is registered or has usage.")
    return JSON(view)


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
    svc = services(request)
    item = await in_thread(register_work_item, svc.engine, _ids(request), body)
    svc.items.note(item)
    return JSON(item_json(item), status_code=201)


async def patch_work_item(request: Request) -> Response:
    await admin(request)
    body = await json_object(request)
    svc = services(request)
    item = await in_thread(update_work_item, svc.engine, _ids(request).normalize(request.path_params["item_id"]), body)
    svc.items.note(item)
    return JSON(item_json(item))


async def _resolve(request: Request, status: str) -> Response:
    await admin(request)
    svc = services(request)
    item_id = _ids(request).normalize(request.path_params["item_id"])
    if await in_thread(repo.get_work_item, svc.engine, item_id) is None:
        raise NotFound(f"No work item {item_id!r} is registered.")
    item = await in_thread(transition, svc.engine, item_id, status, source="api")
    svc.items.note(item)
    return JSON(item_json(item))


async def complete_work_item(request: Request) -> Response:
    return await _resolve(request, "done")


async def close_work_item(request: Request) -> Response:
    return await _resolve(request, "closed")


async def audit_log(request: Request) -> Response:
    principal = await admin(request)
    svc = services(request)
    audit_read(svc.writer, request, principal)
    since, until = time_param(request, "since"), time_param(request, "until")
    entries = await in_thread(repo.list_audit, svc.engine, since=since, until=until, limit=int_param(request, "limit", 100, 10_000))
    return JSON([{"ts": iso(e.ts), "actor_key_id": e.actor_key_id, "actor_owner": e.actor_owner, "action": e.action, "target": e.target} for e in entries])


async def usage(request: Request) -> Response:
    await admin(request)
    group_by = request.query_params.get("group_by", "work_item")
    if group_by not in usage_reports.GROUP_COLUMNS:
        raise InvalidRequest("'group_by' must be work_item, team or model.", param="group_by")
    since, until = time_param(request, "since"), time_param(request, "until")
    svc = services(request)
    rows = await in_thread(usage_reports.usage_grouped, svc.engine, group_by, since, until)
    if group_by == "team":  # the privacy floor, as in the adoption report
        floor = svc.settings.privacy.min_group_size
        rows = [row if row["team"] is None or privacy.shown(svc.keys.team_size(row["team"]), floor) else privacy.withheld(row["team"], floor)
                for row in rows]  # fmt: skip
    return JSON({"group_by": group_by, "since": iso(since), "until": iso(until), "groups": rows})


async def usage_events(request: Request) -> Response:
    principal = await admin(request)
    audit_read(services(request).writer, request, principal)
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
    Route("/api/work-items/{item_id:path}/complete", complete_work_item, methods=["POST"]),
    Route("/api/work-items/{item_id:path}/close", close_work_item, methods=["POST"]),
    Route("/api/work-items/{item_id:path}", get_work_item, methods=["GET"]),
    Route("/api/work-items/{item_id:path}", patch_work_item, methods=["PATCH"]),
    Route("/api/audit", audit_log, methods=["GET"]),
    Route("/api/usage", usage, methods=["GET"]),
    Route("/api/usage/events", usage_events, methods=["GET"]),
    Route("/api/reports/tasks", tasks_report, methods=["GET"]),
]
