"""The background writer: the only path by which usage reaches the database.

The request path calls `submit()`, which never blocks and never touches the database. A thread
collects what was submitted, turns each item into rows (`to_record()`: token counting and pricing
happen here, off the event loop), and commits them in batches. When a commit fails (database down)
the batch is appended to a local spool file and replayed, in order, once the database answers again.
Rows carry their own primary keys, so a replay never duplicates anything. `close()` drains the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import orjson
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.storage import repo

log = logging.getLogger("taskproxy.writer")

_DATETIME_FIELDS = {"ts", "created_at", "completed_at"}


@dataclass
class Record:
    """Rows for one usage event or rejection, and the work item to register if it is new."""

    kind: Literal["event", "rejection"]
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
    items: dict[str, dict] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        (self.events if record.kind == "event" else self.rejections).append(record.row)
        if record.new_work_item is not None:
            self.items.setdefault(record.new_work_item["id"], record.new_work_item)

    def __len__(self) -> int:
        return len(self.events) + len(self.rejections)


class _Marker:
    """Queued by flush(): set once everything queued before it is committed or spooled."""

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
        on_commit: Callable[[list[dict]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._spool_path = Path(spool_path)
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_replay_attempt = 0.0
        self.committed = 0
        self.spooled = 0

    # -- called from the request path -------------------------------------------------------------

    def submit(self, item: Recordable) -> None:
        self._queue.put(item)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="taskproxy-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is committed (or spooled). For CLI and tests."""
        marker = _Marker()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - database hung beyond the timeout
            log.error("writer did not drain within %.0fs; %d items still queued", timeout, self.queue_depth)
        self._thread = None

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        self._replay_spool()
        stopping = False
        while not stopping:
            batch, markers, stopping = self._collect()
            if len(batch):
                self._write(batch)
            elif self._spool_path.exists():
                self._replay_spool()
            for marker in markers:
                marker.done.set()

    def _collect(self) -> tuple[_Batch, list[_Marker], bool]:
        """Take items until the batch is full, the interval since the first item has passed, or stop."""
        batch, markers = _Batch(), []
        deadline: float | None = None
        while len(batch) < self._batch_size:
            timeout = self._flush_interval if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if item is _STOP:
                self._drain_into(batch, markers)
                return batch, markers, True
            if isinstance(item, _Marker):
                markers.append(item)
                break
            self._add(batch, item)
            if deadline is None:
                deadline = time.monotonic() + self._flush_interval
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

    @staticmethod
    def _add(batch: _Batch, item: object) -> None:
        try:
            batch.add(item.to_record())  # type: ignore[attr-defined]
        except Exception:  # a bug in building one record must not lose the others
            log.exception("could not build a usage record; it was skipped")

    def _write(self, batch: _Batch) -> None:
        if self._spool_path.exists():
            self._replay_spool()
        if self._spool_path.exists():  # still unreachable: keep the order, spool behind the rest
            self._spool(batch)
            return
        try:
            repo.write_batch(self._engine, events=batch.events, rejections=batch.rejections, new_items=batch.items.values())
        except SQLAlchemyError as exc:
            log.warning("database unavailable (%s); spooling %d records to %s", exc.__class__.__name__, len(batch), self._spool_path)
            self._spool(batch)
            return
        self.committed += len(batch)
        if self._on_commit is not None:
            self._on_commit(batch.events)

    def _spool(self, batch: _Batch) -> None:
        line = orjson.dumps({"events": batch.events, "rejections": batch.rejections, "items": list(batch.items.values())})
        with self._spool_path.open("ab") as spool:
            spool.write(line + b"\n")
            spool.flush()
        self.spooled += len(batch)

    def _replay_spool(self) -> None:
        """Write the spooled batches back, then remove the file. Stops at the first failure."""
        now = time.monotonic()
        if not self._spool_path.exists() or now - self._last_replay_attempt < 1.0:
            return
        self._last_replay_attempt = now
        try:
            lines = self._spool_path.read_bytes().splitlines()
            for line in lines:
                if not line.strip():
                    continue
                data = orjson.loads(line)
                repo.write_batch(
                    self._engine,
                    events=[_revive(r) for r in data["events"]],
                    rejections=[_revive(r) for r in data["rejections"]],
                    new_items=[_revive(r) for r in data["items"]],
                )
        except SQLAlchemyError:
            return
        except orjson.JSONDecodeError:
            log.error("spool file %s has a damaged line; it is kept for inspection", self._spool_path)
            self._spool_path.rename(self._spool_path.with_suffix(f".damaged-{int(time.time())}"))
            return
        replayed = sum(1 for line in lines if line.strip())
        self._spool_path.unlink()
        log.info("replayed %d spooled batches from %s", replayed, self._spool_path)


def _revive(row: dict) -> dict:
    return {k: datetime.fromisoformat(v) if k in _DATETIME_FIELDS and isinstance(v, str) else v for k, v in row.items()}
