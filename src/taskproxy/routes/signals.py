"""GET /api/reports/signals (admin only): the gaming signals, computed in a report process
(reports/runner.py), or their latest snapshot (`?snapshot=latest`, reports/snapshots.py). The answer names keys and owners, so every read is audit-logged, like the other
reads of per-key data."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.audit import audit_read
from taskproxy.reports.named import SIGNALS, signal_options
from taskproxy.routes.common import JSON, admin, unless_client_leaves
from taskproxy.routes.reports import latest_snapshot, period, snapshot_response, snapshot_wanted


async def signals(request: Request) -> Response:
    principal = await admin(request)
    if snapshot_wanted(request, alone=("since", "until")):
        snapshot = await latest_snapshot(request, "signals")
        audit_read(request.state.audit, request, principal, snapshot=(snapshot.since, snapshot.until))
        return snapshot_response(request, snapshot)
    since, until = period(request)
    audit_read(request.state.audit, request, principal)
    report = request.state.reports.run(SIGNALS, encode=orjson.dumps, since=since, until=until, **signal_options(request.state.settings))
    answer = await unless_client_leaves(request, report)
    return Response(answer, media_type=JSON.media_type)


routes = [Route("/api/reports/signals", signals, methods=["GET"])]
