"""The app factory. Nothing is created at import: clients, the writer and the caches are opened in the
lifespan, handed to the routes as the lifespan's state (each route reads what it uses from
`request.state`), and closed (the writer drained) when it ends."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from collections.abc import AsyncIterator
from datetime import timedelta
from contextlib import asynccontextmanager
from functools import partial

import anyio
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from taskproxy import __version__, privacy
from taskproxy.error_shapes import api_format_before_routing, api_format_of, error_response
from taskproxy.errors import ApiError, ClientGone, HeadersTooLarge, InternalError, InvalidRequest, MethodNotAllowed, NotFound, ServiceUnavailable
from taskproxy.guard.attribution import Attribution
from taskproxy.guard.auth import NO_TEAM, KeyStore, ensure_bootstrap_admin
from taskproxy.guard.body import BodyGate
from taskproxy.guard.budgets import Budgets
from taskproxy.guard.items import ItemCache, Policy
from taskproxy.guard.per_key import PerKey
from taskproxy.guard.ratelimit import RateLimiter
from taskproxy.guard.reload import Wakeup, follow_changes, reload_forever
from taskproxy.storage.changes import ChangeFeed
from taskproxy.metering.pricing import prices_for
from taskproxy.metering.tokens import EncodingsUnavailable, TokenCounter
from taskproxy.metering.attempts import Attempts
from taskproxy.readiness import Readiness
from taskproxy.registry import WorkItems
from taskproxy.reports.named import OVERVIEW, overview_snapshot_name
from taskproxy.reports.runner import ReportRunner
from taskproxy.reports.snapshots import SnapshotKeeper, kept_name, snapshot_reports
from taskproxy.routes import admin, anthropic, me, openai, openapi, reports, stored, webhooks
from taskproxy.routes.stored import StoredResponses
from taskproxy.background import Collector
from taskproxy.routes.webhooks import WEBHOOK_LARGE_BODIES_AT_ONCE, RefusalLog
from taskproxy.guard.response_origins import ResponseOrigins
from taskproxy.routes import metrics as metrics_routes
from taskproxy.routes import signals as signal_routes
from taskproxy.dashboard.views import routes as dashboard_routes
from taskproxy.dashboard.session import SessionSigner
from taskproxy.dashboard.templating import Pages
from taskproxy.routes.admission import Admission
from taskproxy.routes.common import JSON
from taskproxy.routes.endpoint import Translation
from taskproxy.routes.lanes import API_AT_ONCE, OWN_AT_ONCE, OWN_PER_KEY, WEBHOOKS_AT_ONCE, Lane
from taskproxy.routes.proxy import ProxyFlow
from taskproxy.settings import ANTHROPIC, OPENAI_COMPATIBLE, Settings
from taskproxy.storage import partitions
from taskproxy.storage.db import ReportSession, make_engine, prepare_schema
from taskproxy.threads import finish_within
from taskproxy.metrics import SMALL_TEAMS, Metrics
from taskproxy.storage.failures import QUERY_CANCELED, RETRY_SECONDS, sqlstate, unavailable
from taskproxy.storage.writer import BatchWriter
from taskproxy.timeutil import utcnow
from taskproxy.trackers.base import Tracker
from taskproxy.trackers.github import GitHub
from taskproxy.trackers.gitlab import GitLab
from taskproxy.trackers.jira import Jira
from taskproxy.trackers.linear import Linear
from taskproxy.upstream.aiohttp_client import AiohttpClient
from taskproxy.upstream.provider import ProviderClient
from taskproxy.upstream.translate import Translator
from taskproxy.workitems import WorkItemIds

log = logging.getLogger("taskproxy")

NATIVE_PROVIDERS = frozenset({OPENAI_COMPATIBLE, ANTHROPIC})
PARTITIONS_EVERY_SECONDS = 3600.0
READY_WAIT_SECONDS = 2.0  # /readyz waits this long for the database at most
COUNTING_THREADS = 2  # count_tokens answered locally (tiktoken) at once: threads of their own
STOP_STEP_SECONDS = 5.0  # at shutdown, a step that talks to the database is waited for this long at most


async def root(request: Request) -> Response:
    return JSON({"service": "taskproxy", "version": __version__, "openai": "/v1", "anthropic": "/v1/messages", "admin": "/api"})


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: the database answers, and usage can be recorded (written, or at least spooled)."""
    writer: BatchWriter = request.state.writer
    if (problem := writer.problem) is not None:
        raise ServiceUnavailable(f"Not ready: {problem}.")
    if not writer.alive:
        raise ServiceUnavailable("Not ready: the recording thread has stopped; usage is not recorded (see the log).")
    readiness: Readiness = request.state.readiness
    try:
        await readiness.check(READY_WAIT_SECONDS)
    except TimeoutError:
        raise ServiceUnavailable(f"The database did not answer within {READY_WAIT_SECONDS:g} s.") from None
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"The database does not answer ({exc.__class__.__name__}).") from None
    return JSON({"status": "ready", "writer_queue": writer.queue_depth})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, api_format_of(request.scope))


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error: ApiError = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}; {allow or 'no method'} is.", allow=allow)
    elif exc.status_code == 404:
        error = NotFound(f"There is no route {request.url.path[:200]!r}. The proxy serves /v1/* (OpenAI and Anthropic APIs) and the admin API under /api/.")
    else:
        error = ApiError(str(exc.detail), status=exc.status_code)
    return error_response(error, api_format_of(request.scope))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while its body was being read (Starlette's ClientDisconnect, on any route but
    the model routes, which say so themselves): nobody is left to answer and nothing went wrong here.
    Left to the catch-all, each was a traceback logged twice (~6 KB): a flood of cut-off requests,
    without a key, wrote tens of megabytes of log a minute."""
    log.debug("%s %s: the client hung up before its request body arrived", request.method, request.url.path)
    return error_response(ClientGone("The client hung up before its request body arrived."), api_format_of(request.scope))


async def _database_error(request: Request, exc: Exception) -> Response:
    """A database's error, answered here rather than by the catch-all below, whose response Starlette
    sends and whose exception it then raises again for the server to log with its traceback: for a
    database that cannot serve now (an outage, a standby), the warning line is the whole story."""
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    if (why := unavailable(exc)) is not None:  # not a bug: the database cannot serve now (an outage, a standby); a retry may succeed
        log.warning("%s %s: the database cannot serve it (%s: %s)", request.method, request.url.path, exc.__class__.__name__,
                    (str(exc).splitlines() or [""])[0][:300])  # fmt: skip
        # No Retry-After for a query cancelled by its timeout: a retry meets the same timeout.
        retry_after = None if sqlstate(exc) == QUERY_CANCELED else RETRY_SECONDS
        return error_response(ServiceUnavailable(why, retry_after=retry_after), api_format_of(request.scope))
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError("The proxy failed unexpectedly; the error is logged."), api_format_of(request.scope))


def configured_trackers(settings: Settings, ids: WorkItemIds) -> dict[str, Tracker]:
    """The trackers whose webhook secret is configured; the others' webhooks answer 404."""
    config = settings.trackers
    trackers: dict[str, Tracker] = {}
    if config.github.secret:
        trackers["github"] = GitHub(config.github.secret.get_secret_value(), ids, config.landing_branches)
    if config.gitlab.secret:
        trackers["gitlab"] = GitLab(config.gitlab.secret.get_secret_value(), ids, config.landing_branches)
    if config.jira.secret:
        trackers["jira"] = Jira(config.jira.secret.get_secret_value(), config.jira.story_points_field)
    if config.linear.secret:
        trackers["linear"] = Linear(config.linear.secret.get_secret_value(), config.linear.timestamp_tolerance_seconds)
    return trackers


