"""POST /webhooks/{github,gitlab,jira,linear}: tracker deliveries that open, complete and close work items.

The signature is checked on the raw body before anything is parsed; a delivery that fails it gets
401, changes nothing, and is logged. Deliveries are applied once per delivery id. Events that do not
concern work items are acknowledged (200, "ignored") so the tracker does not retry them. Reads the
lifespan state's `trackers`, `items` (WorkItems), `webhook_body_gate`, `webhook_calls`, `settings` and
`webhook_refusals`.

Anyone who reaches the port can send a delivery, so what one costs before its signature is checked is
bounded: a body past 1 MiB is read under a large-body gate of the webhooks' own (300 held 5 MiB
bodies took a process to 1.7 GiB; and while the webhooks shared the model routes' gate, four
connections sending 3 MiB deliveries a byte at a time held up every large prompt until their body
deadline), it is decoded in a worker thread within
`limits.max_json_nodes` (5 MiB of `[[],…]` held the event loop ~1 s), and refusals are logged at most
once a minute per tracker and reason, with how many there were (a flood of bad signatures wrote
~170 KiB of log a second).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.errors import ApiError, InvalidRequest, NotFound
from taskproxy.guard.body import BodyGate, Undecodable, decode_json_object
from taskproxy.routes.common import JSON
from taskproxy.timeutil import utcnow

log = logging.getLogger("taskproxy.webhooks")

MAX_DELIVERY_BYTES = 5 * 1024 * 1024
WEBHOOK_LARGE_BODIES_AT_ONCE = 2  # deliveries past 1 MiB read and decoded at once (a few KiB is usual)
REFUSALS_LOGGED_EVERY_SECONDS = 60.0


class RefusalLog:
    """Refused deliveries, logged at most once per `every` seconds per tracker and reason, with their count."""

    def __init__(self, every: float = REFUSALS_LOGGED_EVERY_SECONDS) -> None:
        self._every = every
        self._last: dict[tuple[str, str], float] = {}
        self._count: dict[tuple[str, str], int] = defaultdict(int)

    def refused(self, tracker: str, client: str, exc: ApiError) -> None:
        key, now = (tracker, exc.code), time.monotonic()
        self._count[key] += 1
        if now - self._last.get(key, -self._every) < self._every:
            return
        count, self._count[key], self._last[key] = self._count[key], 0, now
        log.warning("refused %d %s deliveries (%s) since the last such line; the latest from %s: %s", count, tracker, exc.code, client, exc.message)


async def receive(request: Request) -> Response:
    name = request.path_params["tracker"]
    tracker = request.state.trackers.get(name)
    if tracker is None:
        raise NotFound(f"No {name} webhook is configured: set trackers.{name}.secret_env in the config." if name in ("github", "gitlab", "jira", "linear")
                       else f"There is no webhook for {name[:40]!r}; taskproxy takes github, gitlab, jira and linear.")  # fmt: skip
    gate: BodyGate = request.state.webhook_body_gate
    now = utcnow()
    try:
        async with gate.reading(request, MAX_DELIVERY_BYTES, "the webhooks' limit") as raw:
            tracker.verify(request.headers, raw)
            payload = await decode_json_object(raw, request.state.settings.limits.max_json_nodes)
        if isinstance(payload, Undecodable):
            raise InvalidRequest(payload.reason.replace("The request body", "The delivery"))
        try:
            delivery = tracker.parse(request.headers, payload, now)
        except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a field of a type the tracker never sends
            log.warning("a %s delivery not shaped as %s sends them (or a parser's bug):", name, name, exc_info=True)
            raise InvalidRequest(f"The delivery is not shaped as {name} sends it ({exc.__class__.__name__}: {str(exc)[:200]}).") from None
    except ApiError as exc:
        request.state.webhook_refusals.refused(name, request.client.host if request.client else "?", exc)
        raise
    return JSON(await request.state.webhook_calls.run(request.state.items.apply_delivery, delivery, now))


routes = [Route("/webhooks/{tracker}", receive, methods=["POST"])]
