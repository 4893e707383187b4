"""Keeping the period reports' latest snapshots (`reports.snapshot_minutes`).

On an organisation's scale the adoption report and the signals over 30 days take a minute or more to
compute (docs/scale.md), too long for a page someone waits for, and every reader would compute them
again. With snapshots on, the serving processes compute each over the default period (the last 30
days) every `snapshot_minutes`, one at a time, in a report process (reports/runner.py), which claims
the snapshot's row (storage/snapshots.py) and stores the route's JSON answer, gzipped, itself;
`?snapshot=latest` then reads one row. The answer is the report of its own `since`/`until`, exactly:
what the route computes for that period. The CSV of a snapshot is made in a report process too. The
dashboard's overview is kept the same way (app.py adds it; dashboard/data.py reads it).

Gzipped, because the answers are large on that scale (the seed organisation's: 10.5 MB of adoption
report and 46 MB of signals; 0.6 and 7.9 MB gzipped): the serving process reads and sends the
stored bytes as they are to a client that accepts gzip, and unpacks them piece by piece for one that
does not, instead of holding the whole answer (serving the plain 46 MB left replicas at 270-358 MiB).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Self

import anyio
import orjson
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy import __version__, privacy
from taskproxy.errors import InvalidRequest, NotFound
from taskproxy.reports.named import ADOPTION, SIGNALS, adoption_options, signal_options
from taskproxy.reports.runner import ReportRunner
from taskproxy.settings import Settings
from taskproxy.storage import snapshots
from taskproxy.storage.snapshots import Snapshot
from taskproxy.timeutil import report_period, utcnow

log = logging.getLogger("taskproxy.reports")

HOLD = timedelta(minutes=30)  # renewed every third of it while computing; a process that died holding one is replaced after it
# A computation still running after this is stuck (a lock never granted, a query planned badly), not
# slow: its process is stopped and its claims are no longer renewed, so that another process may try.
LONGEST_COMPUTE = 4 * HOLD
BACK_OFF = timedelta(minutes=10)  # after a failed computation (or `snapshot_minutes`, if shorter), before the next try
LONGEST_WAIT_SECONDS = 60.0  # between checks for a due snapshot, at most
UNUSED_FOR = timedelta(days=7)  # a snapshot under a name no process here computes, left that long, is deleted
PRUNE_EVERY_SECONDS = 3600.0


UNPACKED_PIECE_BYTES = 256 * 1024  # of gzipped input unpacked at a time, for a client that does not take gzip


def gzipped_json(report: Any) -> bytes:
    """What a snapshot stores: the route's JSON answer, gzipped (run in the report's process)."""
    return gzip.compress(orjson.dumps(report), compresslevel=6, mtime=0)


def for_team(report: dict[str, Any], team: str) -> dict[str, Any]:
    """The adoption report as `adoption_report(..., team=team)` gives it, taken from one computed for
    every team (a snapshot): a team lead's answer without computing the organisation's again. (Here, not
    in adoption.py: a serving process does not load the reports' modules, tests/test_process.py.)"""
    entry = next((t for t in report["teams"] if t.get("team") == team), None) or privacy.withheld(team, report["min_group_size"])
    return {**report, "team": team, "overall": {k: v for k, v in entry.items() if k != "team"}, "teams": [entry]}


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


@dataclass(frozen=True)
class Definition:
    """How a snapshot is computed: `report(engine, since=, until=, **options)`; then, from its answer
    and for its period, each of `then` (name, function, options): `function(engine, since=, until=,
    answer=the report, **options)`, kept under its own name by the same report process. The
    dashboard's overview is made so from the adoption report (it shows that report's rows): one
    computation of the report, where the overview computed alone took it again (~47 s on the seed)."""

    report: Callable[..., Any]
    options: dict[str, Any]
    then: tuple[tuple[str, Callable[..., Any], dict[str, Any]], ...] = ()


Definitions = dict[str, Definition]  # stored name: how it is computed


def snapshot_name(report: str, fingerprint: object) -> str:
    """The row a snapshot of `report` is kept under: its name and a digest of what it is computed
    with (taskproxy's version, the report's options). A process reads only a snapshot computed as it
    would compute the report itself: after a change of the privacy floor or of a threshold, or while
    two versions run side by side during an upgrade, it finds none of its own (and computes, or waits
    for its own), instead of showing figures made under other rules."""
    digest = hashlib.sha256(repr((__version__, fingerprint)).encode()).hexdigest()[:12]
    return f"{report}:{digest}"


def _api_options(settings: Settings) -> dict[str, dict[str, Any]]:
    """The API's snapshots' options: those their routes pass."""
    return {"adoption": {"team": None, **adoption_options(settings)}, "signals": signal_options(settings)}


def kept_name(settings: Settings, report: str) -> str:
    """The name the API's snapshot of `report` ('adoption', 'signals') is kept under, with `settings`."""
    return snapshot_name(report, _api_options(settings)[report])


def snapshot_reports(settings: Settings) -> Definitions:
    """The API's snapshots: each report function with the options its route passes, under its name.
    (The dashboard adds its overview's: app.py.)"""
    functions = {"adoption": ADOPTION, "signals": SIGNALS}
    return {snapshot_name(report, options): Definition(functions[report], options) for report, options in _api_options(settings).items()}


class ClaimRenewal:
    """While a report process computes, renews its claims every third of `hold` from a thread of its
    own: a computation that outlasts one claim (the seed organisation's adoption report takes minutes
    on a slow day, and a busier one longer) is not started again by another process halfway through,
    while a process that dies stops renewing and is replaced when its claim runs out."""

    def __init__(self, engine: Engine, me: str, hold: timedelta, longest: timedelta = LONGEST_COMPUTE) -> None:
        self._engine = engine
        self._me = me
        self._hold = hold
        self._longest = longest.total_seconds()  # renewed no longer than this: a stuck process lets go in time
        self._names: set[str] = set()
        self._lock = threading.Lock()  # a name let go is not renewed by a round already under way
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, name="taskproxy-snapshot-claims", daemon=True)

    def add(self, name: str) -> None:
        """Renew the claim of `name` too, as long as `me` holds it."""
        with self._lock:
            self._names.add(name)

    def discard(self, name: str) -> None:
        """Stop renewing `name` (once this returns, no renewal of it is under way)."""
        with self._lock:
            self._names.discard(name)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _renew_until_stopped(self) -> None:
        last = time.monotonic() + self._longest
        while not self._stopped.wait(self._hold.total_seconds() / 3):
            if time.monotonic() > last:
                log.error("a report snapshot has been computing for more than %.0f s: its claims are no longer renewed", self._longest)
                return
            with self._lock:
                for name in sorted(self._names):
                    try:
                        snapshots.renew(self._engine, name, self._me, utcnow() + self._hold)
                    except SQLAlchemyError as exc:  # tried again a third of a claim later
                        log.warning("could not renew the claim of the snapshot %s: %s", name, exc.__class__.__name__)


