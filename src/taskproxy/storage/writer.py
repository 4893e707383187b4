"""The background writer: the only path by which usage reaches the database.

The request path calls `submit()`, which never blocks and never touches the database. A thread
collects what was submitted, turns each item into rows (`to_record()`: token counting and pricing
happen here, off the event loop), and commits them in batches. While the database cannot be reached
the batches go to a local spool (see `spool.py`) and are replayed, once, when it answers again. Rows
carry their own primary keys, so a replay never duplicates anything. A row the database refuses for
itself is set aside in a file rather than blocking the rows behind it. `close()` drains the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from taskproxy.storage import repo
from taskproxy.storage.spool import Spool

log = logging.getLogger("taskproxy.writer")

_DATETIME_FIELDS = {"ts", "created_at", "completed_at"}
REPLAY_INTERVAL_SECONDS = 1.0
BACKLOG_BATCHES = 10


@dataclass
class Record:
    """Rows for one usage event, rejection or audit entry, and the work item to register if it is new."""

    kind: Literal["event", "rejection", "audit"]
    row: dict
    new_work_item: dict | None = None


class Recordable(Protocol):
    def to_record(self) -> Record: ...


class UsageSink(Protocol):
    """Where the request path hands what it observed. Must return at once."""

    def submit(self, item: Recordable) -> None: ...


@dataclass
class _Batch:
    events: list[dict] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    items: dict[str, dict] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        {"event": self.events, "rejection": self.rejections, "audit": self.audit}[record.kind].append(record.row)
        if record.new_work_item is not None:
            self.items.setdefault(record.new_work_item["id"], record.new_work_item)

    def __len__(self) -> int:
        return len(self.events) + len(self.rejections) + len(self.audit)

    def as_dict(self) -> dict:
        return {"events": self.events, "rejections": self.rejections, "audit": self.audit, "items": list(self.items.values())}


class _Marker:
    """Queued by flush(): set once everything queued before it is committed or spooled."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


