"""Report routes under /api/reports/ (admin only): the adoption report as JSON and as CSV, computed for
the period asked, or its latest snapshot (`?snapshot=latest`, reports/snapshots.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from taskproxy.errors import InvalidRequest
from taskproxy.reports.named import ADOPTION, adoption_options
from taskproxy.reports.adoption_export import adoption_csv
from taskproxy.reports.snapshots import check_asked_alone, check_on, for_team, kept_name, latest, report_of, snapshot_csv, unpacked
from taskproxy.routes.common import JSON, admin, time_param, unless_client_leaves
from taskproxy.storage.snapshots import Snapshot
from taskproxy.timeutil import report_period, utcnow


def period(request: Request) -> tuple[datetime, datetime]:
    """`since` and `until` from the query: `until` defaults to now, `since` to 30 days before `until`."""
    return report_period(time_param(request, "since"), time_param(request, "until"))


def snapshot_wanted(request: Request, alone: tuple[str, ...] = ("since", "until", "team")) -> bool:
    """`?snapshot=latest`: the latest snapshot is wanted, not a computation; it takes none of the
    route's parameters `alone` (its period, its team)."""
    value = request.query_params.get("snapshot")
    if value is None:
        return False
    if value != "latest":
        raise InvalidRequest(f"'snapshot' takes one value, 'latest', not {value[:40]!r}.", param="snapshot")
    check_asked_alone({name: request.query_params.get(name) for name in alone})
    return True


async def latest_snapshot(request: Request, name: str) -> Snapshot:
    """The latest snapshot of the report `name`, or 404 saying why there is none."""
    settings = request.state.settings
    check_on(settings)
    return await request.state.api_calls.run(latest, request.state.engine, kept_name(settings, name))  # type: ignore[no-any-return]


def snapshot_headers(computed_at: datetime) -> dict[str, str]:
    """When the snapshot was computed: `Age` in seconds and `Last-Modified`, as HTTP caches say it."""
    age = max(0, int((utcnow() - computed_at).total_seconds()))
    # private, no-cache: a cache may keep it, but asks each time (a read of the signals is audited)
    return {"age": str(age), "last-modified": format_datetime(computed_at.replace(tzinfo=UTC), usegmt=True),
            "cache-control": "private, no-cache"}  # fmt: skip


def _accepts_gzip(request: Request) -> bool:
    """The client takes gzip: `gzip` (or else `*`) in Accept-Encoding, with a weight above 0."""
    weights: dict[str, float] = {}
    for coding in request.headers.get("accept-encoding", "").split(","):
        name, _, parameters = coding.partition(";")
        weight = parameters.strip().lower().removeprefix("q=")
        try:
            weights[name.strip().lower()] = float(weight) if weight else 1.0
        except ValueError:
            weights[name.strip().lower()] = 1.0
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def snapshot_response(request: Request, snapshot: Snapshot) -> Response:
    """A snapshot's JSON: the stored gzip as it is to a client that takes it, else unpacked piece by
    piece (in a worker thread: StreamingResponse iterates a plain iterator there)."""
    headers = {**snapshot_headers(snapshot.computed_at), "vary": "accept-encoding"}
    if _accepts_gzip(request):
        return Response(snapshot.body, media_type=JSON.media_type, headers={**headers, "content-encoding": "gzip"})
    return StreamingResponse(unpacked(snapshot.body), media_type=JSON.media_type, headers=headers)


async def _report(request: Request, encode: Callable[[dict[str, Any]], Any]) -> Any:
    """The adoption report, computed and encoded in a report process (reports/runner.py)."""
    since, until = period(request)
    team = request.query_params.get("team") or None
    options = adoption_options(request.state.settings)
    return await unless_client_leaves(
        request, request.state.reports.run(ADOPTION, encode=encode, since=since, until=until, team=team, **options)
    )


async def adoption(request: Request) -> Response:
    await admin(request)
    if snapshot_wanted(request, alone=("since", "until")):
        snapshot = await latest_snapshot(request, "adoption")
        if team := request.query_params.get("team"):  # one team's part of it, as computing with `team` gives
            body = await request.state.api_calls.run(lambda: orjson.dumps(for_team(report_of(snapshot), team)))
            return Response(body, media_type=JSON.media_type, headers=snapshot_headers(snapshot.computed_at))
        return snapshot_response(request, snapshot)
    return Response(await _report(request, orjson.dumps), media_type=JSON.media_type)


async def adoption_as_csv(request: Request) -> Response:
    await admin(request)
    headers = {"content-disposition": 'attachment; filename="adoption.csv"'}
    if snapshot_wanted(request):
        check_on(request.state.settings)
        name = kept_name(request.state.settings, "adoption")
        csv, computed_at = await unless_client_leaves(request, request.state.reports.run(snapshot_csv, name=name))  # made in a report process
        return Response(csv, media_type="text/csv", headers={**headers, **snapshot_headers(computed_at)})
    return Response(await _report(request, adoption_csv), media_type="text/csv", headers=headers)


routes = [
    Route("/api/reports/adoption", adoption, methods=["GET"]),
    Route("/api/reports/adoption.csv", adoption_as_csv, methods=["GET"]),
]