def compute_and_store(engine: Engine, *, name: str, me: str, every: timedelta, definition: Definition, hold: timedelta = HOLD,
                      longest: timedelta = LONGEST_COMPUTE) -> float | None:  # fmt: skip
    """In the report's process, once it has its turn (`REPORTS_AT_ONCE`): claim the snapshot `name`
    for the serving process `me`, compute its report over the last 30 days from now, and store it as
    gzipped JSON (a report returns what orjson encodes: dicts, lists, dataclasses, datetimes); then
    the snapshots made from it (`Definition.then`), each claimed and stored the same way. The answers
    go from this process to the database, never through the serving one. Returns the seconds the
    computation took, or None when the snapshot was not this process's to compute."""
    if not snapshots.claim(engine, name, me, utcnow(), every, hold):
        return None
    with ClaimRenewal(engine, me, hold, longest) as renewal:
        renewal.add(name)
        return _compute_and_store(engine, name, me, definition, hold, renewal)


def _compute_and_store(engine: Engine, name: str, me: str, definition: Definition, hold: timedelta, renewal: ClaimRenewal) -> float | None:
    since, until = report_period(None, None)
    started = time.perf_counter()
    answer = definition.report(engine, since=since, until=until, **definition.options)
    seconds = time.perf_counter() - started
    if not snapshots.store(engine, name, me, since=since, until=until, computed_at=utcnow(), seconds=seconds, body=gzipped_json(answer)):
        return None  # the claim was taken over (it ran out while renewing failed) and another process stored a newer one
    for follower, function, options in definition.then:
        started = time.perf_counter()
        try:
            # Due whenever the report is: made from this computation, whenever the last one was.
            if not snapshots.claim(engine, follower, me, utcnow(), timedelta(0), hold):
                continue
            renewal.add(follower)
            body = gzipped_json(function(engine, since=since, until=until, answer=answer, **options))
            snapshots.store(engine, follower, me, since=since, until=until, computed_at=utcnow(),
                            seconds=seconds + time.perf_counter() - started, body=body)  # fmt: skip
        except Exception:  # the report itself is kept (stored above); this one is tried again with the next
            log.exception("the snapshot %s could not be made from %s", follower, name)
            _let_go(engine, follower, me, renewal)
    return seconds


def _let_go(engine: Engine, name: str, me: str, renewal: ClaimRenewal) -> None:
    """Free the claim of a snapshot that could not be made, at once: the next report's process tries it."""
    renewal.discard(name)
    try:
        snapshots.back_off(engine, name, me, utcnow())
    except SQLAlchemyError as exc:  # the claim then runs out by itself
        log.warning("could not let go of the snapshot %s: %s", name, exc.__class__.__name__)


