"""The background writer: batches, drains on close, spools while the database is down, replays once,
holds what neither the database nor the spool takes, and sets aside only the rows the database refuses."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import anyio
import pytest
from conftest import BOTH_DATABASES, read_only
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from taskproxy.audit import AuditRead
from taskproxy.metering.usage import Rejected
from taskproxy.storage.batch import Record
from taskproxy.storage.db import upgrade_schema
from taskproxy.storage.models import AuditEntry, Rejection
from taskproxy.storage.writer import DOWN_PAUSE_SECONDS, BatchWriter, replay_set_aside
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

    def ids(self) -> list[str]:
        with self.engine.connect() as connection:
            return list(connection.execute(select(AuditEntry.id)).scalars())


class Entry:
    """One row for the writer: an audit entry (the simplest record with an id of its own)."""

    def __init__(self, **override: object) -> None:
        self.record = AuditRead(utcnow(), "key_1", "dana", "GET /api/keys", None).to_record()
        self.record.row.update(override)
        self.id = self.record.row["id"]

    def to_record(self) -> Record:
        return Record(self.record.kind, dict(self.record.row))


def entries(n: int) -> list[Entry]:
    return [Entry() for _ in range(n)]


def test_close_drains_everything_submitted(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.5, batch_size=7, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    items = entries(100)
    for item in items:
        writer.submit(item)
    writer.close()
    assert sorted(db.ids()) == sorted(i.id for i in items)


def test_outage_spools_then_replays_exactly_once(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    spool = tmp_path / "spool.jsonl"
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=spool)
    writer.start()
    try:
        db.down = True
        during = entries(25)
        for item in during:
            writer.submit(item)
        assert writer.flush()
        assert writer.spool_bytes > 0 and writer.spooled == 25

        db.down = False
        time.sleep(DOWN_PAUSE_SECONDS)  # the writer gives a database that just failed this long before trying it again
        after = entries(5)
        for item in after:
            writer.submit(item)
        assert writer.flush()
        # New batches go straight to a database that answers, whatever waits in the spool ...
        assert set(i.id for i in after) <= set(db.ids())
        time.sleep(1.1)  # ... which is retried at most once a second
        writer.submit(Entry())
        assert writer.flush()
    finally:
        writer.close()
    ids = db.ids()
    assert len(ids) == len(set(ids)) == 31 and set(i.id for i in during + after) <= set(ids)  # all of them, none twice
    assert list(tmp_path.glob("spool*")) == []


def test_replaying_a_spool_already_written_adds_nothing(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    spool = tmp_path / "spool.jsonl"
    items = entries(3)
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=spool)
    writer.start()
    db.down = True
    for item in items:
        writer.submit(item)
    writer.flush()
    db.down = False
    writer.close()  # drains: replays the spool
    assert list(tmp_path.glob("spool*")) == [] and len(db.ids()) == 3

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
        assert connection.execute(select(func.count()).select_from(AuditEntry)).scalar_one() == 3


def test_a_spool_left_by_a_dead_worker_is_replayed_by_the_next_process(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    items = entries(4)
    rows = [i.to_record().row for i in items]
    # What a worker that died while the database was down leaves behind: its own spool file.
    (tmp_path / "spool.424242.jsonl").write_bytes(orjson.dumps({"events": [], "audit": rows, "items": []}) + b"\n")
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    writer.close()
    assert sorted(db.ids()) == sorted(i.id for i in items)
    assert list(tmp_path.glob("spool*")) == []


class Poison:
    """A row the database refuses for itself (a NOT NULL column left empty), whatever else is in its batch."""

    def __init__(self) -> None:
        self.inner = Entry(actor_owner=None)
        self.id = self.inner.id

    def to_record(self) -> Record:
        return self.inner.to_record()


def test_one_refused_row_never_takes_its_batch_with_it(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.2, batch_size=500, spool_path=tmp_path / "spool.jsonl")
    good = entries(60)
    poison = Poison()
    for item in [*good[:37], poison, *good[37:]]:  # all of them in one batch
        writer.submit(item)
    writer.start()
    writer.flush()
    writer.submit(Entry())  # the writer is alive and nothing is stuck behind the bad row
    writer.close()
    ids = set(db.ids())
    assert {i.id for i in good} <= ids and poison.id not in ids and len(ids) == 61
    assert writer.set_aside == 1
    (line,) = (tmp_path / "spool.rejected.jsonl").read_bytes().splitlines()
    kept = orjson.loads(line)
    assert "NOT NULL" in kept["reason"] and [row["id"] for row in kept["batch"]["audit"]] == [poison.id]


def test_rows_set_aside_are_written_by_a_replay_once_their_cause_is_fixed(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    poison = Poison()
    writer.start()
    writer.submit(poison)
    writer.close()
    set_aside = tmp_path / "spool.rejected.jsonl"
    assert writer.set_aside == 1 and replay_set_aside(db.engine, tmp_path / "spool.jsonl") == (0, 1)  # still refused: kept
    fixed = [orjson.loads(line) for line in set_aside.read_bytes().splitlines()]
    fixed[0]["batch"]["audit"][0]["actor_owner"] = "dana"  # the cause, mended
    set_aside.write_bytes(b"".join(orjson.dumps(entry) + b"\n" for entry in fixed))
    assert replay_set_aside(db.engine, tmp_path / "spool.jsonl") == (1, 0)
    assert db.ids() == [poison.id] and not set_aside.exists()


def test_a_refused_row_in_a_spool_is_set_aside_and_the_rest_replayed(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    good = entries(30)
    lines = [orjson.dumps({"audit": [r.to_record().row], "items": []}) for r in good]
    poisoned = {"audit": [{**good[0].to_record().row, "id": "poison", "actor_owner": None}], "items": []}
    lines.insert(5, orjson.dumps({"audit": [*poisoned["audit"], good[1].to_record().row]}))  # a good row beside it
    (tmp_path / "spool.deadhost-1-abc.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    writer.close()
    assert sorted(db.ids()) == sorted(r.id for r in good)
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
    items = entries(20 * 10 + 1)  # more than BACKLOG_BATCHES full batches, before the thread runs
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
    assert sorted(db.ids()) == sorted(i.id for i in items)


def test_the_bodies_waiting_to_be_recorded_are_held_against_their_key_and_in_all(tmp_path: Path) -> None:
    """Each record holds its request's body until it is built: past KEY_BACKLOG_BYTES of one key's, that
    key is held back (routes/admission.py answers it 429), not the others; past BACKLOG_BYTES in all,
    everyone slows down. Built, they weigh nothing: nothing is left counted against anyone."""
    from taskproxy.storage.backlog import BACKLOG_BYTES, KEY_BACKLOG_BYTES

    class Heavy(Entry):
        def __init__(self, key_id: str, weight: int) -> None:
            super().__init__()
            self.key_id, self.weight = key_id, weight

    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.01, batch_size=50, spool_path=tmp_path / "spool.jsonl")
    heavy = [Heavy("key_big", KEY_BACKLOG_BYTES // 3) for _ in range(4)] + [Heavy("key_small", 1 << 20)]
    for item in heavy:  # before the thread runs: all of them wait
        writer.submit(item)
    assert writer.holding("key_big") == 4 * (KEY_BACKLOG_BYTES // 3) and writer.holding("key_small") == 0
    assert not writer.backlogged
    for n in range(BACKLOG_BYTES // KEY_BACKLOG_BYTES):
        writer.submit(Heavy(f"key_{n}", KEY_BACKLOG_BYTES - 1))  # under each key's bound, past the bound of all
    assert writer.backlogged
    writer.start()
    try:
        assert writer.flush(timeout=5.0)
        assert writer.holding("key_big") == 0 and not writer.backlogged
    finally:
        writer.close()


@pytest.mark.anyio
async def test_a_key_whose_bodies_wait_to_be_recorded_is_answered_429_and_the_others_are_served(
    tmp_path: Path, fake, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """The request path's side: a key past KEY_BACKLOG_BYTES (here 0, its one request's record held for
    the 1 s flush interval) gets 429 with Retry-After at once; another key is served."""
    from conftest import make_settings, start_proxy

    from taskproxy.storage import backlog
    from taskproxy.upstream.mock import MockProvider

    monkeypatch.setattr(backlog, "KEY_BACKLOG_BYTES", 0)
    recording = {"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 1.0}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async for proxy in start_proxy(make_settings(tmp_path, recording=recording), MockProvider.asgi(fake.app()), fake):
        heavy, light = await proxy.new_key("mallory"), await proxy.new_key("dana")
        await anyio.sleep(1.5)  # the writer idle: the next record starts its wait
        first = await proxy.http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {heavy}", "X-Work-Item": "BIG-1"})
        assert first.status_code == 200
        refused = await proxy.http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {heavy}", "X-Work-Item": "BIG-1"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited", refused.text
        assert refused.headers["retry-after"] == "1" and "wait to be recorded" in refused.json()["error"]["message"]
        served = await proxy.http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {light}", "X-Work-Item": "BIG-2"})
        assert served.status_code == 200


def test_a_flood_of_refusals_is_counted_by_the_minute_not_written_row_by_row(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.01, batch_size=50, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    started = utcnow()
    for n in range(20_000):  # no key, or a made-up one: the request never reached a key
        writer.submit(Rejected(utcnow(), None, "invalid_api_key", "/v1/chat/completions"))
        if n % 5000 == 0:
            time.sleep(0.05)  # several flushes of the writer happen meanwhile
    writer.submit(Rejected(utcnow(), "key_1", "work_item_required", "/v1/messages"))
    writer.close()
    with db.engine.connect() as connection:
        rows = connection.execute(select(Rejection.reason, Rejection.key_id, Rejection.count, Rejection.ts)).all()
    counted = {}
    for reason, key_id, count, ts in rows:
        counted[(reason, key_id)] = counted.get((reason, key_id), 0) + count
        assert ts.second == 0 and ts.microsecond == 0 and ts >= started.replace(second=0, microsecond=0)
    assert counted == {("invalid_api_key", None): 20_000, ("work_item_required", "key_1"): 1}
    assert len(rows) <= 2 * 10  # a row per (minute, key, reason, route) and flush of at most once a second, not 20,001


# -- a full disk under the spool ------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a tiny filesystem of its own (tmpfs, 256 KiB), mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root: the full-disk behaviour is tested where tests run as root (CI)")
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_with_the_database_down_and_the_disk_full_usage_is_held_then_written(tmp_path: Path, full_disk: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    writer = BatchWriter(db.engine, flush_interval=0.01, batch_size=40, spool_path=full_disk / "spool.jsonl", max_held_records=500)
    writer.start()
    db.down = True
    submitted: list[Entry] = []
    while writer.problem is None:  # the spool fills the disk, then cannot be written
        batch = [Entry(target="x" * 300) for _ in range(40)]
        submitted += batch
        for item in batch:
            writer.submit(item)
        writer.flush()
        assert len(submitted) < 5000, "the tiny disk never filled"
    assert "No space left" in writer.problem and writer.held_rows > 0
    for line in Path(next(full_disk.glob("spool.*.jsonl"))).read_bytes().splitlines():
        orjson.loads(line)  # every line whole: a failed write was cut back, no torn line is left
    while not writer.refusing:  # the bound: the request path refuses rather than answer unrecorded
        batch = entries(40)
        submitted += batch
        for item in batch:
            writer.submit(item)
        writer.flush()
    db.down = False  # the database is back: what was held and what was spooled are written
    deadline = time.monotonic() + 10
    while (writer.problem is not None or writer.spool_bytes > 0) and time.monotonic() < deadline:
        submitted.append(Entry())
        writer.submit(submitted[-1])
        writer.flush()
        time.sleep(0.1)
    writer.close()
    ids = set(db.ids())
    assert {item.id for item in submitted} <= ids and writer.problem is None and not writer.refusing


def test_a_spool_line_torn_by_a_crash_is_kept_aside_and_the_rest_replayed(tmp_path: Path) -> None:
    db = FlakyDatabase(tmp_path / "t.db")
    good = entries(3)
    body = b"".join(orjson.dumps({"audit": [e.to_record().row]}) + b"\n" for e in good)
    (tmp_path / "spool.deadhost-2-xyz.jsonl").write_bytes(body + b'{"audit": [{"id": "torn", "ts": "2026-')  # no newline: cut mid-write
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    writer.close()
    assert sorted(db.ids()) == sorted(e.id for e in good)
    assert [p.name.startswith("spool.damaged-") for p in tmp_path.glob("spool*")] == [True]



@pytest.mark.parametrize("damage", [b"123", b'{"events": 5}', b'{"audit": [{"id": "changed", "ts": "2026-12-0\\u00e9T10:00:00"}]}'])
def test_a_spool_line_that_is_json_but_not_a_batch_is_kept_aside_and_recording_goes_on(tmp_path: Path, damage: bytes,
                                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A line a byte changed on disk (still JSON, no longer a batch) stopped the replay and the writer
    thread with it, on every start: nothing more was recorded, /readyz still ready."""
    db = FlakyDatabase(tmp_path / "t.db")
    before, after = entries(3), entries(2)
    lines = [orjson.dumps({"audit": [e.to_record().row]}) for e in before]
    (tmp_path / "spool.deadhost-2-xyz.jsonl").write_bytes(b"\n".join([lines[0], damage, *lines[1:]]) + b"\n")
    writer = BatchWriter(db.engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    for entry in after:
        writer.submit(entry)
    writer.flush()
    assert writer.alive
    writer.close()
    assert sorted(db.ids()) == sorted(e.id for e in before + after)
    [kept] = [p for p in tmp_path.glob("spool*") if p.name.startswith("spool.damaged-")]
    assert kept.read_bytes() == damage + b"\n"
    assert "a damaged spool line" in caplog.text


@pytest.mark.parametrize("removed", ["file", "folder"])
def test_a_spool_removed_while_in_use_is_written_again_and_replayed(tmp_path: Path, removed: str, caplog: pytest.LogCaptureFixture) -> None:
    """A cleanup job removes the spool (its file, or its folder) while the database is down: what was
    spooled went with it, unseen (the replay reads the files the folder lists), and so did what was
    spooled after, into the removed file."""
    import shutil

    db = FlakyDatabase(tmp_path / "t.db")
    folder = tmp_path / "spool"
    folder.mkdir()
    writer = BatchWriter(db.engine, flush_interval=0.01, spool_path=folder / "spool.jsonl")
    writer.start()
    db.down = True
    before, after = entries(30), entries(20)
    for entry in before:
        writer.submit(entry)
    writer.flush()
    [spooled] = folder.glob("spool.*.jsonl")
    assert spooled.stat().st_size > 0
    shutil.rmtree(folder) if removed == "folder" else spooled.unlink()
    for entry in after:
        writer.submit(entry)
    writer.flush()
    db.down = False
    deadline = time.monotonic() + 10
    while len(db.ids()) < len(before + after) and time.monotonic() < deadline:
        time.sleep(0.1)
    writer.close()
    assert sorted(db.ids()) == sorted(e.id for e in before + after)
    assert "was removed while in use" in caplog.text


@pytest.mark.parametrize("how", ["restored", "removed"])
def test_a_sqlite_file_put_in_place_under_a_running_writer_is_the_one_written(tmp_path: Path, how: str) -> None:
    """A backup restored over the database file (its -wal and -shm removed), or the file removed:
    pooled connections kept the old file, and everything recorded after went into it, unseen. Now
    the records after go to the file there now (restored), or are spooled until there is a schema
    to take them (removed: a new empty file), and replayed into it once there is (a restart)."""
    from contextlib import closing

    from taskproxy.storage.db import make_engine

    path = tmp_path / "t.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_schema(engine)
    writer = BatchWriter(engine, flush_interval=0.01, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    before, after = entries(3), entries(4)
    for entry in before:
        writer.submit(entry)
    writer.flush()
    with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(tmp_path / "backup.db")) as backup:
        source.backup(backup)  # the three rows, and the schema
    for leftover in (path.with_name("t.db-wal"), path.with_name("t.db-shm")):
        leftover.unlink(missing_ok=True)
    os.replace(tmp_path / "backup.db", path) if how == "restored" else path.unlink()
    for entry in after:
        writer.submit(entry)
    writer.flush()
    writer.close()
    if how == "removed":  # a restart: the schema made, the spool replayed
        upgrade_schema(engine)
        replaying = BatchWriter(engine, flush_interval=0.01, spool_path=tmp_path / "spool.jsonl")
        replaying.start()
        replaying.close()
    with closing(sqlite3.connect(path)) as db:
        found = {row[0] for row in db.execute("SELECT id FROM audit_log")}
    assert {e.id for e in after} <= found, (len(found), how)
    if how == "restored":
        assert {e.id for e in before} <= found  # the backup's


@BOTH_DATABASES
def test_a_refused_work_item_costs_no_one_elses_usage(database_url: str, tmp_path: Path) -> None:
    """Events register the items they name; one item row the database refuses (here a status left
    empty) must not take the other events of its batch with it, nor its own event."""
    from write_path import past_request

    from taskproxy.metering.tokens import TokenCounter
    from taskproxy.storage.db import make_engine
    from taskproxy.storage.models import UsageEvent

    engine = make_engine(database_url)
    upgrade_schema(engine)
    counter = TokenCounter()
    dana, rae = SimpleNamespace(id="key_dana", owner="dana", team="payments"), SimpleNamespace(id="key_rae", owner="rae", team="web")

    def request(key: SimpleNamespace, item: str) -> Any:
        return past_request(id=uuid.uuid4().hex, ts=utcnow(), key=key, work_item=item, model="gpt-4o-mini", body={"messages": []},
                            prompt_tokens=10, completion_tokens=5, counter=counter, price=None, auto_registered_at=utcnow())

    others = [request(dana, f"PAY-{n % 7}") for n in range(60)]
    odd = request(rae, "WEB-1")
    odd.register_work_item = {**odd.register_work_item, "status": None}  # NOT NULL: the database refuses the item row
    writer = BatchWriter(engine, flush_interval=0.2, batch_size=500, spool_path=tmp_path / "spool.jsonl")
    for item in [*others[:20], odd, *others[20:]]:
        writer.submit(item)
    writer.start()
    writer.close()
    with engine.connect() as connection:
        recorded = set(connection.execute(select(UsageEvent.id)).scalars())
    engine.dispose()
    assert recorded == {e.id for e in [*others, odd]}  # every event, the odd one's included
    assert writer.set_aside == 1  # only the item row
    (line,) = (tmp_path / "spool.rejected.jsonl").read_bytes().splitlines()
    assert [item["id"] for item in orjson.loads(line)["batch"]["items"]] == ["WEB-1"]


def _past_request(item: str) -> Any:
    from write_path import past_request

    from taskproxy.metering.tokens import TokenCounter

    dana = SimpleNamespace(id="key_dana", owner="dana", team="payments")
    return past_request(id=uuid.uuid4().hex, ts=utcnow(), key=dana, work_item=item, model="gpt-4o-mini", body={"messages": []},
                        prompt_tokens=10, completion_tokens=5, counter=TokenCounter(), price=None, auto_registered_at=utcnow())  # fmt: skip


@BOTH_DATABASES
def test_a_batch_written_twice_notes_its_new_items_in_the_change_feed_once(database_url: str) -> None:
    """A write that commits late and is replayed from the spool: the item it registers is one change,
    not one per write (each change makes every replica read the item again)."""
    from taskproxy.storage import repo
    from taskproxy.storage.db import make_engine
    from taskproxy.storage.models import Change

    engine = make_engine(database_url)
    upgrade_schema(engine)
    item = _past_request("FEED-9").register_work_item
    for _ in range(2):
        repo.write_batch(engine, events=[], rejections=[], new_items=[item])
    with engine.connect() as connection:
        noted = connection.execute(select(func.count()).select_from(Change).where(Change.ref == "FEED-9")).scalar_one()
    engine.dispose()
    assert noted == 1


def test_a_sqlite_lock_held_past_the_write_wait_spools_the_batch_and_it_is_written_once_when_freed(tmp_path: Path) -> None:
    """Another process (a `taskproxy db` command, a backup) holds SQLite's write lock for 3 s: past the
    write wait the batch is on disk in the spool, where a kill cannot take it (before: held in memory
    for up to the 30 s busy timeout), and once the lock is free it is written, once."""
    from taskproxy.storage.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    upgrade_schema(engine)
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    writer = BatchWriter(engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    try:
        entry = Entry()
        writer.submit(entry)
        assert writer.flush(timeout=10)
        assert writer.spooled == 1  # on disk while the lock is held
        holder.execute("COMMIT")
        deadline = time.monotonic() + 10
        while writer.committed < 1 and time.monotonic() < deadline:
            writer.flush(timeout=2)
            time.sleep(0.1)
    finally:
        writer.close()
        holder.close()
    with engine.connect() as connection:
        assert list(connection.execute(select(AuditEntry.id)).scalars()) == [entry.id]
    engine.dispose()


def test_a_pool_with_no_connection_to_give_counts_as_the_database_down_not_as_refused_rows(tmp_path: Path) -> None:
    """Every pooled connection waits on a silent database (lookups, leases): the writer's wait for a
    connection times out. That is an outage (spool, replay), not rows the database refused (set aside)."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.2)
    upgrade_schema(engine)
    taken = engine.connect()
    writer = BatchWriter(engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    try:
        entry = Entry()
        writer.submit(entry)
        assert writer.flush()
        assert (writer.spooled, writer.set_aside) == (1, 0)
        taken.close()
        deadline = time.monotonic() + 10
        while writer.spool_bytes and time.monotonic() < deadline:
            writer.submit(Entry())
            writer.flush()
            time.sleep(0.2)
    finally:
        writer.close()
    with engine.connect() as connection:
        assert entry.id in set(connection.execute(select(AuditEntry.id)).scalars())
    engine.dispose()


class SlowWrites:
    """The writer's `write`, made to fail (down), to take `seconds` longer, or to hang until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        from taskproxy.storage import writer as writer_module

        self.down, self.seconds, self.hang = False, 0.0, 0
        self.released = threading.Event()
        real = writer_module.write

        def write(engine: Any, batch: Any) -> None:
            from sqlalchemy.exc import OperationalError

            if self.down:
                raise OperationalError("INSERT", {}, ConnectionError("connection refused"))
            if self.hang:
                self.hang -= 1
                self.released.wait(60)
            time.sleep(self.seconds)
            real(engine, batch)

        monkeypatch.setattr(writer_module, "write", write)


@pytest.mark.postgres
def test_a_database_back_from_an_outage_gets_the_time_a_large_replay_needs(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While it is down, the writer asks the database briefly whether it answers; once it does, a
    replayed batch slower than that brief wait (1 s here) is written, not cut short again and again."""
    from taskproxy.storage.db import make_engine

    writes = SlowWrites(monkeypatch)
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    writer = BatchWriter(engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    try:
        writes.down = True
        spooled = entries(5)
        for entry in spooled:
            writer.submit(entry)
        assert writer.flush() and writer.spooled == 5
        writes.down, writes.seconds = False, 1.0
        deadline = time.monotonic() + 20
        while writer.spool_bytes and time.monotonic() < deadline:
            time.sleep(0.2)
        assert writer.spool_bytes == 0, "the replay was cut short every time"
    finally:
        writes.released.set()
        writer.close()
    with engine.connect() as connection:
        assert {e.id for e in spooled} <= set(connection.execute(select(AuditEntry.id)).scalars())
    engine.dispose()


@pytest.mark.postgres
def test_a_write_a_middleman_never_answers_is_left_behind_and_writing_goes_on(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a PgBouncer without `query_timeout`, a write to a server gone silent may wait a quarter
    of an hour: after `ABANDON_SECONDS` (1 s here) the writer leaves it to its thread and writes on."""
    from taskproxy.storage import answered
    from taskproxy.storage.db import make_engine

    monkeypatch.setattr(answered, "ABANDON_SECONDS", 1.0)
    writes = SlowWrites(monkeypatch)
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    writer = BatchWriter(engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    try:
        writes.hang = 1
        stuck = Entry()
        writer.submit(stuck)
        assert writer.flush()  # waited WRITE_WAIT_SECONDS, then spooled
        later = entries(3)
        deadline = time.monotonic() + 20
        for entry in later:
            writer.submit(entry)
        with engine.connect() as connection:
            while time.monotonic() < deadline:
                written = set(connection.execute(select(AuditEntry.id)).scalars())
                connection.rollback()
                if {e.id for e in [stuck, *later]} <= written:
                    break
                writer.submit(Entry())
                time.sleep(0.3)
        assert {e.id for e in [stuck, *later]} <= written, "the writer still waited for the write nobody answers"
        assert not writes.released.is_set()
    finally:
        writes.released.set()
        writer.close()
    engine.dispose()


def test_a_process_stopping_while_another_holds_the_sqlite_lock_spools_what_it_cannot_write(tmp_path: Path) -> None:
    """At shutdown too: the process would stop waiting before the lock came free and lose the batch.
    The writer waits the usual 2 s and spools; the next process writes it."""
    from taskproxy.storage.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    upgrade_schema(engine)
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    writer = BatchWriter(engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    entry = Entry()
    try:
        writer.submit(entry)
        started = time.monotonic()
        writer.close(timeout=10)
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert writer.spooled == 1 and took < 8, (writer.spooled, took)
    again = BatchWriter(engine, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    again.start()
    again.close()
    with engine.connect() as connection:
        assert list(connection.execute(select(AuditEntry.id)).scalars()) == [entry.id]
    engine.dispose()


@pytest.mark.postgres
def test_a_database_that_answers_read_only_is_an_outage_not_rows_it_refuses(postgres_url: str, tmp_path: Path) -> None:
    """A failover that leaves the proxy on a standby (or `default_transaction_read_only` set for
    maintenance) refuses every write as read-only. That is the database unable to take writes: the
    batches are spooled and replayed by the next process on a writable one, not set aside row by
    row as if each row were wrong (before: every row in the set-aside file, for an operator to replay)."""
    from taskproxy.storage.db import make_engine

    writable = make_engine(postgres_url)
    upgrade_schema(writable)
    standby = make_engine(read_only(postgres_url))
    writer = BatchWriter(standby, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    sent = entries(3)
    try:
        for entry in sent:
            writer.submit(entry)
        assert writer.flush()
    finally:
        writer.close()
    assert (writer.set_aside, writer.spooled) == (0, 3)
    assert not (tmp_path / "spool.rejected.jsonl").exists()
    after = BatchWriter(writable, flush_interval=0.02, spool_path=tmp_path / "spool.jsonl")
    after.start()  # replays what the first left
    after.close()
    with writable.connect() as connection:
        assert set(connection.execute(select(AuditEntry.id)).scalars()) == {e.id for e in sent}
    standby.dispose()
    writable.dispose()


@pytest.mark.parametrize("interruption", ["database", "ctrl-c"])
def test_a_replay_of_rows_set_aside_cut_short_puts_back_what_it_had_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                 interruption: str) -> None:  # fmt: skip
    """`taskproxy db replay-set-aside` read the whole file and removed it first: the database going away
    on its third batch (or Ctrl-C) lost every batch after it, from the database and the file alike
    (found by a review)."""
    from taskproxy.storage import writer as writer_module
    from taskproxy.storage.spool import Spool

    db = FlakyDatabase(tmp_path / "t.db")
    kept = entries(5)
    spool = Spool(tmp_path / "spool.jsonl")
    for entry in kept:
        spool.set_aside_batch({"audit": [entry.to_record().row]}, "refused once, since mended")
    real_write, calls = writer_module.write, []

    def cut_on_the_third(engine: Any, batch: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            if interruption == "ctrl-c":
                raise KeyboardInterrupt
            db.down = True
        real_write(engine, batch)

    monkeypatch.setattr(writer_module, "write", cut_on_the_third)
    with pytest.raises(KeyboardInterrupt if interruption == "ctrl-c" else Exception):
        replay_set_aside(db.engine, tmp_path / "spool.jsonl")
    db.down = False
    assert len(db.ids()) == 2 and len(spool.set_aside.read_bytes().splitlines()) == 3
    monkeypatch.setattr(writer_module, "write", real_write)
    assert replay_set_aside(db.engine, tmp_path / "spool.jsonl") == (3, 0)
    assert sorted(db.ids()) == sorted(entry.id for entry in kept) and list(tmp_path.glob("spool.rejected*")) == []


def test_an_outage_replays_the_spool_a_line_at_a_time(tmp_path: Path) -> None:
    """During an outage the writer retries its spool each second: each retry read every spool file whole
    into memory (about three times its size, a replica's memory growing with the outage until it was
    killed, and again on the next start). Now a retry reads from where the last stopped, a line at a
    time: ~24 MiB spooled cost the retries less than 8 MiB, and everything is written once it is back."""
    import tracemalloc

    db = FlakyDatabase(tmp_path / "t.db")
    rows = [Entry(target="x" * 150).to_record().row for _ in range(120_000)]  # ~24 MiB as spooled JSON
    lines = [orjson.dumps({"audit": rows[start : start + 500]}) for start in range(0, len(rows), 500)]
    (tmp_path / "spool.deadhost-1-abc.jsonl").write_bytes(b"\n".join(lines) + b"\n")  # a dead worker's, left behind
    db.down = True
    writer = BatchWriter(db.engine, flush_interval=0.05, spool_path=tmp_path / "spool.jsonl")
    tracemalloc.start()
    try:
        writer.start()
        time.sleep(3.5)  # a few retries
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(line) for line in lines) > 24 << 20 and peak < 8 << 20, peak
    db.down = False
    deadline = time.monotonic() + 60
    while len(db.ids()) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.5)
    writer.close()
    ids = db.ids()
    assert len(ids) == len(set(ids)) == len(rows)


def test_a_dead_workers_spool_copied_onto_a_nearly_full_disk_loses_nothing(tmp_path: Path, full_disk: Path) -> None:
    """The database down, a dead worker's spool is copied into this process's file: on a nearly full
    disk the copy's last write came up short without an error, the claimed file was removed, and half
    its batches were lost (found by a review). The copy is cut back and the claimed file kept."""
    db = FlakyDatabase(tmp_path / "t.db")
    left = entries(1000)  # ~170 KB on a disk of 256 KiB: no room for a second copy
    (full_disk / "spool.deadhost-1-abc.jsonl").write_bytes(b"".join(orjson.dumps({"audit": [e.to_record().row]}) + b"\n" for e in left))
    db.down = True
    writer = BatchWriter(db.engine, flush_interval=0.05, spool_path=full_disk / "spool.jsonl")
    writer.start()
    time.sleep(2.5)  # a retry or two, each failing on the database and copying onto a disk without room
    db.down = False
    deadline = time.monotonic() + 20
    while len(db.ids()) < len(left) and time.monotonic() < deadline:
        time.sleep(0.2)
    writer.close()
    assert sorted(db.ids()) == sorted(e.id for e in left)


def test_a_torn_last_line_of_a_dead_workers_spool_does_not_swallow_the_next_batch(tmp_path: Path) -> None:
    """A dead worker's file ending in a torn line, copied into this process's file while the database is
    down: the next batch spooled was glued onto it, and kept aside with it as "not JSON" (found by a review)."""
    db = FlakyDatabase(tmp_path / "t.db")
    left = entries(2)
    torn = orjson.dumps({"audit": [Entry().to_record().row]})[:-20]
    (tmp_path / "spool.deadhost-1-abc.jsonl").write_bytes(b"".join(orjson.dumps({"audit": [e.to_record().row]}) + b"\n" for e in left) + torn)
    db.down = True
    writer = BatchWriter(db.engine, flush_interval=0.05, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    time.sleep(1.5)  # the dead worker's file copied into this one's
    mine = Entry()
    writer.submit(mine)
    assert writer.flush()  # spooled behind the torn line
    db.down = False
    deadline = time.monotonic() + 10
    while len(db.ids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    writer.close()
    assert sorted(db.ids()) == sorted([*(e.id for e in left), mine.id])
