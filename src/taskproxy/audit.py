"""The audit log: every admin read of per-key data is written down, through the writer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import Request

from taskproxy.guard.auth import Principal
from taskproxy.storage.batch import Record, UsageSink
from taskproxy.timeutil import utcnow


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


def audit_read(sink: UsageSink, request: Request, principal: Principal) -> None:
    """Record that `principal` read per-key data with this request (the query says which)."""
    query = str(request.url.query)[:400] or None
    sink.submit(AuditRead(utcnow(), principal.key_id, principal.owner, f"{request.method} {request.url.path}"[:64], query))