def snapshot_csv(engine: Engine, *, name: str) -> tuple[str, datetime]:
    """In the report's process: the adoption snapshot `name` as the CSV route answers it, and when it
    was computed; or NotFound."""
    snapshot = latest(engine, name)
    from taskproxy.reports.adoption_export import adoption_csv  # the CLI's: not imported by a serving process

    return adoption_csv(report_of(snapshot)), snapshot.computed_at


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


def check_on(settings: Settings) -> None:
    """NotFound when this configuration keeps no snapshots (whatever other processes may have stored)."""
    if not settings.reports.snapshot_minutes:
        raise NotFound("Report snapshots are off in this configuration: set reports.snapshot_minutes, or compute the report for a period.")


def latest(engine: Engine, name: str) -> Snapshot:
    """The latest snapshot kept under `name` (blocking), or NotFound saying there is none yet."""
    found = snapshots.latest(engine, name)
    if found is None:
        report = name.partition(":")[0]
        raise NotFound(f"The {report} report has no snapshot yet: the first is on its way. Ask again shortly, or compute the report.")
    return found


class SnapshotKeeper:
    """Computes each report's snapshot when it is due and this process wins the claim."""

    def __init__(self, engine: Engine, runner: ReportRunner, every: timedelta, reports: Definitions,
                 observe: Callable[[str, snapshots.State], None] = lambda name, state: None,
                 longest: timedelta = LONGEST_COMPUTE) -> None:  # fmt: skip
        """`observe(name, state)` is told of each snapshot's state as each look finds it (the metrics);
        `longest`: how long a computation may run before it is stopped as stuck."""
        self._engine = engine
        self._longest = longest
        self._runner = runner
        self._every = every
        self._reports = reports
        self._observe = observe
        self._me = f"{socket.gethostname()}:{os.getpid()}"

    async def run(self) -> None:
        """Until cancelled: compute every snapshot that is due, then wait a while."""
        pause = min(self._every.total_seconds() / 2, LONGEST_WAIT_SECONDS)
        pruned_at = -PRUNE_EVERY_SECONDS
        while True:
            for name in self._reports:
                try:
                    await self._keep(name)
                except SQLAlchemyError as exc:
                    log.warning("could not keep the snapshot %s: %s", name, exc.__class__.__name__)
            if time.monotonic() - pruned_at >= PRUNE_EVERY_SECONDS:
                pruned_at = time.monotonic()
                await anyio.to_thread.run_sync(self.prune)
            await anyio.sleep(pause)

    def prune(self) -> None:
        """Delete the snapshots left under names no process computes any more (blocking): after a
        change of options or an upgrade, the old names' rows (up to megabytes each) would stay for good."""
        try:
            kept = [*self._reports, *(follower for definition in self._reports.values() for follower, _, _ in definition.then)]
            gone = snapshots.prune(self._engine, kept, utcnow(), max(UNUSED_FOR, 3 * self._every))
        except SQLAlchemyError as exc:
            log.warning("could not prune the report snapshots: %s", exc.__class__.__name__)
            return
        if gone:
            log.info("deleted %d report snapshots no process has refreshed for %s", gone, max(UNUSED_FOR, 3 * self._every))

    async def _keep(self, name: str) -> None:
        # A read first: a process starts for a snapshot only when one looks due; it claims the
        # snapshot itself, once it has its turn, so that waiting for it does not eat into the claim.
        if not (await self._look(name)).is_due(utcnow(), self._every):
            return
        try:
            # Past LONGEST_COMPUTE the report's process is stopped (and cancels its query) as for a client
            # that hangs up; its claims are no longer renewed by then either.
            with anyio.fail_after(self._longest.total_seconds()):
                seconds = await self._runner.run(compute_and_store, name=name, me=self._me, every=self._every,
                                                 definition=self._reports[name], longest=self._longest)  # fmt: skip
        except Exception:
            log.exception("the snapshot %s could not be computed; the next try in %s", name, min(self._every, BACK_OFF))
            await anyio.to_thread.run_sync(snapshots.back_off, self._engine, name, self._me, utcnow() + min(self._every, BACK_OFF))
            return
        if seconds is not None:
            log.info("computed the snapshot %s in %.1f s", name, seconds)
            await self._look(name)

    async def _look(self, name: str) -> snapshots.State:
        """The state of `name`'s snapshot, and of those made from it, told to `observe`."""
        found = await anyio.to_thread.run_sync(snapshots.state, self._engine, name)
        self._observe(name, found)
        for follower, _, _ in self._reports[name].then:
            self._observe(follower, await anyio.to_thread.run_sync(snapshots.state, self._engine, follower))
        return found

    def close(self) -> None:
        """Let go of the claims of computations cut short (blocking): another process takes them at once."""
        try:
            snapshots.release(self._engine, self._me)
        except SQLAlchemyError as exc:
            log.warning("could not let go of the report snapshots' claims: %s", exc.__class__.__name__)
