"""Keeping the period reports' latest snapshots (`reports.snapshot_minutes`).

On an organisation's scale the adoption report and the signals over 30 days take a minute or more to
compute (docs/scale.md), too long for a page someone waits for, and every reader would compute them
again. With snapshots on, the replicas compute each over the default period (the last 30 days) every
`snapshot_minutes`, one replica at a time (storage/snapshots.py claims the row), in a report process
(reports/runner.py), which stores the route's JSON answer, gzipped, itself; `?snapshot=latest` then
reads one row. The answer is the report of its own `since`/`until`, exactly: what the route computes for that
period.

Gzipped, because the answers are large on that scale (the seed organisation's: 10.5 MB of adoption
report and 46 MB of signals; 0.6 and 7.9 MB gzipped): the serving process reads and sends the
stored bytes as they are to a client that accepts gzip, and unpacks them piece by piece for one that
does not, instead of holding the whole answer (serving the plain 46 MB left replicas at 270-358 MiB).
"""

from __future__ import annotations

import gzip
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import anyio
import orjson
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.errors import InvalidRequest, NotFound
from taskproxy.reports.adoption import adoption_options, adoption_report
from taskproxy.reports.runner import ReportRunner
from taskproxy.reports.signals import gaming_signals
from taskproxy.settings import Settings
from taskproxy.storage import snapshots
from taskproxy.storage.snapshots import Snapshot
from taskproxy.timeutil import report_period, utcnow

log = logging.getLogger("taskproxy.reports")

HOLD = timedelta(minutes=30)  # a claim outlasts a computation; a replica that died holding one is replaced after it
LONGEST_WAIT_SECONDS = 60.0  # between checks for a due snapshot, at most


UNPACKED_PIECE_BYTES = 256 * 1024  # of gzipped input unpacked at a time, for a client that does not take gzip


def gzipped_json(report: dict[str, Any]) -> bytes:
    """What a snapshot stores: the route's JSON answer, gzipped (run in the report's process)."""
    return gzip.compress(orjson.dumps(report), compresslevel=6, mtime=0)


def report_of(snapshot: Snapshot) -> dict[str, Any]:
    """The report a snapshot holds, decoded (for the CSV and the CLI)."""
    return orjson.loads(gzip.decompress(snapshot.body))  # type: ignore[no-any-return]


def unpacked(body: bytes) -> Iterator[bytes]:
    """The JSON of a stored snapshot, unpacked a piece at a time."""
    unpacking = zlib.decompressobj(wbits=31)  # gzip's framing
    for start in range(0, len(body), UNPACKED_PIECE_BYTES):
        if piece := unpacking.decompress(body[start : start + UNPACKED_PIECE_BYTES]):
            yield piece
    if rest := unpacking.flush():
        yield rest


REPORTS: dict[str, Callable[..., dict[str, Any]]] = {"adoption": adoption_report, "signals": gaming_signals}  # snapshot: report


def snapshot_options(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each snapshot's report options: those its route passes."""
    return {"adoption": {"team": None, **adoption_options(settings)}, "signals": {"thresholds": settings.signals}}


def compute_and_store(engine: Engine, *, name: str, since: datetime, until: datetime, computed_by: str, options: dict[str, Any]) -> float:
    """In the report's process: compute the report `name`, store it as the snapshot and let the claim
    go. The answer goes from this process to the database, never through the serving one. Returns
    the seconds the computation took."""
    started = time.perf_counter()
    body = gzipped_json(REPORTS[name](engine, since=since, until=until, **options))
    seconds = time.perf_counter() - started
    snapshots.store(engine, name, since=since, until=until, computed_at=utcnow(), seconds=seconds, computed_by=computed_by, body=body)
    return seconds


def check_asked_alone(period_or_team: dict[str, object]) -> None:
    """A snapshot covers its own period and every team: asking for one with a period or a team is an
    error, not a silent choice between them. `period_or_team`: {the argument's name as the caller
    spells it: its value}."""
    for name, value in period_or_team.items():
        if value:
            raise InvalidRequest(
                f"The latest snapshot covers its own period (the last 30 days when it was computed) and every team: ask without "
                f"'{name}', or compute the report for the period you want.", param=name.lstrip("-"),
            )  # fmt: skip


def latest(engine: Engine, settings: Settings, name: str) -> Snapshot:
    """The latest snapshot of the report `name` (blocking), or NotFound saying why there is none."""
    if not settings.reports.snapshot_minutes:
        raise NotFound("Report snapshots are off: set reports.snapshot_minutes, or compute the report for a period.")
    found = snapshots.latest(engine, name)
    if found is None:
        raise NotFound(f"The {name} report has no snapshot yet: the first is on its way. Ask again shortly, or compute the report.")
    return found


class SnapshotKeeper:
    """Computes each report's snapshot when it is due and this replica wins the claim."""

    def __init__(self, engine: Engine, runner: ReportRunner, settings: Settings) -> None:
        self._engine = engine
        self._runner = runner
        self._every = timedelta(minutes=settings.reports.snapshot_minutes)
        self._options = snapshot_options(settings)
        self._me = f"{socket.gethostname()}:{os.getpid()}"
        self._holding: set[str] = set()

    async def run(self) -> None:
        """Until cancelled: compute every snapshot that is due, then wait a while."""
        pause = min(self._every.total_seconds() / 2, LONGEST_WAIT_SECONDS)
        while True:
            for name in REPORTS:
                try:
                    await self._keep(name)
                except SQLAlchemyError as exc:
                    log.warning("could not keep the %s snapshot: %s", name, exc.__class__.__name__)
            await anyio.sleep(pause)

    async def _keep(self, name: str) -> None:
        if not await anyio.to_thread.run_sync(snapshots.claim, self._engine, name, utcnow(), self._every, HOLD):
            return
        self._holding.add(name)
        since, until = report_period(None, None)
        try:
            seconds = await self._runner.run(compute_and_store, name=name, since=since, until=until, computed_by=self._me,
                                             options=self._options[name])  # fmt: skip
        except Exception:
            log.exception("the %s snapshot could not be computed", name)
            self._holding.discard(name)
            await anyio.to_thread.run_sync(snapshots.release, self._engine, name)
            return
        self._holding.discard(name)  # (cancelled, it stays: `close` lets the claim go)
        log.info("computed the %s snapshot of %s to %s in %.1f s", name, since.isoformat(), until.isoformat(), seconds)

    def close(self) -> None:
        """Let go of the claims of computations cut short (blocking): another replica takes them at once."""
        for name in list(self._holding):
            try:
                snapshots.release(self._engine, name)
            except SQLAlchemyError as exc:
                log.warning("could not let go of the %s snapshot's claim: %s", name, exc.__class__.__name__)
        self._holding.clear()
