"""Report routes under /api/reports/ (admin only): the adoption report as JSON and as CSV."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.reports.adoption import adoption_options, adoption_report
from taskproxy.reports.adoption_export import adoption_csv
from taskproxy.routes.common import JSON, admin, time_param, unless_client_leaves
from taskproxy.timeutil import report_period



def period(request: Request) -> tuple[datetime, datetime]:
    """`since` and `until` from the query: `until` defaults to now, `since` to 30 days before `until`."""
    return report_period(time_param(request, "since"), time_param(request, "until"))


async def _report(request: Request, encode: Callable[[dict[str, Any]], Any]) -> Any:
    """The adoption report, computed and encoded in a report process (reports/runner.py)."""
    await admin(request)
    since, until = period(request)
    team = request.query_params.get("team") or None
    options = adoption_options(request.state.settings)
    return await unless_client_leaves(
        request, request.state.reports.run(adoption_report, encode=encode, since=since, until=until, team=team, **options)
    )


async def adoption(request: Request) -> Response:
    return Response(await _report(request, orjson.dumps), media_type=JSON.media_type)


async def adoption_as_csv(request: Request) -> Response:
    headers = {"content-disposition": 'attachment; filename="adoption.csv"'}
    return Response(await _report(request, adoption_csv), media_type="text/csv", headers=headers)


routes = [
    Route("/api/reports/adoption", adoption, methods=["GET"]),
    Route("/api/reports/adoption.csv", adoption_as_csv, methods=["GET"]),
]
