"""Admitting a proxied request, in the order the contract fixes (README, "Errors"): the key, the rate limit,
the body's size and cost, the work item (and `work_items.mode`), the body's JSON and field types, the
model, the budget. A refusal at any step is counted (per key and reason) and nothing is sent upstream.

Every key shares the proxy's provider accounts, so a `previous_response_id` is checked after the
model: a response created through the proxy by someone else is not continued, or the provider would
continue their conversation for this key (an id the proxy never recorded is no one's: passed on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from collections.abc import Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from taskproxy import privacy
from taskproxy.errors import ApiError, ClientGone, InvalidRequest, ModelNotFound, NotFound, RateLimited, ServiceUnavailable
from taskproxy.guard.attribution import Attributed, Attribution
from taskproxy.guard.auth import KeyStore, Principal
from taskproxy.guard.body import BodyGate, Undecodable, decode_json_object
from taskproxy.guard.budgets import Budgets
from taskproxy.guard.items import Policy
from taskproxy.guard.lookups import LookupTimeout
from taskproxy.guard.ratelimit import RateLimiter
from taskproxy.metering.usage import Rejected
from taskproxy.routes.endpoint import Endpoint
from taskproxy.settings import OPENAI_COMPATIBLE, LimitSettings, ModelSettings, Settings
from taskproxy.storage.failures import RETRY_SECONDS
from taskproxy.guard.response_origins import ResponseOrigins
from taskproxy.storage.writer import BatchWriter
from taskproxy.timeutil import utcnow

log = logging.getLogger("taskproxy.proxy")
BACKPRESSURE_MAX_SECONDS = 1.0
KEY_BACKLOG_RETRY_SECONDS = 1  # Retry-After for a key whose bodies wait to be recorded past storage/backlog.py's KEY_BACKLOG_BYTES


@dataclass
class Admitted:
    principal: Principal
    attributed: Attributed
    body: dict
    raw: bytes  # the body as received, forwarded as is when nothing in it changes
    model: ModelSettings
    client_model: str | None  # the model name as the client sent it (in `raw`); None: it sent none
    ts: datetime
    started: float  # perf_counter at arrival


@dataclass(frozen=True)
class Admission:
    settings: Settings  # the models and the limits
    keys: KeyStore
    rate_limiter: RateLimiter
    body_gate: BodyGate
    attribution: Attribution
    policy: Policy
    budgets: Budgets
    writer: BatchWriter  # refusals go to it; its backlog slows admission down
    origins: ResponseOrigins  # who created the response a request continues

    async def admit(self, request: Request, endpoint: Endpoint) -> Admitted:
        return await self._admit(request.headers, endpoint, lambda: self._read_and_decode(request, self.settings.limits))

    async def admit_message(self, headers: Headers, raw: bytes, body: dict, endpoint: Endpoint) -> Admitted:
        """One request that came as a message on a WebSocket: `headers` are the upgrade request's."""

        async def already_read() -> tuple[bytes, dict]:
            return raw, body

        return await self._admit(headers, endpoint, already_read)

    async def _admit(self, headers: Headers, endpoint: Endpoint, read: Callable[[], Awaitable[tuple[bytes, dict | Undecodable]]]) -> Admitted:
        if self.writer.backlogged:
            await self._wait_for_the_writer()
        started, ts = time.perf_counter(), utcnow()
        principal: Principal | None = None
        try:
            principal = await self.keys.authenticate(headers)
            await self.rate_limiter.check(principal.key_id)
            if held := self.writer.holding(principal.key_id):  # refused at once: many such requests waiting would cost everyone
                raise RateLimited(f"This key's requests wait to be recorded ({held >> 20} MiB of request bodies): the proxy takes no more "
                                  "from it until they are. Retry shortly.", retry_after=KEY_BACKLOG_RETRY_SECONDS)  # fmt: skip
            if self.writer.refusing:
                raise ServiceUnavailable("Usage cannot be recorded right now (the database and the local spool are both unavailable); "
                                         "the request was not forwarded. Try again shortly.", retry_after=RETRY_SECONDS)  # fmt: skip
            raw, body = await read()
            attributed = self.attribution.resolve(headers, body if isinstance(body, dict) else None, principal, ts)
            attributed, known = await self.policy.check_attributed(attributed, principal.binding(ts))
            if isinstance(body, Undecodable):
                raise InvalidRequest(body.reason)
            client_model = body.get("model")
            if client_model is None and endpoint.model_optional:
                body["model"] = self._default_model()
            endpoint.validate(body)
            model = self._model_of(body, endpoint)
            await self._continues_its_own(body, principal)
            await self.budgets.check(attributed.work_item, known, principal.team, ts)
            return Admitted(principal, attributed, body, raw, model, client_model, ts, started)
        except ApiError as exc:
            key_id = principal.key_id if principal else None
            self.writer.submit(Rejected(ts, key_id, exc.code, endpoint.path))
            log.info("refused %s for key %s: %s %s", endpoint.path, key_id or "-", exc.code, exc.message)
            raise

    async def _wait_for_the_writer(self) -> None:
        """Under overload the recording thread can fall behind the requests (it shares the GIL with the
        event loop). New requests then wait, briefly, so that it catches up: recording stays complete and
        memory bounded, at the cost of throughput. Bounded: a stuck writer never stops the proxy."""
        deadline = time.perf_counter() + BACKPRESSURE_MAX_SECONDS
        while self.writer.backlogged and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)

    async def _read_and_decode(self, request: Request, limits: LimitSettings) -> tuple[bytes, dict | Undecodable]:
        try:
            async with self.body_gate.reading(request, limits.max_body_bytes) as raw:  # large ones a few at a time
                return raw, await decode_json_object(raw, limits.max_json_nodes)
        except ClientDisconnect:
            raise ClientGone("The client hung up before its request body arrived.") from None

    async def _continues_its_own(self, body: dict, principal: Principal) -> None:
        previous = body.get("previous_response_id")
        if not isinstance(previous, str):  # absent; another type goes on to the provider's own error
            return
        if not previous.isprintable():  # no provider's id holds a control character (and PostgreSQL refuses NUL)
            raise InvalidRequest("'previous_response_id' is not a response id: it holds a control character.", param="previous_response_id")
        try:
            # Not waited for: a response created a moment ago on another replica is not committed yet,
            # and an id never created through the proxy is no one's here.
            creator = await self.origins.creator(previous)
        except (SQLAlchemyError, LookupTimeout):  # refused in the route's shape (the socket's too), counted as a refusal
            raise ServiceUnavailable("The response this request continues could not be checked: the database does not answer. "
                                     "Try again shortly.", retry_after=RETRY_SECONDS) from None  # fmt: skip
        if creator is not None and not privacy.same_person(creator, principal.owner):
            raise NotFound(f"No response with id '{previous[:200]}' was created through this proxy by you: a request continues only a "
                           "response created with a key of the same person.", param="previous_response_id")  # fmt: skip

    def _default_model(self) -> str:
        """A Responses request may leave `model` out (the spec allows it); taskproxy routes by model."""
        default = self.settings.responses.default_model
        if default is None:
            known = ", ".join(m.name for m in self.settings.models if m.provider == OPENAI_COMPATIBLE) or "none"
            raise InvalidRequest(f"'model' is required: taskproxy sends each request to the provider of its model. Send one of the "
                                 f"configured models ({known}), or ask the administrator to set responses.default_model.", param="model")  # fmt: skip
        return default

    def _model_of(self, body: dict, endpoint: Endpoint) -> ModelSettings:
        name = body["model"]
        model = self.settings.model(name)
        if model is None:
            known = ", ".join(m.name for m in self.settings.models) or "none"
            raise ModelNotFound(f"The model '{name[:100]}' is not configured on this proxy. Configured models: {known}.", param="model")
        if not endpoint.reaches(model):
            raise InvalidRequest(
                f"The model '{name}' is served by the provider '{model.provider}', which {endpoint.path} cannot reach; "
                f"use a model whose provider is '{endpoint.native_provider}', or /v1/chat/completions.",
                param="model",
            )
        return model
