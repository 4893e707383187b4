"""What any key may do about itself: bind a work item, and read its own usage. Reads the lifespan
state's `keys`, `items` (for id normalization), `policy` (work_items.mode), `engine`, `settings` and
`own_calls` (the lane its database calls take, one request of a key's at a time: routes/lanes.py)."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.bodies import Binding, parse
from taskproxy.errors import WorkItemInvalid
from taskproxy.guard.attribution import Attributed
from taskproxy.workitems import WorkItemIds
from taskproxy.reports import usage as usage_reports
from taskproxy.records import event_json
from taskproxy.routes.common import JSON, caller, int_param, json_object
from taskproxy.storage import repo
from taskproxy.timeutil import iso, utcnow


async def get_binding(request: Request) -> Response:
    """The key's binding; with `item` or `branch`, also which work item a run would bill (`taskproxy run`):
    the item, else the one the branch names (by this proxy's patterns), else the binding; each as the
    model routes would take it (`work_items.mode`), so that a run the proxy would refuse is refused
    before its agent starts. A branch naming an item the mode refuses gives way to the binding."""
    principal = await caller(request)
    current = principal.binding(utcnow())
    found = {"work_item": current, "expires_at": iso(principal.bound_until) if current else None}
    item, branch = request.query_params.get("item"), request.query_params.get("branch")
    if item is None and branch is None:
        return JSON(found)
    ids = request.state.items.ids
    chosen = None
    if item:
        chosen = Attributed(ids.normalize(item), "item")
    elif branch and (named := _named_by(ids, branch)):
        chosen = Attributed(named, "branch")
    elif current:
        chosen = Attributed(current, "binding")
    if chosen is None:
        return JSON({**found, "run": None})
    chosen, _ = await request.state.policy.check_attributed(chosen, current)
    return JSON({**found, "run": {"work_item": chosen.work_item, "source": chosen.source}})


def _named_by(ids: WorkItemIds, branch: str) -> str | None:
    try:
        return ids.from_branch(branch)
    except WorkItemInvalid:  # a branch too long or odd to name one
        return None


async def put_binding(request: Request) -> Response:
    principal = await caller(request)
    binding = parse(Binding, await json_object(request))
    work_item = request.state.items.ids.normalize(binding.work_item)
    own_calls, ttl = request.state.own_calls, request.state.settings.work_items.binding_ttl_hours
    with own_calls.turn_of(principal.key_id):
        await request.state.policy.check(work_item)  # a binding the model routes would refuse binds nothing
        until = await own_calls.run(request.state.keys.bind, principal, work_item, ttl)
    return JSON({"work_item": work_item, "expires_at": iso(until)})


async def delete_binding(request: Request) -> Response:
    principal = await caller(request)
    own_calls = request.state.own_calls
    with own_calls.turn_of(principal.key_id):
        await own_calls.run(request.state.keys.bind, principal, None, request.state.settings.work_items.binding_ttl_hours)
    return JSON({"work_item": None, "expires_at": None})


async def my_usage(request: Request) -> Response:
    principal = await caller(request)
    engine, own_calls = request.state.engine, request.state.own_calls
    limit, items = int_param(request, "limit", 20, 1000), int_param(request, "items", usage_reports.MY_ITEMS, 1000)
    with own_calls.turn_of(principal.key_id):
        events, (per_item, items_used), rejected = await own_calls.run(_own_usage, engine, principal.key_id, limit, items)
    return JSON(
        {
            "key_id": principal.key_id,
            "owner": principal.owner,
            "team": principal.team,
            "work_item": principal.binding(utcnow()),
            "work_items": per_item,
            "work_items_total": items_used,
            "rejected_requests": rejected,
            "recent_events": [event_json(e) for e in events],
        }
    )


def _own_usage(engine: Engine, key_id: str, limit: int, items: int) -> tuple[list, tuple[list, int], dict[str, int]]:
    """A key's latest events, its usage per item and its refusals, read in one turn of the lane."""
    return (repo.list_events(engine, key_id=key_id, limit=limit), usage_reports.usage_for_key(engine, key_id, items),
            usage_reports.rejections_by_reason(engine, key_id=key_id))  # fmt: skip


routes = [
    Route("/api/me/work-item", get_binding, methods=["GET"]),
    Route("/api/me/work-item", put_binding, methods=["PUT"]),
    Route("/api/me/work-item", delete_binding, methods=["DELETE"]),
    Route("/api/me/usage", my_usage, methods=["GET"]),
]
