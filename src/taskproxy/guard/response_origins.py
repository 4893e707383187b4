"""Which attempt created a stored response: the model (so a read by id goes to the provider that
holds it), the person (so nobody else reads it) and the work item (so a background response is billed
where it was asked for).

The recording thread tells this process at once (`record`, a writer listener); another replica, or
this one after a restart, finds it in `usage_events.response_id` once the writer has committed it.
A read may arrive before either (a client polling a background response it has just created), so
`find` waits a little for the writer before it answers "unknown". Bounded: the most recent
`capacity` origins are kept in memory, and a miss costs two indexed lookups at most, run in a few
threads of their own (a flood of reads of unknown ids while the database is slow waits for them, not
for the threads the model routes decode large bodies in), each waited for a second at most
(lookups.py: a database gone silent raises LookupTimeout, which the routes answer with 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime

from cachetools import LRUCache
from sqlalchemy import select
from sqlalchemy.engine import Engine

from taskproxy.storage.batch import Record
from taskproxy.storage.models import UsageEvent
from taskproxy.guard.lookups import Lookups

WAIT_FOR_WRITER_SECONDS = 1.5  # the writer commits within its flush interval (<= 1 s)
POLL_SECONDS = 0.05
LOOKUPS_AT_ONCE = 2  # reads of ids this process does not hold


@dataclass(frozen=True)
class Origin:
    response_id: str
    key_id: str
    owner: str
    team: str | None
    work_item: str
    attribution_source: str
    model: str  # the configured model's name
    deferred: bool  # a background response whose usage has not been recorded yet
    ts: datetime  # when it was asked for: its deferred usage is recorded at that time, under one (id, ts)


def _origin(row: dict) -> Origin:
    return Origin(
        row["response_id"], row["key_id"], row["owner"], row["team"], row["work_item"], row["attribution_source"], row["model"],
        row["usage_source"] == "deferred", row["ts"],
    )  # fmt: skip


class ResponseOrigins:
    def __init__(self, engine: Engine, capacity: int = 20_000) -> None:
        self._engine = engine
        self._known: LRUCache[str, Origin] = LRUCache(maxsize=capacity)
        self._lock = threading.Lock()  # the writer thread adds, the event loop reads
        self._threads = Lookups("response", at_once=LOOKUPS_AT_ONCE)

    def record(self, record: Record) -> None:
        """Writer listener: a successful attempt that created a stored response."""
        row = record.row
        if record.kind == "event" and row.get("response_id") and row["status"] < 400:
            origin = _origin(row)
            with self._lock:
                known = self._known.get(origin.response_id)
                # A later event for the same response (its deferred usage) settles it; never the reverse.
                if known is None or known.deferred:
                    self._known[origin.response_id] = origin

    def settle(self, origin: Origin) -> bool:
        """Whether this read is the one that bills a background response: True once, for the first read
        that calls it, and False for every later one. The usage event is written once however many
        reads bill it (its id), but the budgets and metrics count each record submitted: reads that saw
        it finished before the writer had recorded its usage each counted it again."""
        with self._lock:
            known = self._known.get(origin.response_id)
            if known is not None and not known.deferred:
                return False
            self._known[origin.response_id] = replace(known or origin, deferred=False)
            return True

    def _cached(self, response_id: str) -> Origin | None:
        with self._lock:
            return self._known.get(response_id)

    def _stored(self, response_id: str, answered_only: bool = True) -> Origin | None:
        columns = [UsageEvent.response_id, UsageEvent.key_id, UsageEvent.owner, UsageEvent.team, UsageEvent.work_item,
                   UsageEvent.attribution_source, UsageEvent.model, UsageEvent.usage_source, UsageEvent.ts]  # fmt: skip
        query = select(*columns).where(UsageEvent.response_id == response_id, *([UsageEvent.status < 400] if answered_only else []))  # type: ignore[arg-type]
        with self._engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(query.limit(8))]
        if not rows:
            return None
        settled = [r for r in rows if r["usage_source"] != "deferred"]
        origin = _origin(rows[0])
        # Settled if any event for it is not deferred (its usage was recorded): bill it once.
        return Origin(**{**origin.__dict__, "deferred": not settled})

    async def find(self, response_id: str) -> Origin | None:
        if (origin := self._cached(response_id)) is not None:
            return origin
        if (origin := await self._threads.run(self._stored, response_id)) is not None:
            return self._remember(origin)
        deadline = time.monotonic() + WAIT_FOR_WRITER_SECONDS
        while time.monotonic() < deadline:  # just created here: the recording thread is about to know it
            await asyncio.sleep(POLL_SECONDS)
            if (origin := self._cached(response_id)) is not None:
                return origin
        origin = await self._threads.run(self._stored, response_id)  # created by another replica
        return self._remember(origin) if origin is not None else None

    async def creator(self, response_id: str) -> str | None:
        """Who created the response through this proxy, whatever its status (an answer cut short or
        failed may still be one the provider holds): None if no event names it yet. Not waited for."""
        if (origin := self._cached(response_id)) is not None:
            return origin.owner
        origin = await self._threads.run(self._stored, response_id, False)
        return origin.owner if origin is not None else None

    def close(self) -> None:
        self._threads.close()

    def _remember(self, origin: Origin) -> Origin:
        with self._lock:
            self._known[origin.response_id] = origin
        return origin
