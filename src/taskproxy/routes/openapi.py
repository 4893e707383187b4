"""GET /api/openapi.json: the admin and self-service API, described for clients and for schemathesis.
The request bodies' schemas are generated from their pydantic models (bodies.py).

The proxy routes (/v1/*) follow OpenAI's and Anthropic's own published specifications and are not
repeated here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy import __version__
from taskproxy.bodies import Binding, NewKey, NewWorkItem, WorkItemChanges, request_schema
from taskproxy.workitems import ITEM_STATUSES
from taskproxy.routes.common import JSON

_STRING, _INT, _NUMBER = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_TIME = {"type": "string", "description": "ISO 8601 (2026-11-01T00:00:00Z) or a period back from now (30m, 12h, 7d, 2w), from 1970 to 9998"}
_ITEM_ID = {"type": "string", "maxLength": 200, "description": "PROJ-123, owner/repo#12 or a tracker URL; URL-encoded in paths"}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"],
                             "properties": {"message": _STRING, "type": _STRING, "param": _NULLABLE_STRING, "code": _STRING}}},
}  # fmt: skip
_KEY = {"type": "object", "properties": {"id": _STRING, "owner": _STRING, "team": _NULLABLE_STRING, "role": _STRING, "prefix": _STRING,
                                         "created_at": _STRING, "revoked_at": _NULLABLE_STRING}}  # fmt: skip
_ITEM = {"type": "object", "properties": {"id": _STRING, "status": _STRING, "source": _STRING, "title": _NULLABLE_STRING, "team": _NULLABLE_STRING}}
_OBJECT, _ARRAY = {"type": "object"}, {"type": "array", "items": {"type": "object"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _path(name: str, schema: dict[str, Any] = _STRING) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _operation(summary: str, ok: int, body: dict[str, Any], *, params: list[dict] | None = None, request: dict | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {str(ok): {"description": "OK", "content": {"application/json": {"schema": body}}}}
    for status, why in (("400", "bad input"), ("401", "no or unknown key"), ("403", "the key's role may not"), ("404", "not found")):
        responses[status] = {"description": why, "content": {"application/json": {"schema": _ERROR}}}
    operation: dict[str, Any] = {"summary": summary, "responses": responses, "parameters": params or []}
    if request is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
    return operation


def openapi_document() -> dict[str, Any]:
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000})
    period = [_query("since", _TIME), _query("until", _TIME)]
    # The latest stored computation over the last 30 days instead (reports.snapshot_minutes); takes no period or team.
    snapshot = _query("snapshot", {"enum": ["latest"]})
    item = _path("item_id", _ITEM_ID)
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskproxy admin API", "version": __version__,
                 "description": "Keys, work items, usage and reports. Admin routes need an admin key; /api/me/* any key."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/api/keys": {
                "get": _operation("List keys (never their secrets)", 200, {"type": "array", "items": _KEY}),
                "post": _operation("Create a key; the secret is in the answer once", 201,
                                   {**_KEY, "properties": {**_KEY["properties"], "key": _STRING}, "required": ["id", "key", "owner", "team", "role"]},
                                   request=request_schema(NewKey)),
            },
            "/api/keys/{key_id}": {"delete": _operation("Revoke a key", 200, _KEY, params=[_path("key_id")])},
            "/api/work-items": {
                "get": _operation("List work items, newest first, a page at a time: a full page's Link header (rel=next) names the next",
                                  200, {"type": "array", "items": _ITEM},
                                  params=[_query("status", {"enum": list(ITEM_STATUSES)}), _query("team", _STRING), _query("after", _STRING), limit]),
                "post": _operation("Register a work item", 201, _ITEM, request=request_schema(NewWorkItem)),
            },
            "/api/work-items/{item_id}": {
                "get": _operation("One work item: totals, history, cycle time, usage by day", 200, _OBJECT, params=[item]),
                "patch": _operation("Change a work item", 200, _ITEM, params=[item], request=request_schema(WorkItemChanges)),
            },
            "/api/work-items/{item_id}/complete": {"post": _operation("Mark done", 200, _ITEM, params=[item])},
            "/api/work-items/{item_id}/close": {"post": _operation("Mark closed without completion", 200, _ITEM, params=[item])},
            "/api/usage": {"get": _operation("Usage grouped by work item, team or model", 200, _OBJECT,
                                             params=[_query("group_by", {"enum": ["work_item", "team", "model"]}), *period])},
            "/api/usage/events": {"get": _operation("Raw usage events, newest first, a page at a time: a full page's Link header "
                                                    "(rel=next) names the next (audited)", 200, _ARRAY,
                                                    params=[_query("work_item", _ITEM_ID), _query("key_id", _STRING), *period,
                                                            _query("after", _STRING), limit])},
            "/api/reports/tasks": {"get": _operation("Work items by cost", 200, _OBJECT, params=[*period, limit])},
            "/api/reports/adoption": {"get": _operation("Adoption against completed work", 200, _OBJECT, params=[*period, _query("team", _STRING), snapshot])},
            "/api/reports/adoption.csv": {"get": {**_operation("The adoption report as CSV", 200, _STRING, params=[*period, _query("team", _STRING), snapshot]),
                                                  "responses": {"200": {"description": "OK", "content": {"text/csv": {"schema": _STRING}}},
                                                                "400": {"description": "bad input", "content": {"application/json": {"schema": _ERROR}}},
                                                                "401": {"description": "no or unknown key", "content": {"application/json": {"schema": _ERROR}}},
                                                                "403": {"description": "not an admin key", "content": {"application/json": {"schema": _ERROR}}},
                                                                "404": {"description": "no snapshot", "content": {"application/json": {"schema": _ERROR}}}}}},
            "/api/reports/signals": {"get": _operation("Gaming signals: advisory flags about keys, with evidence (audited)", 200, _OBJECT, params=[*period, snapshot])},
            "/api/audit": {"get": _operation("Admin reads of per-key data", 200, _ARRAY, params=[*period, limit])},
            "/api/me/work-item": {
                "get": _operation("The caller's bound work item; with item or branch, also which work item a run would bill (run: "
                                  "{work_item, source: item|branch|binding} or null)", 200, _OBJECT,
                                  params=[_query("item", {"type": "string"}), _query("branch", {"type": "string"})]),
                "put": _operation("Bind a work item to the caller's key", 200, _OBJECT,
                                  request=request_schema(Binding)),
                "delete": _operation("Remove the binding", 200, _OBJECT),
            },
            "/api/me/usage": {"get": _operation("The caller's own usage", 200, _OBJECT,
                                                params=[_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                                                        _query("items", {"type": "integer", "minimum": 1, "maximum": 1000})])},
        },
    }  # fmt: skip


async def openapi(request: Request) -> Response:
    return JSON(openapi_document())


routes = [Route("/api/openapi.json", openapi, methods=["GET"])]
