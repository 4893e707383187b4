"""Linear: `Issue` create/update, the hex HMAC-SHA256 of the raw body in Linear-Signature, identified by
Linear-Delivery; `webhookTimestamp` must be within the tolerance of now (replays are refused). The item
is `data.identifier`; state type `completed` → done, `canceled` → closed, `started` → in_progress."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.datastructures import Headers

from taskproxy.errors import InvalidSignature
from taskproxy.trackers.base import Delivery, ItemUpdate, Size, check_hmac_sha256, need, points, tracker_time, text

_STATE = {"backlog": "open", "unstarted": "open", "triage": "open", "started": "in_progress", "completed": "done", "canceled": "closed"}


class Linear:
    name = "linear"

    def __init__(self, secret: str, tolerance_seconds: float) -> None:
        self._secret = secret
        self._tolerance = tolerance_seconds

    def verify(self, headers: Headers, raw: bytes) -> None:
        check_hmac_sha256(self._secret, raw, headers.get("linear-signature"))

    def parse(self, headers: Headers, payload: dict[str, Any], now: datetime) -> Delivery:
        sent = tracker_time(payload.get("webhookTimestamp"))
        if sent is None or abs((now - sent).total_seconds()) > self._tolerance:
            raise InvalidSignature(f"The delivery's webhookTimestamp is missing or more than {self._tolerance:.0f} s from now (a replay?).")
        delivery = headers.get("linear-delivery")
        kind, action = payload.get("type"), payload.get("action")
        event = f"{kind}.{action}"
        if kind != "Issue" or action not in {"create", "update"}:
            return Delivery(self.name, delivery, event)
        data = need(payload, "data", kind=dict)
        identifier = need(payload, "data", "identifier", kind=str)
        state_type = (data.get("state") or {}).get("type") if isinstance(data.get("state"), dict) else None
        status = _STATE.get(state_type) if isinstance(state_type, str) else None
        at = tracker_time(data.get("completedAt") or data.get("canceledAt") or data.get("updatedAt"))
        update = ItemUpdate(
            item_id=str(identifier), status=status, at=at, created_at=tracker_time(data.get("createdAt")), title=text(data.get("title")),
            url=text(payload.get("url")) or text(data.get("url")), edited_at=tracker_time(data.get("updatedAt")),
            size=Size(points=estimate) if (estimate := points(data.get("estimate"))) is not None else None,
        )  # fmt: skip
        return Delivery(self.name, delivery, event, [update])
