"""The background writer: batches, drains on close, spools while the database is down, replays once."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from taskproxy.metering.usage import Rejected
from taskproxy.storage.db import upgrade_schema
from taskproxy.storage.models import Rejection
from taskproxy.storage.writer import BatchWriter
from taskproxy.timeutil import utcnow


class FlakyDatabase:
    """A real SQLite file whose connections fail while `down` is set (an outage, as the writer sees it)."""

    def __init__(self, path: Path) -> None:
        self.path, self.down = path, False
        self.engine = create_engine("sqlite://", creator=self._connect, poolclass=NullPool)
        upgrade_schema(self.engine)

    def _connect(self) -> sqlite3.Connection:
        if self.down:
            raise sqlite3.OperationalError("database is down")
        return sqlite3.connect(self.path, check_same_thread=False)

    def rejection_ids(self) -> list[str]:
        with self.engine.connect() as connection:
            return list(connection.execute(select(Rejection.id)).scalars())


def rejections(n: int) -> list[Rejected]:
    return [Rejected(uuid.uuid4().hex, utcnow(), "key_1", "work_item_required", "/v1/chat/completions") for _ in range(n)]


def test_close_drains_everything_submitted(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.5, batch_size=7, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    items = rejections(100)
    for item in items:
        writer.submit(item)
    writer.close()
    assert sorted(db.rejection_ids()) == sorted(i.id for i in items)


def test_outage_spools_then_replays_exactly_once(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    spool = tmp_path / "spool.jsonl"
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=spool)
    writer.start()
    try:
        db.down = True
        during = rejections(25)
        for item in during:
            writer.submit(item)
        assert writer.flush()
        assert writer.spool_pending and writer.spooled == 25

        db.down = False
        time.sleep(1.1)  # the writer retries the spool at most once a second
        after = rejections(5)
        for item in after:
            writer.submit(item)
        assert writer.flush()
    finally:
        writer.close()
    ids = db.rejection_ids()
    assert sorted(ids) == sorted(i.id for i in during + after)  # all of them, none twice
    assert list(tmp_path.glob("spool*")) == []


def test_replaying_a_spool_already_written_adds_nothing(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    spool = tmp_path / "spool.jsonl"
    items = rejections(3)
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=spool)
    writer.start()
    db.down = True
    for item in items:
        writer.submit(item)
    writer.flush()
    db.down = False
    writer.close()  # drains: replays the spool
    assert list(tmp_path.glob("spool*")) == [] and len(db.rejection_ids()) == 3

    # A crash between commit and removing the file would leave the spool behind: replay it again.
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=spool)
    db.down = True
    writer.start()
    for item in items:
        writer.submit(item)
    writer.flush()
    db.down = False
    writer.close()
    with db.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Rejection)).scalar_one() == 3


def test_a_spool_left_by_a_dead_worker_is_replayed_by_the_next_process(tmp_path: Path) -> None:
    import orjson

    db = FlakyDatabase(tmp_path / "t.db")
    items = rejections(4)
    rows = [i.to_record().row for i in items]
    # What a worker that died while the database was down leaves behind: its own spool file.
    (tmp_path / "spool.424242.jsonl").write_bytes(orjson.dumps({"events": [], "rejections": rows, "items": []}) + b"\n")
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    writer.close()
    assert sorted(db.rejection_ids()) == sorted(i.id for i in items)
    assert list(tmp_path.glob("spool*")) == []


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_is_written(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    good = rejections(3)
    bad = Rejected("x" * 40, utcnow(), "key_1", "r" * 5000, "/v1/chat/completions")  # fine for SQLite's types...

    class Poison:
        def to_record(self):  # type: ignore[no-untyped-def]
            record = bad.to_record()
            record.row["reason"] = object()  # ...this is not: the driver refuses it
            return record

    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    writer.submit(good[0])
    writer.submit(Poison())
    writer.submit(good[1])
    writer.flush()
    writer.submit(good[2])  # the writer is still alive and nothing is stuck behind the bad row
    writer.close()
    assert sorted(db.rejection_ids()) == sorted(i.id for i in good)
    assert writer.set_aside == 1 and (tmp_path / "spool.rejected.jsonl").exists()


def test_a_refused_row_in_a_spool_is_set_aside_and_the_rest_replayed(tmp_path: Path) -> None:
    import orjson

    db = FlakyDatabase(tmp_path / "t.db")
    good = rejections(30)
    lines = [orjson.dumps({"events": [], "rejections": [r.to_record().row], "items": []}) for r in good]
    poisoned = {"events": [], "rejections": [{**good[0].to_record().row, "id": "poison", "reason": None}], "items": []}  # NOT NULL column
    lines.insert(5, orjson.dumps(poisoned))
    (tmp_path / "spool.deadhost-1-abc.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    writer.close()
    assert sorted(db.rejection_ids()) == sorted(r.id for r in good)
    assert writer.set_aside == 1 and b"poison" in (tmp_path / "spool.rejected.jsonl").read_bytes()
    assert [p.name for p in tmp_path.glob("spool*")] == ["spool.rejected.jsonl"]


def test_a_live_process_spool_is_never_taken_over(tmp_path: Path) -> None:
    from taskproxy.storage.spool import Spool

    owner, other = Spool(tmp_path / "spool.jsonl"), Spool(tmp_path / "spool.jsonl")
    owner.append({"events": [], "rejections": [], "items": []})
    assert not other.pending()  # the owner holds its file's lock
    written: list[dict] = []
    assert other.replay(written.append, lambda exc: False) and written == []
    owner.close()  # as when the owner exits (or dies: the lock goes with the process)
    assert other.pending()
    assert other.replay(written.append, lambda exc: False) and written == [{"events": [], "rejections": [], "items": []}]
    assert not other.pending() and list(tmp_path.glob("spool.*")) == []


def test_a_backlog_is_reported_to_the_request_path_and_written_without_waiting_out_the_interval(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=1.0, batch_size=20, spool_path=tmp_path / "spool.jsonl")
    items = rejections(20 * 10 + 1)  # more than BACKLOG_BATCHES full batches, before the thread runs
    for item in items:
        writer.submit(item)
    assert writer.backlogged  # the request path now slows down (routes/pipeline.py)
    writer.start()
    try:
        # A full batch waiting is written at once: draining 11 batches does not take 11 intervals.
        assert writer.flush(timeout=5.0)
        assert not writer.backlogged and writer.queue_depth == 0
    finally:
        writer.close()
    assert sorted(db.rejection_ids()) == sorted(i.id for i in items)
