"""Billing a background response (Responses API, `background: true`) from a read of it.

Its create is recorded `deferred`, with no tokens. A read that shows it finished records its usage on
the create's work item, key and time, under an id made from the response's own
(storage/background.py): written once, however many reads, on however many replicas, see it. The
reads are a client's (routes/stored.py), the one before a client's delete, and the proxy's own of the
responses no client read back (`Collector`, recording.collect_background_after_seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers

from taskproxy.errors import ApiError, RequestTooLarge
from taskproxy.guard.body import DECODE_IN_THREAD_BYTES, decode_json_object
from taskproxy.guard.lookups import LookupTimeout
from taskproxy.guard.response_origins import Origin, ResponseOrigins
from taskproxy.jsonbytes import last_usage_object
from taskproxy.metering.attempts import Attempts, Caller
from taskproxy.metering.observed import Observed
from taskproxy.settings import LimitSettings, ModelSettings, Settings
from taskproxy.storage import background
from taskproxy.storage.background import deferred_event_id
from taskproxy.threads import DaemonThreads
from taskproxy.timeutil import utcnow
from taskproxy.upstream import observe
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.observe import openai_usage
from taskproxy.upstream.provider import Header, ProviderClient, ProviderRequest, upstream_headers

T = TypeVar("T")
log = logging.getLogger("taskproxy.background")
PASS_SECONDS = 15.0  # between the collector's passes, at most
BATCH = 20  # responses read per pass, at most
READS_AT_ONCE = 4
CLAIM_HOLD = timedelta(minutes=5)  # a claimed response is left to its claimer this long
LONGEST_WAIT = timedelta(hours=1)  # between two reads of a response still unfinished
GIVE_UP_AFTER = timedelta(days=1)
USER_AGENT = "taskproxy (background response read by the proxy)"


@dataclass(frozen=True)
class Read:
    status: int  # the provider's
    finished: Capture | None  # a finished response's body (its ends, if large): what it is billed from; else None


async def read(provider: ProviderClient, model: ModelSettings, response_id: str, headers: list[Header], limits: LimitSettings) -> Read:
    """Read the response once (`GET`), keeping its ends however large, and the whole of it up to
    `limits.max_buffered_response_bytes`: finished, it can be billed. The caller bounds the time."""
    limit = limits.max_buffered_response_bytes
    reply = await provider.send(ProviderRequest(model, f"{model.base_url}/responses/{response_id}", headers, b"", stream=False, method="GET"))
    parts: list[bytes] = []
    capture = Capture()
    try:
        if reply.status != 200 or reply.is_event_stream:
            return Read(reply.status, None)
        async for chunk in reply.chunks:
            capture.add(chunk)  # its ends, whatever its size
            if capture.total <= limit:
                parts.append(chunk)  # and the whole of a body small enough to read
    finally:
        await reply.close()
    finished = await settles(b"".join(parts), limits.max_json_nodes) if capture.total <= limit else body_settles(capture)
    return Read(reply.status, capture if finished else None)


async def settles(body: bytes, limit_nodes: int) -> bool:
    """Whether a buffered read settles the response's usage: never while it is queued or generating
    (a zero usage object then is not its usage); a final status bills (with an estimate if the
    provider sent no usage); a cancelled one only with its usage, since a cancel can lose the race
    with the generation and a later read show it completed."""
    try:
        decoded = await decode_json_object(body, limit_nodes) if len(body) > DECODE_IN_THREAD_BYTES else observe.parsed(body)
    except RequestTooLarge:  # more values than a request may hold: judged from its ends, as a body too large to keep is
        capture = Capture()
        capture.add(body)
        return body_settles(capture)
    if not isinstance(decoded, dict):
        return False
    status = decoded.get("status")
    if status in observe.FINISHED:
        return True
    return status == "cancelled" and openai_usage(decoded.get("usage")) is not None


def usage_in_tail(capture: Capture) -> bool:
    return openai_usage(last_usage_object(capture.recent())) is not None


def body_settles(capture: Capture) -> bool:
    """`settles` for a body too large to keep whole, from its ends: its usage, and a head that does
    not say it is still generating. (A finished body without usage is not billed this way: its
    output, which an estimate would count, was not kept.)"""
    return usage_in_tail(capture) and not observe.still_generating(capture)


def bill(attempts: Attempts, origins: ResponseOrigins, origin: Origin, model: ModelSettings, observed: Callable[[], Observed],
         user_agent: str | None) -> None:  # fmt: skip
    """Record a finished background response's usage on the work item it was created for, at its
    create's time and under an id made from its own: written once, however many reads see it, and
    counted once by this process (`ResponseOrigins.settle`)."""
    if not origins.settle(origin):
        return
    caller = Caller(origin.key_id, origin.owner, origin.team, origin.work_item, origin.attribution_source)
    attempt = attempts.begin(
        caller, ts=origin.ts, started=time.perf_counter(), body={}, user_agent=user_agent, route="/v1/responses",
        usage_of=observe.openai_usage, model=model, stream=False, number=1,
    )  # fmt: skip
    attempt.exchange.id = deferred_event_id(origin.response_id)
    attempt.exchange.answered = True
    attempt.exchange.observe = observed
    attempt.record_once(status=200)


def bill_body(attempts: Attempts, origins: ResponseOrigins, origin: Origin, model: ModelSettings, capture: Capture, user_agent: str | None) -> None:
    """`bill` from a read's body (whole, or its ends)."""
    bill(attempts, origins, origin, model, partial(observe.responses_body, capture), user_agent)


