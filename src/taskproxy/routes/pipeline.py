"""The part every proxy route shares: admit a request, then record what happened to it.

Admission runs in the order the contract fixes (DESIGN §3): the key, the body size, the work item,
then the body's JSON, then the model. A refusal at any step is counted (per key and reason) and
nothing is sent upstream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import Request

from taskproxy.errors import ApiError, InvalidRequest, ModelNotFound
from taskproxy.guard.attribution import Attributed
from taskproxy.guard.auth import Principal
from taskproxy.guard.body import Undecodable, decode_json_object, read_body
from taskproxy.metering.usage import Exchange, Rejected
from taskproxy.services import Services
from taskproxy.settings import ModelSettings
from taskproxy.timeutil import utcnow


@dataclass
class Admitted:
    principal: Principal
    attributed: Attributed
    body: dict
    raw: bytes  # the body as received, forwarded as is when nothing in it changes
    model: ModelSettings
    ts: datetime
    started: float  # perf_counter at arrival


def _model_of(body: dict, svc: Services) -> ModelSettings:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    model = svc.settings.model(name)
    if model is None:
        known = ", ".join(m.name for m in svc.settings.models) or "none"
        raise ModelNotFound(f"The model '{name[:100]}' is not configured on this proxy. Configured models: {known}.", param="model")
    return model


async def admit(request: Request, svc: Services, route: str, validate: Callable[[dict], None]) -> Admitted:
    started, ts = time.perf_counter(), utcnow()
    principal: Principal | None = None
    try:
        principal = await svc.keys.authenticate(request.headers)
        raw = await read_body(request, svc.settings.limits.max_body_bytes)
        body = await decode_json_object(raw)
        attributed = svc.attribution.resolve(request.headers, body if isinstance(body, dict) else None, principal, ts)
        if isinstance(body, Undecodable):
            raise InvalidRequest(body.reason)
        validate(body)
        return Admitted(principal, attributed, body, raw, _model_of(body, svc), ts, started)
    except ApiError as exc:
        svc.writer.submit(Rejected(uuid.uuid4().hex, ts, principal.key_id if principal else None, exc.code, route))
        raise


def check_types(body: dict, expected: dict[str, tuple[type, ...]], required: tuple[str, ...] = ()) -> None:
    """Refuse fields of the wrong JSON type (the provider would, later and less clearly)."""
    for name in required:
        if name not in body:
            raise InvalidRequest(f"'{name}' is required.", param=name)
    for name, types in expected.items():
        if name in body and body[name] is not None and not isinstance(body[name], types):
            wanted = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)
            raise InvalidRequest(f"'{name}' must be {wanted}.", param=name)


_JSON_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean", int: "an integer", float: "a number"}


def new_exchange(request: Request, svc: Services, admitted: Admitted, route: str, *, stream: bool) -> Exchange:
    principal, item = admitted.principal, admitted.attributed
    register = None
    if svc.settings.work_items.mode == "open":
        register = {"id": item.work_item, "source": "auto", "status": "unverified", "created_at": admitted.ts}
    return Exchange(
        id=uuid.uuid4().hex,
        ts=admitted.ts,
        key_id=principal.key_id,
        owner=principal.owner,
        team=principal.team,
        work_item=item.work_item,
        attribution_source=item.source,
        route=route,
        model=admitted.model.name,
        upstream_model=admitted.model.target_model,
        provider=admitted.model.provider,
        stream=stream,
        body=admitted.body,
        user_agent=request.headers.get("user-agent"),
        counter=svc.counter,
        price=svc.prices.get(admitted.model.name),
        register_work_item=register,
        store_prompts=svc.settings.recording.store_prompts,
    )


def finish(svc: Services, exchange: Exchange, started: float, *, status: int, error: str | None = None, first_byte: float | None = None) -> None:
    now = time.perf_counter()
    exchange.status = status
    exchange.error = error
    exchange.latency_ms = (now - started) * 1000
    exchange.ttfb_ms = (first_byte - started) * 1000 if first_byte is not None else None
    svc.writer.submit(exchange)
