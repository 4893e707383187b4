"""GET /api/reports/signals (admin only): the gaming signals (DESIGN §9). The answer names keys and
owners, so every read is audit-logged, like the other reads of per-key data."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.audit import audit_read
from taskproxy.reports.signals import gaming_signals, thresholds_from
from taskproxy.routes.common import JSON, admin, in_thread
from taskproxy.routes.reports import period
from taskproxy.services import services


async def signals(request: Request) -> Response:
    principal = await admin(request)
    since, until = period(request)
    svc = services(request)
    audit_read(svc.writer, request, principal)
    # `signals:` in the config; the defaults until settings.py has that section.
    thresholds = thresholds_from(getattr(svc.settings, "signals", None))
    return JSON(await in_thread(gaming_signals, svc.engine, since=since, until=until, thresholds=thresholds))


routes = [Route("/api/reports/signals", signals, methods=["GET"])]
