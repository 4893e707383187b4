"""Jira: `jira:issue_created` / `jira:issue_updated`, signed as `X-Hub-Signature: sha256=<hex>`,
identified by X-Atlassian-Webhook-Identifier. The item is `issue.key`; its status follows the status
category (`new` → open, `indeterminate` → in_progress, `done` → done, or closed when the resolution
says the work was not done)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.datastructures import Headers

from taskproxy.workitems import RESOLVED
from taskproxy.trackers.base import Delivery, ItemUpdate, Size, check_hmac_sha256, need, points, tracker_time, text

_CATEGORY = {"new": "open", "indeterminate": "in_progress", "done": "done"}
_NOT_DONE = {"won't do", "won't fix", "duplicate", "cannot reproduce", "declined", "obsolete", "incomplete", "abandoned"}
_EVENTS = {"jira:issue_created", "jira:issue_updated"}


class Jira:
    name = "jira"

    def __init__(self, secret: str, points_field: str | None = None) -> None:
        self._secret = secret
        self._points_field = points_field  # e.g. customfield_10016 (Story point estimate)

    def verify(self, headers: Headers, raw: bytes) -> None:
        check_hmac_sha256(self._secret, raw, headers.get("x-hub-signature"), prefix="sha256=")

    def parse(self, headers: Headers, payload: dict[str, Any], now: datetime) -> Delivery:
        event = payload.get("webhookEvent") if isinstance(payload.get("webhookEvent"), str) else ""
        delivery = headers.get("x-atlassian-webhook-identifier")
        if event not in _EVENTS:
            return Delivery(self.name, delivery, event)
        key = need(payload, "issue", "key", kind=str)
        fields = need(payload, "issue", "fields", kind=dict)
        category = ((fields.get("status") or {}).get("statusCategory") or {}).get("key") if isinstance(fields.get("status"), dict) else None
        status = _CATEGORY.get(category) if isinstance(category, str) else None
        resolution = fields.get("resolution")
        if status == "done" and isinstance(resolution, dict) and str(resolution.get("name", "")).lower() in _NOT_DONE:
            status = "closed"
        # Done in a workflow that sets no resolution: when the status category last changed, else the last update.
        resolved = tracker_time(fields.get("resolutiondate")) or tracker_time(fields.get("statuscategorychangedate")) or tracker_time(fields.get("updated"))
        at = resolved if status in RESOLVED else tracker_time(fields.get("updated"))
        url = None
        if isinstance(payload["issue"].get("self"), str) and "/rest/" in payload["issue"]["self"]:
            url = text(payload["issue"]["self"].split("/rest/")[0] + f"/browse/{key}")  # control characters, as in every URL
        update = ItemUpdate(
            item_id=str(key), status=status, at=at or tracker_time(payload.get("timestamp")), created_at=tracker_time(fields.get("created")),
            title=text(fields.get("summary")), url=url, edited_at=tracker_time(fields.get("updated")),
            size=Size(points=found) if self._points_field and (found := points(fields.get(self._points_field))) is not None else None,
        )  # fmt: skip
        return Delivery(self.name, delivery, event, [update])
