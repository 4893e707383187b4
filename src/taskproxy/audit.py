"""The audit log: every admin read of per-key data is written down, through the writer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

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
    target = "&".join(part for part in (_what_was_read(request), served) if part) or None
    sink.submit(AuditRead(utcnow(), principal.key_id, principal.owner, f"{request.method} {request.url.path}"[:64], target))


# The parameters that choose whose data a read shows, written first: the query as sent was cut at 320
# characters, so a padding parameter in front hid the key read (and a repeated one showed its first
# value while the route read its last).
_CHOOSING = ("key_id", "work_item", "team", "since", "until", "snapshot")
_TARGET_CHARS = 320
_PARAM_CHARS = 100


def _what_was_read(request: Request) -> str:
    """The query's parameters as the route read them (a repeated one: its last value), those that
    choose what was read first, each value cut to what fits."""
    params = request.query_params  # one value a name, the last: what `.get` gives the route
    names = [n for n in _CHOOSING if n in params] + sorted(n for n in params if n not in _CHOOSING)
    # Each cut once encoded (a character can take nine): one cannot crowd out the next.
    return "&".join(urlencode([(name, params[name])])[:_PARAM_CHARS] for name in names)[:_TARGET_CHARS]