class Collector:
    """Reads the background responses that no client read back, and bills those finished.

    Every process runs one; the responses owed are shared out by claiming them (storage/background.py),
    so each is read by one replica at a time. A response is first read `after` its create (a client
    polling it is usually first), then again after twice as long each time it is still unfinished, at
    most hourly, until it finishes, the provider no longer holds it (404), or a day has passed: then
    it is given up on, logged, and stays unbilled. A read the provider fails is tried again the same
    way. Work per pass: the responses due, at most `BATCH`."""

    def __init__(self, engine: Engine, settings: Settings, provider: ProviderClient, origins: ResponseOrigins, attempts: Attempts,
                 after: timedelta) -> None:  # fmt: skip
        self._engine = engine
        self._settings = settings
        self._provider = provider
        self._origins = origins
        self._attempts = attempts
        self._after = after
        self._threads = DaemonThreads(1, "taskproxy-background-responses")

    @property
    def every(self) -> float:
        """Seconds between passes."""
        return min(PASS_SECONDS, self._after.total_seconds() / 2)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.every)
                try:
                    await self.collect(utcnow())
                except SQLAlchemyError as exc:  # the database does not answer: the next pass tries again
                    log.warning("background responses: could not read what is owed (%s)", exc.__class__.__name__)
                except Exception:  # a bug: logged, and the passes go on (a dead loop would leave every response unbilled)
                    log.exception("background responses: a pass failed")
        finally:
            self._threads.close()

    async def collect(self, now: datetime) -> int:
        """One pass: claim the responses due and read each; returns how many were billed."""
        owed = await self._call(background.claim, self._engine, now, self._after, now + CLAIM_HOLD, BATCH)
        reads = asyncio.Semaphore(READS_AT_ONCE)

        async def one(item: background.Owed) -> bool:
            async with reads:
                return await self._collect(item, now)

        return sum(await asyncio.gather(*(one(item) for item in owed)))

    async def _collect(self, owed: background.Owed, now: datetime) -> bool:
        try:
            origin = await self._origins.find(owed.response_id)
        except (SQLAlchemyError, LookupTimeout):
            return False  # claimed until CLAIM_HOLD: read again then
        model = self._settings.model(origin.model) if origin is not None else None
        if origin is None or not origin.deferred or model is None:
            why = "no event names it" if origin is None else "its usage is recorded" if model is not None else f"its model '{origin.model}' is gone"
            await self._give_up(owed, why, quietly=origin is not None and origin.deferred is False)
            return False
        if now - owed.created_at > GIVE_UP_AFTER:
            await self._give_up(owed, f"still not finished {GIVE_UP_AFTER.days} day(s) after its create")
            return False
        api_key = model.api_key.get_secret_value() if model.api_key else None
        try:
            async with asyncio.timeout(model.max_response_seconds):
                found = await read(self._provider, model, owed.response_id, upstream_headers(Headers(), api_key), self._settings.limits)
        except (ApiError, TimeoutError) as exc:
            log.info("background response %s: the provider's read failed (%s); trying again later", owed.response_id[:200], exc)
            found = Read(0, None)
        if found.finished is not None:
            bill_body(self._attempts, self._origins, origin, model, found.finished, USER_AGENT)  # the writer removes it from what is owed
            return True
        if found.status == 404:
            await self._give_up(owed, "the provider no longer holds it")
            return False
        wait = min(self._after * 2 ** (owed.checks + 1), LONGEST_WAIT)
        await self._call(background.check_again, self._engine, owed.response_id, now + wait, owed.checks + 1)
        return False

    async def _give_up(self, owed: background.Owed, why: str, quietly: bool = False) -> None:
        if not quietly:
            log.warning("background response %s created at %s: given up on, its usage stays unrecorded: %s", owed.response_id[:200],
                        owed.created_at.isoformat(), why)  # fmt: skip
        await self._call(background.forget, self._engine, [owed.response_id])

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._threads.submit(function, *args))