def database_down(exc: Exception) -> bool:
    """The database could not be reached (spool and retry), as opposed to refusing a row."""
    return isinstance(exc, OperationalError | InterfaceError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def write_spooled(engine: Engine, batch: dict) -> None:
    revive = _revive
    repo.write_batch(
        engine,
        events=[revive(r) for r in batch.get("events", ())],
        rejections=[revive(r) for r in batch.get("rejections", ())],
        audit=[revive(r) for r in batch.get("audit", ())],
        new_items=[revive(r) for r in batch.get("items", ())],
    )


class BatchWriter:
    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval: float = 0.25,
        batch_size: int = 500,
        spool_path: str | Path = "taskproxy-spool.jsonl",
        on_record: Sequence[Callable[[Record], None]] = (),
    ) -> None:
        self._engine = engine
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._spool = Spool(spool_path)
        self._on_record = list(on_record)  # see each record as soon as it is built (budgets, metrics)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._urgent = threading.Event()  # set by flush() and close(): write now
        self._thread: threading.Thread | None = None
        self._last_replay = 0.0
        self.committed = 0
        self.spooled = 0
        self.set_aside = 0

    def listen(self, listener: Callable[[Record], None]) -> None:
        """Also call `listener` with each record as it is built (before start)."""
        self._on_record.append(listener)

    # -- called from the request path -------------------------------------------------------------

    def submit(self, item: Recordable) -> None:
        self._queue.put(item)
        if self._queue.qsize() == self._batch_size:  # a full batch: write it now, not at the interval
            self._urgent.set()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def backlogged(self) -> bool:
        """More than `BACKLOG_BATCHES` full batches wait: the request path should slow down (it would
        otherwise queue records faster than they are written, and memory would grow without end)."""
        return self._queue.qsize() > self._batch_size * BACKLOG_BATCHES

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="taskproxy-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is committed (or spooled). For CLI and tests."""
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
        self._spool.close()

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        self._replay(force=True)
        stopping = False
        while not stopping:
            batch, markers, stopping = self._collect()
            try:
                if len(batch):
                    self._write(batch)
                else:
                    self._replay()
            except Exception:  # never let one failure stop recording for good
                log.exception("the writer failed on a batch of %d records", len(batch))
            for marker in markers:
                marker.done.set()
        self._replay(force=True)

    def _collect(self) -> tuple[_Batch, list[_Marker], bool]:
        """Wait for the first item, then let the interval pass and take what has arrived meanwhile
        (up to a full batch). The thread wakes once per interval, not once per request: each wake-up
        would take the GIL from the event loop. `flush()` and `close()` cut the wait short."""
        batch, markers = _Batch(), []
        try:
            first = self._queue.get(timeout=self._flush_interval)
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

    def _drain_into(self, batch: _Batch, markers: list[_Marker]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Marker):
                markers.append(item)
            elif item is not _STOP:
                self._add(batch, item)

    def _add(self, batch: _Batch, item: object) -> None:
        try:
            record = item.to_record()  # type: ignore[attr-defined]
        except Exception:  # to_record is written never to raise; this is the last line of defence
            log.exception("could not build a usage record; it was skipped")
            return
        batch.add(record)
        for listener in self._on_record:
            try:
                listener(record)
            except Exception:
                log.exception("a record listener failed")

    def _write(self, batch: _Batch) -> None:
        if not self._replay(force=True):  # the database is still away: keep the order, spool behind the rest
            self._spool_batch(batch)
            return
        try:
            repo.write_batch(self._engine, events=batch.events, rejections=batch.rejections, audit=batch.audit, new_items=batch.items.values())
        except SQLAlchemyError as exc:
            if database_down(exc):
                log.warning("database unavailable (%s); spooling %d records", exc.__class__.__name__, len(batch))
                self._spool_batch(batch)
                return
            try:
                self._write_one_by_one(batch, exc)
            except SQLAlchemyError:  # went down half-way: the rows written are skipped on replay (ids)
                self._spool_batch(batch)
            return
        self.committed += len(batch)

    def _write_one_by_one(self, batch: _Batch, first_error: SQLAlchemyError) -> None:
        """The database refused the batch itself: write row by row and set aside the rows it refuses."""
        log.error("the database refused a batch (%s); writing its rows one by one", first_error.__class__.__name__)
        items = list(batch.items.values())
        for kind, rows in (("events", batch.events), ("rejections", batch.rejections), ("audit", batch.audit)):
            for row in rows:
                try:
                    repo.write_batch(self._engine, new_items=items, **{"events": [], "rejections": [], "audit": [], kind: [row]})
                    self.committed += 1
                except SQLAlchemyError as exc:
                    if database_down(exc):
                        raise  # the caller spools (or, replaying, keeps) what is left
                    else:
                        self._spool.set_aside_rows([row], f"{exc.__class__.__name__}: {str(exc)[:300]}")
                        self.set_aside += 1

    def _spool_batch(self, batch: _Batch) -> None:
        try:
            self._spool.append(batch.as_dict())
            self.spooled += len(batch)
        except OSError:
            log.exception("could not spool %d records: the database is down and the spool is not writable", len(batch))

    def _replay(self, *, force: bool = False) -> bool:
        """Replay what is spooled (at most once a second unless forced). True if nothing is left."""
        if not self._spool.pending():
            return True
        now = time.monotonic()
        if not force and now - self._last_replay < REPLAY_INTERVAL_SECONDS:
            return False
        if force and now - self._last_replay < REPLAY_INTERVAL_SECONDS / 4:
            return False  # the database failed a moment ago: don't hammer it on every batch
        self._last_replay = now
        return self._spool.replay(self._write_spooled, database_down)

    def _write_spooled(self, data: dict) -> None:
        """Write one spooled batch; rows the database refuses for themselves are set aside. Raises only if it is down."""
        try:
            write_spooled(self._engine, data)
            self.committed += sum(len(data.get(kind, ())) for kind in ("events", "rejections", "audit"))
        except SQLAlchemyError as exc:
            if database_down(exc):
                raise
            batch = _Batch(
                events=[_revive(r) for r in data.get("events", ())], rejections=[_revive(r) for r in data.get("rejections", ())],
                audit=[_revive(r) for r in data.get("audit", ())], items={r["id"]: _revive(r) for r in data.get("items", ())},
            )  # fmt: skip
            self._write_one_by_one(batch, exc)

    @property
    def spool_pending(self) -> bool:
        return self._spool.pending()

    @property
    def spool_bytes(self) -> int:
        return self._spool.size()


def _revive(row: dict) -> dict:
    return {k: datetime.fromisoformat(v) if k in _DATETIME_FIELDS and isinstance(v, str) else v for k, v in row.items()}
