"""Report routes under /api/reports/ (admin only): the adoption report as JSON and as CSV."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.reports.adoption import adoption_options, adoption_report
from taskproxy.reports.adoption_export import adoption_csv
from taskproxy.routes.common import JSON, admin, in_thread, time_param
from taskproxy.timeutil import report_period



def period(request: Request) -> tuple[datetime, datetime]:
    """`since` and `until` from the query: `until` defaults to now, `since` to 30 days before `until`."""
    return report_period(time_param(request, "since"), time_param(request, "until"))


async def _report(request: Request) -> dict[str, Any]:
    await admin(request)
    since, until = period(request)
    team = request.query_params.get("team") or None
    settings = request.state.settings
    return await in_thread(  # type: ignore[no-any-return]
        adoption_report,
        request.state.engine,
        since=since,
        until=until,
        team=team,
        **adoption_options(settings),
    )


async def adoption(request: Request) -> Response:
    return JSON(await _report(request))


async def adoption_as_csv(request: Request) -> Response:
    report = await _report(request)
    headers = {"content-disposition": 'attachment; filename="adoption.csv"'}
    return Response(adoption_csv(report), media_type="text/csv", headers=headers)


routes = [
    Route("/api/reports/adoption", adoption, methods=["GET"]),
    Route("/api/reports/adoption.csv", adoption_as_csv, methods=["GET"]),
]