class HeaderLimit:
    """Refuse requests whose headers together exceed `limits.max_header_bytes`, and those with a NUL in
    their path or query (no id, name or time holds one; PostgreSQL refuses it in text, which was a 500
    on the admin API), in the route's error shape."""

    def __init__(self, app: ASGIApp, max_bytes: int, routes: list[BaseRoute]) -> None:
        self.app, self.max_bytes, self.routes = app, max_bytes, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: ApiError | None = None
        if scope["type"] == "http" and sum(len(name) + len(value) for name, value in scope["headers"]) > self.max_bytes:
            error = HeadersTooLarge(f"The request headers are larger than {self.max_bytes} bytes (limits.max_header_bytes).")
        elif scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]):
            error = InvalidRequest("The request's path or query holds a NUL character (%00), which no parameter takes.")
        if error is not None:
            await error_response(error, api_format_before_routing(scope, self.routes))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: Settings, *, provider: ProviderClient | None = None, engine: Engine | None = None) -> Starlette:
    """Build the ASGI app. `provider` replaces the client that reaches the model providers (aiohttp's
    pool, opened in the lifespan): tests inject `MockProvider` (upstream/mock.py); `engine` replaces
    the database engine made from `settings.database_url`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        counter = TokenCounter()
        # The encodings load first, alone, not beside the rest of startup: their parsing leaves ~30 MiB
        # of short-lived objects, and startup's long-lived ones allocated among them kept that memory
        # from going back (measured: 145-152 MiB resident at start when loaded beside it, 132-135 alone).
        try:
            await anyio.to_thread.run_sync(counter.warm, [m.target_model for m in settings.models])
        except EncodingsUnavailable as exc:  # serve all the same; each event is recorded without the estimate
            log.error("tiktoken's encodings could not be loaded (%s): prompts will not be counted", exc)
        db = engine if engine is not None else make_engine(settings.database_url)
        await anyio.to_thread.run_sync(prepare_schema, db)
        maintain_partitions = partial(partitions.maintain, db, retention_months=settings.recording.retention_months)
        await anyio.to_thread.run_sync(lambda: maintain_partitions(utcnow()))
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        if admin_key:
            await anyio.to_thread.run_sync(ensure_bootstrap_admin, db, admin_key)
        feed = ChangeFeed(db)
        await anyio.to_thread.run_sync(feed.start)  # before the caches fill: no change falls between
        keys = KeyStore(db, admin_key=admin_key, refresh_seconds=settings.auth.key_refresh_seconds, capacity=settings.auth.key_cache_size)
        await anyio.to_thread.run_sync(keys.warm)
        prices = await anyio.to_thread.run_sync(prices_for, settings.models)
        item_cache = ItemCache(db, refresh_seconds=settings.work_items.refresh_seconds, capacity=settings.work_items.cache_size)
        await anyio.to_thread.run_sync(item_cache.warm)
        budgets = Budgets(db, settings.budgets, item_cache)
        await anyio.to_thread.run_sync(budgets.warm, utcnow())
        recording = settings.recording
        writer = BatchWriter(
            db, flush_interval=recording.flush_interval_seconds, batch_size=recording.batch_size, spool_path=recording.spool_path,
            max_held_records=recording.max_held_records, refusals_interval=recording.refusals_interval_seconds, on_record=[budgets.record],
        )  # fmt: skip
        floor = settings.privacy.min_group_size

        series_teams = privacy.SeriesTeams(keys.team_sizes, floor, small=SMALL_TEAMS)

        def team_label(team: str | None) -> str:  # no team: a group under the floor too
            return series_teams.label(team or NO_TEAM)

        metrics = Metrics(writer, team_label, settlements_dropped=lambda: budgets.shares.dropped)
        writer.listen(metrics.record)
        telemetry = None
        if settings.telemetry.enabled:
            from taskproxy.telemetry import Telemetry  # opentelemetry is imported only when it is configured

            telemetry = Telemetry(settings.telemetry, team_label)
            writer.listen(telemetry.record)
        writer.start()
        ids = WorkItemIds(settings.work_items.patterns, settings.work_items.branch_patterns, frozenset(settings.work_items.teams))
        upstream = provider if provider is not None else AiohttpClient(max_connections_per_provider=settings.server.max_connections_per_provider)
        translator = Translator()
        if any(m.provider not in NATIVE_PROVIDERS for m in settings.models):
            # litellm takes seconds to import: do it beside startup, not in front of the first request.
            threading.Thread(target=translator.load, name="taskproxy-litellm", daemon=True).start()
        body_gate = BodyGate(settings.limits.max_concurrent_large_bodies)  # the proxy's routes (the webhooks have their own)
        origins = ResponseOrigins(db)
        writer.listen(origins.record)
        admission = Admission(
            settings=settings, keys=keys, rate_limiter=RateLimiter(settings.limits.requests_per_minute, db),
            body_gate=body_gate, attribution=Attribution(ids),
            policy=Policy(settings.work_items.mode, item_cache), budgets=budgets, writer=writer, origins=origins,
        )  # fmt: skip
        attempts = Attempts(
            sink=writer, counter=counter, prices=prices, charge=budgets.charge,
            register_unknown_items=settings.work_items.mode == "open", store_prompts=recording.store_prompts,
        )  # fmt: skip
        reports_runner = ReportRunner(db, session=ReportSession.of(settings.reports))
        keeper = None
        if settings.reports.snapshot_minutes:
            kept = snapshot_reports(settings)  # the dashboard's overview is made from the adoption report's:
            adoption = kept_name(settings, "adoption")
            kept[adoption] = replace(kept[adoption], then=((overview_snapshot_name(settings), OVERVIEW, {"settings": settings}),))
            keeper = SnapshotKeeper(db, reports_runner, timedelta(minutes=settings.reports.snapshot_minutes), kept,
                                    observe=lambda name, state: metrics.snapshot_seen(name, state.computed_at, state.seconds))  # fmt: skip
        changed = Wakeup()
        listener = None
        if db.dialect.name == "postgresql":
            from taskproxy.storage.listen import ChangeListener  # psycopg: not imported by SQLite deployments (9 MiB)

            listener = ChangeListener(db, changed.set)
            listener.start()
        refreshers = [
            asyncio.create_task(reload_forever(follow_changes(feed, keys, item_cache), min(settings.auth.key_refresh_seconds,
                                settings.work_items.refresh_seconds), "changed keys and work items", changed), name="taskproxy-change-feed"),
            asyncio.create_task(reload_forever(lambda: budgets.refresh(utcnow()), settings.budgets.refresh_seconds, "spend for budgets"),
                                name="taskproxy-budget-refresh"),
            asyncio.create_task(reload_forever(lambda: maintain_partitions(utcnow()), PARTITIONS_EVERY_SECONDS, "partitions"),
                                name="taskproxy-partitions"),
        ]
        if keeper is not None:
            refreshers.append(asyncio.create_task(keeper.run(), name="taskproxy-report-snapshots"))
        if (collect_after := settings.recording.collect_background_after_seconds) is not None:
            collector = Collector(db, settings, upstream, origins, attempts, timedelta(seconds=collect_after))
            refreshers.append(asyncio.create_task(collector.run(), name="taskproxy-background-responses"))
        readiness = Readiness(db)
        lanes = {  # the API's database calls, apart from the proxy's threads and connections (routes/lanes.py)
            "api_calls": Lane("api", API_AT_ONCE),
            "own_calls": Lane("own", OWN_AT_ONCE, per_key=OWN_PER_KEY),
            "webhook_calls": Lane("webhooks", WEBHOOKS_AT_ONCE),
        }
        try:
            # Each request sees these as `request.state.<name>`; a route reads only what it uses.
            yield {
                **lanes,
                "settings": settings,
                "engine": db,
                "readiness": readiness,
                "keys": keys,
                "items": WorkItems(db, ids, item_cache, rework_days=settings.reports.rework_days),
                "policy": admission.policy,  # work_items.mode, as the model routes apply it: `taskproxy run` and `use` ask it first
                "writer": writer,
                "audit": writer,
                "metrics": metrics,
                "trackers": configured_trackers(settings, ids),
                # Deliveries are read before their signature can be checked: anyone may send one, so they wait
                # for a gate of their own, never for the model routes' (routes/webhooks.py).
                "webhook_body_gate": BodyGate(WEBHOOK_LARGE_BODIES_AT_ONCE),
                "webhook_refusals": RefusalLog(),
                "sessions": SessionSigner.for_settings(settings),
                "pages": Pages(),
                "reports": reports_runner,
                "proxy": ProxyFlow(settings, admission, attempts, upstream, Translation(translator, counter, anyio.CapacityLimiter(COUNTING_THREADS))),
                "key_sockets": PerKey(settings.limits.max_sockets_per_key),  # the Responses WebSockets open per key
                "stored": StoredResponses(settings, keys, admission.rate_limiter, origins, upstream, attempts),
            }
        finally:
            for task in refreshers:
                task.cancel()
            if listener is not None:
                await anyio.to_thread.run_sync(listener.close)
            await anyio.to_thread.run_sync(reports_runner.close)  # its children end before the keeper lets go of their claims
            if keeper is not None and not await finish_within(STOP_STEP_SECONDS, keeper.close):
                log.warning("the report snapshots' claims were not let go within %g s; they run out on their own", STOP_STEP_SECONDS)
            if left := await attempts.wait_until_recorded(timeout=5.0):
                log.error("%d answers were still open at shutdown and are not recorded", left)
            await upstream.aclose()
            await anyio.to_thread.run_sync(writer.close)
            if telemetry is not None:
                await anyio.to_thread.run_sync(telemetry.close)
            try:
                await budgets.shares.aclose()  # what this process was granted and did not spend goes back
            except SQLAlchemyError as exc:
                log.warning("could not give back unused budget slices: %s", exc.__class__.__name__)
            for threads in (keys, item_cache, budgets, admission.rate_limiter, origins, readiness, *lanes.values()):
                threads.close()
            if engine is None:
                db.dispose()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *openai.routes,
        *stored.routes,
        *anthropic.routes,
        *me.routes,
        *openapi.routes,
        *metrics_routes.routes,
        *admin.routes,
        *reports.routes,
        *signal_routes.routes,
        *webhooks.routes,
        *dashboard_routes,
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(HeaderLimit, max_bytes=settings.limits.max_header_bytes, routes=routes)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_exception, ClientDisconnect: _client_gone, SQLAlchemyError: _database_error,
                            Exception: _unexpected},
    )
