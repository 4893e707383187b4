"""The background writer: the only path by which usage reaches the database.

The request path calls `submit()`, which never blocks and never touches the database. A thread
collects what was submitted, turns each item into rows (`to_record()`: token counting and pricing
happen here, off the event loop), and commits them in batches. Rows carry their own primary keys
and the rollups count only rows an insert wrote, so writing a batch twice changes nothing; that is
what lets every path below retry freely.

- **The database is down**: the batch goes to a local spool (spool.py) and is replayed when the
  database answers again. A database that does not answer at all (gone silent: a failover, a host
  gone) counts as down after `WRITE_WAIT_SECONDS`: the write goes on in a thread of its own until the
  connection's TCP timeouts end it, and the batches meanwhile are spooled without waiting for it
  (answered.py: how long each call is waited for, and when one is left behind). While the database is
  down, a `SELECT 1` bounded by `WRITE_WAIT_WHILE_DOWN_SECONDS` asks whether it answers again before a
  batch is sent, so a large batch replayed to a database just back is not cut short. On SQLite, a
  write lock another process holds past `WRITE_WAIT_SECONDS` is met the same way: spooled to disk,
  where a kill cannot take it, rather than held in memory for the busy timeout. The spooled copy of
  a batch whose write commits late changes nothing when it is replayed. New batches go straight to
  a database that answers, whatever is still waiting in the spool, so a spool that cannot be
  replayed never holds back the rest.
- **The spool cannot be written either** (a full disk): the batch is held in memory and retried;
  `problem` says so (`/readyz` answers 503 with it), and once more than `max_held_records` are held
  the request path refuses new requests (`refusing`) rather than answer requests it cannot record.
- **The database refuses a row for itself** (not because it is down): the batch is split in halves
  until the refused rows are alone; they are set aside in a file (with the reason, for replay after
  a fix: `taskproxy db replay-set-aside`), counted (`set_aside`) and logged; every other row is written.
- **Refusals** are counted in memory per minute, key, reason and route, and written as one row per
  group at most once a second: a flood of refused requests writes rows by the minute, not by the request.

`close()` drains the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from taskproxy.storage.answered import DatabaseCalls
from taskproxy.storage.backlog import BodyWeights
from taskproxy.storage.batch import Batch, Record, Recordable, write
from taskproxy.storage.db import ping
from taskproxy.storage.failures import database_down
from taskproxy.storage.refusals import Refusals
from taskproxy.storage.spool import Spool

log = logging.getLogger("taskproxy.writer")

RETRY_INTERVAL_SECONDS = 1.0  # how often the spool (and what is held in memory) is retried
# How long an idle writer sleeps between looks at the spool and what is held: a wake-up costs a
# replica CPU even with nothing to do, and neither is retried more often than RETRY_INTERVAL_SECONDS.
# A request wakes the writer at once; refusals counted and not yet written keep the flush interval.
IDLE_WAKE_SECONDS = RETRY_INTERVAL_SECONDS
DOWN_PAUSE_SECONDS = 0.25  # after the database failed, batches spool at once for this long instead of trying it
# How long the writer waits for the database to answer a batch (a healthy one takes tens of
# milliseconds) before spooling instead; after a failure, while it is not known to be back, less.
WRITE_WAIT_SECONDS = 2.0
WRITE_WAIT_WHILE_DOWN_SECONDS = 0.5
BACKLOG_BATCHES = 10


class _Marker:
    """Queued by flush(): set once everything queued before it is committed, spooled or held."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class BatchWriter:
    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval: float = 0.25,
        batch_size: int = 500,
        spool_path: str | Path = "taskproxy-spool.jsonl",
        max_held_records: int = 100_000,
        refusals_interval: float = 1.0,
        on_record: Sequence[Callable[[Record], None]] = (),
    ) -> None:
        self._engine = engine
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._spool = Spool(spool_path)
        self._max_held = max_held_records
        self._on_record = list(on_record)  # see each record as soon as it is built (budgets, metrics)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._bodies = BodyWeights()  # what the queued records hold of their requests' bodies
        self._urgent = threading.Event()  # set by flush() and close(): write now
        self._thread: threading.Thread | None = None
        self._refusals = Refusals(refusals_interval)  # a flood of refusals is a few rows a second, not one a request
        self._held: list[Batch] = []  # neither written nor spooled: retried from memory
        self._held_rows = 0
        self._down_since: float | None = None  # the database failed at this time, and has not answered since
        self._spool_error: str | None = None  # the last spool write failed with this
        self._last_retry = 0.0
        self._database = DatabaseCalls(engine)  # each call waited for a bounded time
        self.committed = 0
        self.spooled = 0
        self.set_aside = 0

    def listen(self, listener: Callable[[Record], None]) -> None:
        """Also call `listener` with each record as it is built (before start)."""
        self._on_record.append(listener)

    # -- called from the request path -------------------------------------------------------------

    def submit(self, item: Recordable) -> None:
        if weight := getattr(item, "weight", 0):
            self._bodies.add(getattr(item, "key_id", None), weight)
        self._queue.put(item)
        if self._queue.qsize() == self._batch_size:  # a full batch: write it now, not at the interval
            self._urgent.set()

    def holding(self, key_id: str) -> int:
        """Bytes of this key's request bodies that wait for their records to be built, past KEY_BACKLOG_BYTES (else 0)."""
        return self._bodies.holding(key_id)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def backlogged(self) -> bool:
        """More than `BACKLOG_BATCHES` full batches wait, or records holding more than `BACKLOG_BYTES` of
        bodies: the request path should slow down (it would otherwise queue records faster than they are
        written, and memory would grow without end)."""
        return self._queue.qsize() > self._batch_size * BACKLOG_BATCHES or self._bodies.over

    @property
    def refusing(self) -> bool:
        """So many records are held in memory (neither the database nor the spool takes them) that
        new requests must be refused: their usage could not be recorded."""
        return self._held_rows >= self._max_held

    @property
    def held_rows(self) -> int:
        return self._held_rows

    @property
    def problem(self) -> str | None:
        """Why usage cannot be recorded right now, or None."""
        if not self._held:
            return None
        return (f"usage can be neither written nor spooled ({self._spool_error or 'spool unavailable'}); "
                f"{self._held_rows} records are held in memory")  # fmt: skip

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="taskproxy-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is committed (or spooled, or held). For the CLI and tests."""
        marker = _Marker()
        self._queue.put(marker)
        self._urgent.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._urgent.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - database hung beyond the timeout
            log.error("writer did not drain within %.0fs; %d items still queued", timeout, self.queue_depth)
        self._thread = None
        if self._held:
            log.error("%d usage records could be neither written nor spooled and are lost at exit: %s", self._held_rows, self._spool_error)
        self._spool.close()
        self._database.close()

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._retry(force=True)
        except Exception:  # a bug: never let it stop recording
            log.exception("the writer failed replaying the spool at start")
        stopping = False
        while not stopping:
            batch, markers, stopping = self._collect()
            if self._refusals.due(force=bool(markers) or stopping):
                batch.rejections += self._refusals.take()
            try:
                if len(batch):
                    self._write(batch)
            except Exception:  # a bug: never let it stop recording, nor lose the batch (a replay writes nothing twice)
                log.exception("the writer failed on a batch of %d records; it is spooled and retried", len(batch))
                self._park(batch)
            try:
                self._retry(force=stopping)
            except Exception:
                log.exception("the writer failed retrying what waits in the spool")
            for marker in markers:
                marker.done.set()

    def _collect(self) -> tuple[Batch, list[_Marker], bool]:
        """Wait for the first item, then let the interval pass and take what has arrived meanwhile
        (up to a full batch). Under load the thread wakes once per interval, not once per request: each
        wake-up would take the GIL from the event loop; idle, once per `IDLE_WAKE_SECONDS`. `flush()`
        and `close()` cut the wait short."""
        batch, markers = Batch(), []
        try:
            first = self._queue.get(timeout=self._flush_interval if self._refusals.waiting else IDLE_WAKE_SECONDS)
        except queue.Empty:
            return batch, markers, False
        if first is not _STOP and not isinstance(first, _Marker) and self._queue.qsize() < self._batch_size:
            self._urgent.wait(self._flush_interval)  # with a backlog (a full batch waiting), no pause
        self._urgent.clear()
        item: object = first
        while True:
            if item is _STOP:
                self._drain_into(batch, markers)
                return batch, markers, True
            if isinstance(item, _Marker):
                markers.append(item)
                return batch, markers, False
            self._add(batch, item)
            if len(batch) >= self._batch_size:
                return batch, markers, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, markers, False

    def _drain_into(self, batch: Batch, markers: list[_Marker]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Marker):
                markers.append(item)
            elif item is not _STOP:
                self._add(batch, item)

    def _add(self, batch: Batch, item: object) -> None:
        try:
            record = item.to_record()  # type: ignore[attr-defined]
        except Exception:  # to_record is written never to raise; this is the last line of defence
            log.exception("could not build a usage record; it was skipped")
            return
        finally:
            if weight := getattr(item, "weight", 0):
                self._bodies.add(getattr(item, "key_id", None), -weight)
        if record.kind == "rejection":
            self._refusals.add(record.row)
        else:
            batch.add(record)
        for listener in self._on_record:
            try:
                listener(record)
            except Exception:
                log.exception("a record listener failed")

    # -- writing ----------------------------------------------------------------------------------

    def _database_resting(self) -> bool:
        return self._down_since is not None and time.monotonic() - self._down_since < DOWN_PAUSE_SECONDS

    def _write(self, batch: Batch) -> None:
        if self._database_resting():  # it failed a moment ago: don't make every batch wait on it
            self._park(batch)
            return
        if not self._commit(batch):
            self._park(batch)

    def _commit(self, batch: Batch) -> bool:
        """Write `batch`, setting aside the rows the database refuses for themselves. False: it is down."""
        try:
            self._to_database(batch)
        except SQLAlchemyError as exc:
            if database_down(exc):
                if self._down_since is None:
                    log.warning("database unavailable (%s); usage is spooled until it answers", _reason(exc))
                self._down_since = time.monotonic()
                return False
            log.error("the database refused a batch of %d rows (%s); writing around the rows it refuses", batch.rows(), _reason(exc))
            return self._isolate(batch.units())
        self._down_since = None
        self.committed += len(batch)
        return True

    def _to_database(self, batch: Batch) -> None:
        """`write` the batch, waited for a bounded time (answered.py): past it (or while an earlier write
        still waits), an OperationalError, which counts as the database down."""
        if self._down_since is not None:  # is it answering again? (a short wait: it may well not be)
            self._database.call(ping, WRITE_WAIT_WHILE_DOWN_SECONDS)
        self._database.call(write, WRITE_WAIT_SECONDS, batch)

    def _isolate(self, units: list[Batch]) -> bool:
        """Write `units` in halves until each row the database refuses stands alone; set those aside."""
        if len(units) == 1:
            return self._write_alone(units[0])
        middle = len(units) // 2
        for part in (units[:middle], units[middle:]):
            try:
                self._to_database(Batch.merged(part))
                self.committed += sum(len(unit) for unit in part)
            except SQLAlchemyError as exc:
                if database_down(exc):
                    self._down_since = time.monotonic()
                    return False  # what is left is spooled whole: rows already written are skipped on replay (ids)
                if not self._isolate(part):
                    return False
        return True

    def _write_alone(self, unit: Batch) -> bool:
        try:
            self._to_database(unit)
            self.committed += len(unit)
            return True
        except SQLAlchemyError as exc:
            if database_down(exc):
                self._down_since = time.monotonic()
                return False
            if unit.events and unit.items:  # perhaps only the item it registers is refused: keep the event
                item = Batch(items=unit.items)
                return self._write_alone(Batch(events=unit.events)) and self._write_alone(item)
            self._set_aside(unit, _reason(exc))
            return True

    def _set_aside(self, unit: Batch, reason: str) -> None:
        rows = unit.rows()
        self.set_aside += rows
        log.error("set aside %d row(s) the database refused (%s); kept in %s for replay", rows, reason, self._spool.set_aside)
        try:
            self._spool.set_aside_batch(unit.as_dict(), reason)
        except OSError as exc:
            log.error("could not keep the set-aside row(s) on disk (%s): %s", exc, unit.as_dict())

    def _park(self, batch: Batch) -> None:
        """The database is down: spool the batch, or hold it in memory if the spool cannot be written."""
        try:
            self._spool.append(batch.as_dict())
        except OSError as exc:
            if self._spool_error is None:
                log.error("could not spool %d records (%s); holding them in memory until the database or the disk recovers", len(batch), exc)
            self._spool_error = f"{exc.__class__.__name__}: {exc.strerror or exc}"
            self._held.append(batch)
            self._held_rows += len(batch)
            return
        self._spool_error = None
        self.spooled += len(batch)

    def _retry(self, *, force: bool = False) -> None:
        """Write what is held in memory, then what is spooled (at most once a second unless forced)."""
        if not self._held and not self._spool.pending():
            return
        now = time.monotonic()
        if self._database_resting() and not force or not force and now - self._last_retry < RETRY_INTERVAL_SECONDS:
            return
        self._last_retry = now
        while self._held:
            batch = self._held[0]
            if not self._commit(batch):
                self._move_held_to_spool()
                return
            self._held.pop(0)
            self._held_rows -= len(batch)
        try:
            if not self._spool.replay(self._write_spooled, database_down):
                self._down_since = time.monotonic()
        except OSError as exc:  # reading or claiming a spool file failed: new batches still go to the database
            log.error("could not replay the spool (%s); it is retried later", exc)

    def _move_held_to_spool(self) -> None:
        """The database is down again: what is held goes to the spool if the disk takes it now."""
        while self._held:
            try:
                self._spool.append(self._held[0].as_dict())
            except OSError:
                return
            batch = self._held.pop(0)
            self._held_rows -= len(batch)
            self.spooled += len(batch)
            self._spool_error = None

    def _write_spooled(self, data: dict) -> None:
        """Write one spooled batch; rows the database refuses for themselves are set aside. Raises only if it is down."""
        batch = Batch.from_dict(data)
        try:
            self._to_database(batch)
        except SQLAlchemyError as exc:
            if database_down(exc):
                raise
            if not self._isolate(batch.units()):
                raise OperationalError("replaying the spool", {}, ConnectionError("the database went away")) from exc
            return
        self._down_since = None
        self.committed += len(batch)

    @property
    def spool_bytes(self) -> int:
        return self._spool.size()


def replay_set_aside(engine: Engine, spool_path: str | Path) -> tuple[int, int]:
    """Write the rows set aside beside the spool at `spool_path` (once their cause is fixed); keep
    those the database still refuses. Returns (rows written, rows still set aside). The database going
    away meanwhile puts back what was not written yet (Spool.replay_set_aside) and raises."""
    spool = Spool(spool_path)
    counts = {"written": 0, "kept": 0}

    def replay(reason: str, data: dict) -> None:
        batch = Batch.from_dict(data)
        try:
            write(engine, batch)
            counts["written"] += batch.rows()
        except SQLAlchemyError as exc:
            if database_down(exc):
                raise
            spool.set_aside_batch(data, _reason(exc))
            counts["kept"] += batch.rows()

    spool.replay_set_aside(replay)
    return counts["written"], counts["kept"]


def _reason(exc: BaseException) -> str:
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {detail[0][:300] if detail else ''}"
