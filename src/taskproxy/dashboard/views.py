"""The dashboard's pages: server-rendered HTML, inline SVG, nothing from the internet.

    /dashboard                 admin: adoption against completed work, per team (privacy floor), top items
    /dashboard/items/{id}      admin: one work item's usage over time, models, status history, cycle time
    /dashboard/signals         admin: the gaming signals, advisory, with their evidence (audit-logged)
    /dashboard/me              anyone with a key: what is recorded about them, and who can see it
    /dashboard/login, /logout  a proxy key in, a signed HttpOnly cookie out (see `session`)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from taskproxy import privacy
from taskproxy.audit import audit_read
from taskproxy.dashboard import format as fmt
from taskproxy.dashboard import session as sessions
from taskproxy.dashboard.charts import Point, bar_chart
from taskproxy.dashboard.fields import EVENT_FIELD_MEANINGS, EVENT_FIELDS
from taskproxy.dashboard.session import Session
from taskproxy.dashboard.templating import render
from taskproxy.errors import ApiError, NotFound, RateLimited, WorkItemInvalid
from taskproxy.reports.named import overview_snapshot_name, signal_options
from taskproxy.reports.snapshots import kept_name
from taskproxy.routes.common import unless_client_leaves
from taskproxy.routes.reports import period
from taskproxy.timeutil import utcnow

if TYPE_CHECKING:
    from taskproxy.dashboard import data

log = logging.getLogger("taskproxy.dashboard")

MAX_FORM_BYTES = 8 * 1024
PERIODS = (("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"))
View = Callable[[Request, Session], Awaitable[Response]]


# -- sessions and access --------------------------------------------------------------------------


async def current_session(request: Request) -> Session | None:
    key_id = request.state.sessions.verify(request.cookies.get(sessions.COOKIE))
    if key_id is None:
        return None
    own_calls = request.state.own_calls
    with own_calls.turn_of(key_id):  # a key's own calls, one at a time (routes/lanes.py): a 429 page past that
        return await own_calls.run(sessions.load_principal, request.state.engine, key_id)  # type: ignore[no-any-return]


def _safe_next(value: str | None) -> str | None:
    """A path on this dashboard to return to after logging in; anything else (another host, //x) is dropped."""
    if not value or "\\" in value or any(ord(c) < 32 for c in value) or value.startswith("//"):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:  # an invalid IPv6 host (`/dashboard?x=//[`): no path of ours
        return None
    if parts.scheme or parts.netloc or not value.startswith("/dashboard") or value.startswith("//"):
        return None
    if ".." in unquote(parts.path).split("/"):  # /dashboard/../api/keys (or %2e%2e): out of the dashboard once resolved
        return None
    if parts.path.startswith(("/dashboard/login", "/dashboard/logout")):
        return None
    return value


def _to_login(request: Request, *, had_cookie: bool) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/dashboard/login?next={quote(target, safe='/')}", status_code=303)
    if had_cookie:  # expired, tampered with, or its key was revoked
        sessions.clear_cookie(response, request)
    return response


def _error_page(request: Request, status: int, title: str, message: str, session: Session | None) -> Response:
    return render(request, "error.html", {"status": status, "title": title, "message": message, "nav": ""}, status=status, session=session)


def page(*, admin_only: bool) -> Callable[[View], Callable[[Request], Awaitable[Response]]]:
    """A dashboard page: needs a session (else: to the login form), an admin's for `admin_only`
    (else: 403 with a link to the visitor's own page); errors become an HTML page with their status."""

    def decorate(view: View) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(view)
        async def endpoint(request: Request) -> Response:
            session: Session | None = None
            try:
                session = await current_session(request)
                if session is None:
                    return _to_login(request, had_cookie=sessions.COOKIE in request.cookies)
                if admin_only and not session.principal.is_admin:
                    message = "This page shows figures about everyone's work and needs an admin key."
                    return render(request, "forbidden.html", {"message": message, "nav": ""}, status=403, session=session)
                return await view(request, session)
            except ApiError as exc:
                shown = _error_page(request, exc.status, "That did not work", exc.message, session)
                if isinstance(exc, RateLimited):  # a key's pages take their turn (routes/lanes.py): when to ask again
                    shown.headers["retry-after"] = str(exc.retry_after)
                return shown
            except SQLAlchemyError as exc:
                log.warning("dashboard: the database failed on %s: %s", request.url.path, exc.__class__.__name__)
                return _error_page(request, 503, "The database does not answer", "Try again in a moment.", session)

        return endpoint

    return decorate


# -- login and logout -----------------------------------------------------------------------------


def _same_origin(request: Request) -> bool:
    """A form post from a page of this server (Origin or Sec-Fetch-Site say so, when the browser sends them)."""
    if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # `http://[`: no origin at all, so not ours
        return False
    return origin != "null" and netloc == request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FORM_BYTES:
            return {}
    try:
        fields = parse_qs(raw.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:  # more fields than the forms have: none of ours
        return {}
    return {name: values[0] for name, values in fields.items()}


async def login_form(request: Request) -> Response:
    try:
        session = await current_session(request)
    except (SQLAlchemyError, ApiError):  # the form works while the database is down, or the key's turn is taken; signing in will say so
        session = None
    context = {"error": None, "next": _safe_next(request.query_params.get("next")) or "", "nav": "login",
               "signed_out": "signed_out" in request.query_params}  # fmt: skip
    return render(request, "login.html", context, session=session)


async def login(request: Request) -> Response:
    if not _same_origin(request):
        return _error_page(request, 403, "Sign-in refused", "The sign-in form was sent from another site.", None)
    form = await _form(request)
    key = form.get("key", "").strip()
    next_path = _safe_next(form.get("next"))
    error, status = None, 400
    principal = None
    if not key:
        error = "Enter your proxy key (it starts with tp-)."
    elif not key.isascii():  # a header cannot carry it; no key has such characters (a dash or quote pasted from a chat, say)
        error = "That key was not accepted: a proxy key has only letters, digits, '-' and '_'."
    else:
        try:
            principal = await request.state.keys.authenticate(Headers({"authorization": f"Bearer {key}"}))
        except ApiError as exc:
            error = "That key was not accepted: it is unknown or revoked." if exc.status == 401 else exc.message
            status = exc.status
    if principal is None:
        context = {"error": error, "next": next_path or "", "nav": "login", "signed_out": False}
        return render(request, "login.html", context, status=status)
    if principal.is_admin:
        target = next_path or "/dashboard"
    else:  # the other pages would only answer 403
        target = next_path if next_path and urlsplit(next_path).path == "/dashboard/me" else "/dashboard/me"
    response = RedirectResponse(target, status_code=303)
    sessions.set_cookie(response, request, request.state.sessions.sign(principal.key_id))
    log.info("dashboard: %s (%s) signed in", principal.key_id, principal.role)
    return response


async def logout(request: Request) -> Response:
    if request.method == "POST" and not _same_origin(request):
        return _error_page(request, 403, "Sign-out refused", "The sign-out form was sent from another site.", None)
    response = RedirectResponse("/dashboard/login?signed_out=1", status_code=303)
    sessions.clear_cookie(response, request)
    return response


# -- admin pages ----------------------------------------------------------------------------------


def _week_points(weeks: list[dict[str, Any]]) -> list[Point]:
    return [
        Point(fmt.day(w["since"]).rsplit(" ", 1)[0], w["median"], f"{w['completed_items']} completed, {w['ai_assisted_items']} AI-assisted")
        for w in weeks
    ]


async def _kept(request: Request, read: Callable[[], Awaitable[data.Kept]]) -> data.Kept | None:
    """The page's latest snapshot, for the default period (no period picked) when snapshots are on
    (a computation takes minutes on a large organisation); None, to compute the page, otherwise and
    before the first snapshot."""
    if not request.state.settings.reports.snapshot_minutes or request.query_params.get("since") or request.query_params.get("until"):
        return None
    try:
        return await read()
    except NotFound:
        return None


@page(admin_only=True)
async def overview(request: Request, session: Session) -> Response:
    from taskproxy.dashboard import data  # with the report modules, 3.5 MiB: imported at the first page that needs it

    settings = request.state.settings
    name = overview_snapshot_name(settings)
    kept = await _kept(request, lambda: request.state.api_calls.run(data.kept_overview, request.state.engine, name))
    if kept is not None:
        view, since, until = kept.view, kept.since, kept.until
    else:
        since, until = period(request)
        view = await unless_client_leaves(request, request.state.reports.run(data.overview, settings=settings, since=since, until=until))
    chart = bar_chart(
        _week_points(view.weeks),
        chart_id="weekly-cost",
        title="Median cost per completed AI-assisted item, by week",
        description=f"Weekly medians for the {len(view.weeks)} calendar weeks up to {fmt.when(until)}; weeks with no completed "
        "AI-assisted item have no bar. The same figures are in the table below the chart.",
        fmt=fmt.money,
    )
    context = {"nav": "overview", "report": view.report, "weeks": view.weeks, "top_items": view.top_items, "chart": chart,
               "since": since, "until": until, "periods": PERIODS, "min_group_size": settings.privacy.min_group_size,
               "rework_days": settings.reports.rework_days, "kept": kept}  # fmt: skip
    return render(request, "overview.html", context, session=session)


@page(admin_only=True)
async def work_item(request: Request, session: Session) -> Response:
    from taskproxy.dashboard import data  # with the report modules, 3.5 MiB: imported at the first page that needs it

    raw = request.path_params["item_id"]
    try:
        item_id = request.state.items.ids.normalize(raw)
    except WorkItemInvalid:
        item_id = raw  # an id recorded under other patterns can still be looked up as it is
    view = await request.state.api_calls.run(data.work_item, request.state.engine, item_id)
    if view is None:
        return _error_page(request, 404, "No such work item", f"No work item {item_id!r} is registered or has usage.", session)
    days = data.usage_days(view["usage_by_day"])
    chart = bar_chart(
        [Point(fmt.day(d["day"]).rsplit(" ", 1)[0], d["total_tokens"], f"{d['requests']} requests, {fmt.money(d['cost_usd'])}") for d in days],
        chart_id="item-usage",
        title=f"Tokens per day on {item_id}",
        description="Total tokens (prompt and completion) per UTC day; the table below lists every day with usage.",
        fmt=lambda v: fmt.number(round(v)) if v is not None else fmt.NONE,
    )
    return render(request, "item.html", {"nav": "", "item": view, "chart": chart}, session=session)


@page(admin_only=True)
async def signals(request: Request, session: Session) -> Response:
    from taskproxy.dashboard import data  # with the report modules, 3.5 MiB: imported at the first page that needs it

    name = kept_name(request.state.settings, "signals")
    kept = await _kept(request, lambda: unless_client_leaves(request, request.state.reports.run(data.kept_signals_page, name=name)))
    # Signals name keys and owners: per-key data, audited before it is shown (with the period of
    # the snapshot shown, which the request does not tell).
    audit_read(request.state.audit, request, session.principal, snapshot=None if kept is None else (kept.since, kept.until))
    if kept is not None:
        report, since, until = kept.view, kept.since, kept.until
    else:
        since, until = period(request)
        # The options GET /api/reports/signals uses (the config's `signals:` thresholds, the projects' teams).
        options = signal_options(request.state.settings)
        report = await unless_client_leaves(request, request.state.reports.run(data.signals_page, since=since, until=until, **options))
    context = {"nav": "signals", "report": report, "since": since, "until": until, "periods": PERIODS, "kept": kept}
    return render(request, "signals.html", context, session=session)


# -- everyone's own page --------------------------------------------------------------------------


@page(admin_only=False)
async def me(request: Request, session: Session) -> Response:
    from taskproxy.dashboard import data  # with the report modules, 3.5 MiB: imported at the first page that needs it

    settings = request.state.settings
    principal = session.principal
    own_calls = request.state.own_calls
    with own_calls.turn_of(principal.key_id):
        mine = await own_calls.run(data.my_data, request.state.engine, principal.key_id, principal.team)
    now = utcnow()
    context = {
        "nav": "me",
        "principal": principal,
        "prefix": session.prefix,
        "binding": principal.binding(now),
        "bound_until": principal.bound_until if principal.binding(now) else None,
        "fields": [(name, EVENT_FIELD_MEANINGS.get(name, "")) for name in EVENT_FIELDS],
        "store_prompts": settings.recording.store_prompts,
        "min_group_size": settings.privacy.min_group_size,
        "team_shown": mine["team_people"] is not None and privacy.shown(mine["team_people"], settings.privacy.min_group_size),
        **mine,
    }
    return render(request, "me.html", context, session=session)


# -- the stylesheet -------------------------------------------------------------------------------

async def stylesheet(request: Request) -> Response:
    return Response(request.state.pages.stylesheet, media_type="text/css", headers={"cache-control": "public, max-age=3600", "x-content-type-options": "nosniff"})


routes = [
    Route("/dashboard", overview, methods=["GET"]),
    Route("/dashboard/login", login_form, methods=["GET"]),
    Route("/dashboard/login", login, methods=["POST"]),
    Route("/dashboard/logout", logout, methods=["GET", "POST"]),
    Route("/dashboard/me", me, methods=["GET"]),
    Route("/dashboard/signals", signals, methods=["GET"]),
    Route("/dashboard/items/{item_id:path}", work_item, methods=["GET"]),
    Route("/dashboard/static/dashboard.css", stylesheet, methods=["GET"]),
]
