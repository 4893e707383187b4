"""POST /webhooks/{github,gitlab,jira,linear}: tracker deliveries that open, complete and close work items.

The signature is checked on the raw body before anything is parsed; a delivery that fails it gets
401, changes nothing, and is logged. Deliveries are applied once per delivery id. Events that do not
concern work items are acknowledged (200, "ignored") so the tracker does not retry them. Reads the
lifespan state's `trackers` and `items` (WorkItems).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.errors import ApiError, InvalidRequest, NotFound
from taskproxy.guard.body import read_body
from taskproxy.routes.common import JSON, in_thread, parse_json_object
from taskproxy.timeutil import utcnow

log = logging.getLogger("taskproxy.webhooks")

MAX_DELIVERY_BYTES = 5 * 1024 * 1024


async def receive(request: Request) -> Response:
    name = request.path_params["tracker"]
    tracker = request.state.trackers.get(name)
    if tracker is None:
        raise NotFound(f"No {name} webhook is configured: set trackers.{name}.secret_env in the config." if name in ("github", "gitlab", "jira", "linear")
                       else f"There is no webhook for {name[:40]!r}; taskproxy takes github, gitlab, jira and linear.")  # fmt: skip
    raw = await read_body(request, MAX_DELIVERY_BYTES, "the webhooks' limit")
    now = utcnow()
    try:
        tracker.verify(request.headers, raw)
        payload = parse_json_object(raw, "The delivery")
        try:
            delivery = tracker.parse(request.headers, payload, now)
        except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a field of a type the tracker never sends
            log.warning("a %s delivery not shaped as %s sends them (or a parser's bug):", name, name, exc_info=True)
            raise InvalidRequest(f"The delivery is not shaped as {name} sends it ({exc.__class__.__name__}: {str(exc)[:200]}).") from None
    except ApiError as exc:
        client = request.client.host if request.client else "?"
        log.warning("refused a %s delivery from %s: %s %s", name, client, exc.code, exc.message)
        raise
    return JSON(await in_thread(request.state.items.apply_delivery, delivery, now))


routes = [Route("/webhooks/{tracker}", receive, methods=["POST"])]
