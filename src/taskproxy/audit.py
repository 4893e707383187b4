"""The audit log: every admin read of per-key data is written down, through the writer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import Request

from taskproxy.guard.auth import Principal
from taskproxy.storage.batch import Record, UsageSink
from taskproxy.timeutil import iso, utcnow


@dataclass(frozen=True)
class AuditRead:
    ts: datetime
    actor_key_id: str
    actor_owner: str
    action: str
    target: str | None

    def to_record(self) -> Record:
        row = {"id": uuid.uuid4().hex, "ts": self.ts, "actor_key_id": self.actor_key_id, "actor_owner": self.actor_owner,
               "action": self.action, "target": self.target}  # fmt: skip
        return Record("audit", row)


def audit_read(sink: UsageSink, request: Request, principal: Principal, snapshot: tuple[datetime, datetime] | None = None) -> None:
    """Record that `principal` read per-key data with this request: the query says which, and
    `snapshot` (since, until), when the answer was a stored snapshot, of which period (a page asked
    for without a period shows the latest snapshot, whose period the request alone does not tell)."""
    served = None if snapshot is None else f"snapshot_period={iso(snapshot[0])}/{iso(snapshot[1])}"
    target = "&".join(part for part in (str(request.url.query)[:320], served) if part) or None
    sink.submit(AuditRead(utcnow(), principal.key_id, principal.owner, f"{request.method} {request.url.path}"[:64], target))
