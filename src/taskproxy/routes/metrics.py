"""GET /metrics: the Prometheus text (metrics.py), for an admin key (Prometheus: `authorization:
{credentials: <key>}` in the scrape config). Reads the lifespan state's `keys` and `metrics`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.routes.common import admin


async def metrics(request: Request) -> Response:
    await admin(request)
    return Response(request.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


routes = [Route("/metrics", metrics, methods=["GET"])]
