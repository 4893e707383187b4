"""The admin API under /api/: keys, work items, usage. Every route needs an admin key.

Reads the app's lifespan state: `keys` (KeyStore), `items` (WorkItems), `engine`, `settings`,
`audit` (where reads of per-key data are written down).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy import privacy
from taskproxy.audit import audit_read
from taskproxy.bodies import NewKey, parse
from taskproxy.errors import InvalidRequest, NotFound
from taskproxy.records import event_json, item_json, key_json
from taskproxy.registry import WorkItems
from taskproxy.workitems import ITEM_STATUSES
from taskproxy.reports import usage as usage_reports
from taskproxy.reports.items import work_item_view
from taskproxy.reports.named import TASKS, USAGE
from taskproxy.routes.common import JSON, admin, after_param, int_param, json_object, next_page, open_period, unless_client_leaves
from taskproxy.storage import repo
from taskproxy.timeutil import iso


async def create_key(request: Request) -> Response:
    await admin(request)
    new = parse(NewKey, await json_object(request))
    key, token = await request.state.api_calls.run(request.state.keys.issue, owner=new.owner, team=new.team, role=new.role)
    return JSON({**key_json(key), "key": token}, status_code=201)


async def list_keys(request: Request) -> Response:
    principal = await admin(request)
    audit_read(request.state.audit, request, principal)
    keys = await request.state.api_calls.run(repo.list_keys, request.state.engine)
    return JSON([key_json(k) for k in keys])


async def revoke_key(request: Request) -> Response:
    await admin(request)
    return JSON(key_json(await request.state.api_calls.run(request.state.keys.revoke, request.path_params["key_id"])))


async def get_work_item(request: Request) -> Response:
    await admin(request)
    items: WorkItems = request.state.items
    item_id = items.ids.normalize(request.path_params["item_id"])
    view = await request.state.api_calls.run(work_item_view, request.state.engine, item_id)
    if view is None:
        raise NotFound(f"No work item {item_id!r} is registered or has usage.")
    return JSON(view)


async def list_work_items(request: Request) -> Response:
    await admin(request)
    status = request.query_params.get("status")
    if status and status not in ITEM_STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(ITEM_STATUSES)}.", param="status")
    limit = int_param(request, "limit", 1000, 10_000)
    items = await request.state.api_calls.run(repo.list_work_items, request.state.engine, status=status, team=request.query_params.get("team"),
                                              after=after_param(request), limit=limit)  # fmt: skip
    return next_page(JSON([item_json(i) for i in items]), request, items, limit, (items[-1].created_at, items[-1].id) if items else None)


async def create_work_item(request: Request) -> Response:
    await admin(request)
    body = await json_object(request)
    return JSON(item_json(await request.state.api_calls.run(request.state.items.register, body)), status_code=201)


async def patch_work_item(request: Request) -> Response:
    await admin(request)
    body = await json_object(request)
    return JSON(item_json(await request.state.api_calls.run(request.state.items.update, request.path_params["item_id"], body)))


async def complete_work_item(request: Request) -> Response:
    await admin(request)
    item = await request.state.api_calls.run(request.state.items.resolve, request.path_params["item_id"], "done", source="api")
    return JSON(item_json(item))


async def close_work_item(request: Request) -> Response:
    await admin(request)
    item = await request.state.api_calls.run(request.state.items.resolve, request.path_params["item_id"], "closed", source="api")
    return JSON(item_json(item))


async def audit_log(request: Request) -> Response:
    principal = await admin(request)
    audit_read(request.state.audit, request, principal)
    since, until = open_period(request)
    limit = int_param(request, "limit", 100, 10_000)
    entries = await request.state.api_calls.run(repo.list_audit, request.state.engine, since=since, until=until, limit=limit)
    return JSON([{"ts": iso(e.ts), "actor_key_id": e.actor_key_id, "actor_owner": e.actor_owner, "action": e.action, "target": e.target} for e in entries])


async def usage(request: Request) -> Response:
    await admin(request)
    group_by = request.query_params.get("group_by", "work_item")
    if group_by not in usage_reports.GROUP_COLUMNS:
        raise InvalidRequest("'group_by' must be work_item, team or model.", param="group_by")
    since, until = open_period(request)
    rows = await unless_client_leaves(request, request.state.reports.run(USAGE, group_by=group_by, since=since, until=until))
    if group_by == "team":  # the privacy floor, as in the adoption report
        floor = request.state.settings.privacy.min_group_size
        sizes = await request.state.api_calls.run(privacy.sizes_at, request.state.engine, until)  # the people at the period's end
        people = {row["team"]: sizes.get(row["team"], 0) for row in rows}
        held = privacy.withheld_groups(people, people, floor)  # the rows' sum is group_by=model's total
        # The withheld rows after the rows shown, by name: left where their cost ranked them, each one's
        # place between two shown teams bounded its spend.
        withheld = sorted((row for row in rows if row["team"] in held), key=lambda row: row["team"] or "")
        rows = [row for row in rows if row["team"] not in held] + [
            {"team": row["team"], **privacy.withheld(row["team"], floor, people=people[row["team"]])} for row in withheld]
    return JSON({"group_by": group_by, "since": iso(since), "until": iso(until), "groups": rows})


async def usage_events(request: Request) -> Response:
    principal = await admin(request)
    audit_read(request.state.audit, request, principal)
    item = request.query_params.get("work_item")
    work_item = request.state.items.ids.normalize(item) if item else None
    limit = int_param(request, "limit", 100, 10_000)
    since, until = open_period(request)
    events = await request.state.api_calls.run(repo.list_events, request.state.engine, work_item=work_item, key_id=request.query_params.get("key_id"),
                                               since=since, until=until, after=after_param(request), limit=limit)  # fmt: skip
    return next_page(JSON([event_json(e) for e in events]), request, events, limit, (events[-1].ts, events[-1].id) if events else None)


async def tasks_report(request: Request) -> Response:
    await admin(request)
    since, until = open_period(request)
    limit = int_param(request, "limit", 50, 10_000)
    return JSON(await unless_client_leaves(request, request.state.reports.run(TASKS, since=since, until=until, limit=limit)))


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
