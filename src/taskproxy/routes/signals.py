"""GET /api/reports/signals (admin only): the gaming signals. The answer names keys and
owners, so every read is audit-logged, like the other reads of per-key data."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.audit import audit_read
from taskproxy.reports.signals import gaming_signals
from taskproxy.routes.common import JSON, admin, in_thread
from taskproxy.routes.reports import period


async def signals(request: Request) -> Response:
    principal = await admin(request)
    since, until = period(request)
    audit_read(request.state.audit, request, principal)
    thresholds = request.state.settings.signals
    return JSON(await in_thread(gaming_signals, request.state.engine, since=since, until=until, thresholds=thresholds))


routes = [Route("/api/reports/signals", signals, methods=["GET"])]
