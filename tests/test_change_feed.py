"""Each process holds a bounded working set of keys, work items and spend, kept fresh from the change
feed: a change made through one replica is seen by another within the refresh interval, a refresh
reads only what changed, and inventing ids costs a bounded amount of memory."""

from __future__ import annotations

import asyncio
import os
import threading
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import insert, text, update
from starlette.datastructures import Headers

from conftest import BOTH_DATABASES, Proxy, make_settings, start_proxy, wait_until
from taskproxy.errors import InvalidApiKey
from taskproxy.guard import auth
from taskproxy.guard.auth import KeyStore, issue_key, revoke
from taskproxy.guard.budgets import Budgets
from taskproxy.guard.items import ItemCache, Policy
from taskproxy.settings import BudgetSettings
from taskproxy.storage import changes, listen, spend
from taskproxy.storage.changes import ChangeFeed
from taskproxy.storage.db import application_name, make_engine, prepare_schema
from taskproxy.storage.models import ApiKey, Change, SpendCounter
from taskproxy.timeutil import utcnow
from taskproxy.upstream.mock import MockProvider

pytestmark = pytest.mark.anyio
HI = [{"role": "user", "content": "hi"}]


async def _ask(proxy: Proxy, key: str, item: str) -> Any:
    return await proxy.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 2},
                                 headers={"authorization": f"Bearer {key}", "X-Work-Item": item})  # fmt: skip


def _replica_settings(tmp_path: Path, database_url: str, name: str, **overrides: Any) -> Any:
    folder = tmp_path / name
    folder.mkdir()
    return make_settings(folder, database_url=database_url, auth={"key_refresh_seconds": 0.1}, **overrides)


@BOTH_DATABASES
async def test_a_change_made_through_one_replica_is_seen_by_another(tmp_path: Path, fake: Any, database_url: str) -> None:
    """Two apps on one database: a revocation, a completion and a new budget made through A reach B
    from the change feed (B holds the key and the item; nothing tells it but the feed)."""
    work_items = {"mode": "active", "refresh_seconds": 0.1}
    provider = MockProvider.asgi(fake.app())
    async for a in start_proxy(_replica_settings(tmp_path, database_url, "a", work_items=work_items), provider, fake):
        async for b in start_proxy(_replica_settings(tmp_path, database_url, "b", work_items=work_items), provider, fake):
            (key_id, key), (_, other) = await _new_key(a, "dana"), await _new_key(a, "eve")
            for item in ("FEED-1", "FEED-2"):
                assert (await a.http.post("/api/work-items", json={"id": item}, headers=a.admin_headers)).status_code == 201
            assert (await _ask(b, key, "FEED-1")).status_code == 200  # B now holds the key and the item
            assert (await _ask(b, other, "FEED-2")).status_code == 200

            assert (await a.http.delete(f"/api/keys/{key_id}", headers=a.admin_headers)).status_code == 200
            await wait_until(lambda: _status(b, key, "FEED-1"), lambda s: s == 401, what="B refusing the key revoked through A")

            assert (await a.http.post("/api/work-items/FEED-2/complete", headers=a.admin_headers)).status_code == 200
            await wait_until(lambda: _status(b, other, "FEED-2"), lambda s: s == 403, what="B refusing the item completed through A")

            assert (await a.http.post("/api/work-items", json={"id": "FEED-3"}, headers=a.admin_headers)).status_code == 201
            assert (await _ask(b, other, "FEED-3")).status_code == 200
            patch = await a.http.patch("/api/work-items/FEED-3", json={"budget_tokens": 1}, headers=a.admin_headers)
            assert patch.status_code == 200
            await wait_until(lambda: _status(b, other, "FEED-3"), lambda s: s == 429, what="B refusing the item whose budget A lowered")


async def _status(proxy: Proxy, key: str, item: str) -> int:
    return int((await _ask(proxy, key, item)).status_code)


async def _new_key(proxy: Proxy, owner: str) -> tuple[str, str]:
    response = await proxy.http.post("/api/keys", json={"owner": owner, "team": "payments"}, headers=proxy.admin_headers)
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["key"]


def _committer(engine: Any, kind: str, now: datetime) -> Callable[[int, str], None]:
    """Commits a change of `kind` under the number given, as a transaction that took it would."""

    def commit(seq: int, ref: str) -> None:
        with engine.begin() as connection:
            connection.execute(insert(Change.__table__).values(seq=seq, kind=kind, ref=ref, ts=now))

    return commit


def test_the_feed_reads_each_change_once_even_when_numbers_commit_out_of_order(tmp_path: Path) -> None:
    """On PostgreSQL a change numbered 2 can commit after 3: the feed still reads 2, and 3 only once."""
    engine = make_engine(f"sqlite:///{tmp_path / 'feed.db'}")
    prepare_schema(engine)
    feed = ChangeFeed(engine, hole_seconds=3600)
    feed.start()
    now = utcnow()
    commit = _committer(engine, changes.ITEM, now)
    commit(1, "A-1")
    commit(3, "A-3")
    assert feed.read(now).of(changes.ITEM) == {"A-1", "A-3"}
    assert feed.position == 1  # 2 is still open somewhere
    commit(2, "A-2")
    assert feed.read(now).of(changes.ITEM) == {"A-2"}  # 3 is not read twice
    assert feed.position == 3
    assert feed.read(now).refs == {}

    commit(5, "A-5")  # 4 never commits (rolled back): the feed gives up on it after hole_seconds
    stuck = ChangeFeed(engine, hole_seconds=0)
    stuck._low = 3
    assert stuck.read(now).of(changes.ITEM) == {"A-5"}
    assert stuck.read(now).refs == {} and stuck.position == 5
    engine.dispose()


def test_a_hole_is_given_up_on_after_its_own_time_not_the_first_holes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load a hole below what was read is routine, one after another. The feed timed them as
    one: once holes had followed each other for `hole_seconds`, the newest was given up on however
    young, and the change committed in it (a revocation) was never read by that process."""
    engine = make_engine(f"sqlite:///{tmp_path / 'feed.db'}")
    prepare_schema(engine)
    clock = [100.0]
    monkeypatch.setattr(changes.time, "monotonic", lambda: clock[0])
    feed = ChangeFeed(engine, hole_seconds=1.0)
    feed.start()
    now = utcnow()
    commit = _committer(engine, changes.KEY, now)
    read: set[str] = set()
    commit(2, "k2")  # 1 is open: a hole
    read |= feed.read(now).of(changes.KEY)
    clock[0] += 0.8
    commit(1, "k1")
    commit(4, "k4")  # 1 filled; 3 is open: a hole of its own, from now
    read |= feed.read(now).of(changes.KEY)
    clock[0] += 0.7  # 1.5 s of holes, but 3's is 0.7 s old
    read |= feed.read(now).of(changes.KEY)
    commit(3, "revoked")
    read |= feed.read(now).of(changes.KEY)
    assert read == {"k1", "k2", "k4", "revoked"} and feed.position == 4
    commit(6, "k6")  # 5 never commits: given up on after its second
    read |= feed.read(now).of(changes.KEY)
    clock[0] += 1.1
    assert feed.read(now).refs == {} and feed.position == 6

    commit(3_000_007, "far")  # numbers that jump by millions (a sequence moved on by hand): a run, not a hole each
    tracemalloc.start()
    assert feed.read(now).of(changes.KEY) == {"far"}
    clock[0] += 1.1
    feed.read(now)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert feed.position == 3_000_007 and peak < 1024 * 1024, peak
    engine.dispose()


async def test_a_refresh_that_read_a_key_before_its_revocation_never_brings_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    prepare_schema(engine)
    key, token = issue_key(engine, owner="dana", team="payments")
    keys = KeyStore(engine, admin_key=None)
    keys.warm()
    bearer = Headers({"authorization": f"Bearer {token}"})
    assert (await keys.authenticate(bearer)).key_id == key.id

    read, resume = threading.Event(), threading.Event()
    keys_by_id = auth.repo.keys_by_id

    def slow_read(engine, ids):  # type: ignore[no-untyped-def]
        rows = keys_by_id(engine, ids)  # the key as it is before the revocation commits ...
        if threading.current_thread().name == "stale-refresh":
            read.set()
            resume.wait(5)  # ... and the refresh is slow to apply it
        return rows

    monkeypatch.setattr(auth.repo, "keys_by_id", slow_read)
    refresh = threading.Thread(target=keys.refresh, args=({key.id},), name="stale-refresh")
    refresh.start()
    assert read.wait(5)
    revoke(engine, key.id)  # what DELETE /api/keys/{id} does: commit, then drop it from memory
    keys.forget(key.id)
    resume.set()
    refresh.join(5)
    with pytest.raises(InvalidApiKey):
        await keys.authenticate(bearer)
    engine.dispose()


async def test_a_key_row_whose_hash_is_not_a_hash_is_passed_over_not_fatal(tmp_path: Path) -> None:
    """The cache holds keys by their hash's bytes; a row imported by hand with a hash that is not hex
    must not stop the process from starting or its keys from refreshing."""
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    prepare_schema(engine)
    key, token = issue_key(engine, owner="dana", team="payments")
    odd, _ = issue_key(engine, owner="erin", team="payments")
    with engine.begin() as connection:
        connection.execute(update(ApiKey.__table__).where(ApiKey.__table__.c.id == odd.id).values(key_hash="not-a-sha256"))
    keys = KeyStore(engine, admin_key=None)
    keys.warm()
    assert keys.refresh({key.id, odd.id}) == 2
    assert (await keys.authenticate(Headers({"authorization": f"Bearer {token}"}))).key_id == key.id
    engine.dispose()


INVENT_IDS = """
import anyio, gc, json, os, sys
from pathlib import Path
from taskproxy.guard.budgets import Budgets
from taskproxy.guard.items import ItemCache, Policy
from taskproxy.memory import release_freed_memory
from taskproxy.settings import BudgetSettings
from taskproxy.storage.db import make_engine, prepare_schema
from taskproxy.timeutil import utcnow

def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

async def main() -> None:
    engine = make_engine(f"sqlite:///{sys.argv[1]}")
    prepare_schema(engine)
    items = ItemCache(engine, capacity=int(sys.argv[2]))
    policy = Policy("open", items)
    budgets = Budgets(engine, BudgetSettings(work_item_tokens=1_000_000), items)
    budgets.warm(utcnow())
    now = utcnow()

    async def invent(first: int, count: int) -> None:
        async def one_client(start: int) -> None:  # several at once, as requests arrive
            for n in range(start, first + count, 8):
                item_id = f"MADE-{n}"
                known = await policy.check(item_id)
                await budgets.check(item_id, known, "payments", now)
                budgets.charge(item_id, "payments", now, 30, 4_500)

        async with anyio.create_task_group() as group:
            for start in range(first, first + 8):
                group.start_soon(one_client, start)

    await invent(0, 5_000)  # fill the caches: from here on each new id displaces an old one
    gc.collect()
    release_freed_memory()  # what a serving process does when idle (memory.py): resident is what is held, not what the allocator kept
    objects, before = len(gc.get_objects()), resident()
    await invent(5_000, 95_000)
    gc.collect()
    release_freed_memory()
    print(json.dumps({"items": len(items), "spent": len(budgets._item_spent),
                      "objects": len(gc.get_objects()) - objects, "resident": resident() - before}))
    engine.dispose()

anyio.run(main)
"""


def test_inventing_100000_ids_leaves_memory_within_the_bound(tmp_path: Path) -> None:
    """One key sending 100,000 made-up ids in open mode, each with a default budget: the process holds
    at most its cache sizes of them, and its memory stays within what those entries cost. Measured in a
    process of its own: in a test worker, what earlier tests left behind moves resident memory by more
    than the bound (12.6 MiB in one CI run)."""
    import json
    import subprocess
    import sys

    capacity = 2_000
    run = subprocess.run([sys.executable, "-c", INVENT_IDS, str(tmp_path / "ids.db"), str(capacity)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    grown = json.loads(run.stdout)
    assert grown["items"] <= capacity + capacity // 4
    assert grown["spent"] <= capacity
    # Unbounded, each id would keep an entry: objects by the hundred thousand, and ~20 MiB.
    assert grown["objects"] < 5_000
    assert grown["resident"] < 8 * 1024 * 1024, f"resident memory grew by {grown['resident'] / 2**20:.1f} MiB over 95,000 new ids"


@BOTH_DATABASES
def test_a_spend_refresh_reads_the_counters_that_changed_not_the_history(database_url: str) -> None:
    engine = make_engine(database_url)
    prepare_schema(engine)
    items = ItemCache(engine)
    budgets = Budgets(engine, BudgetSettings(work_item_tokens=100), items)
    now = utcnow()
    old = now - timedelta(days=30)
    history = [{"scope": spend.ITEM, "ref": f"OLD-{n}", "period": "", "tokens": 5, "cost_nanos": 9, "updated_at": old} for n in range(3000)]
    with engine.begin() as connection:
        connection.execute(insert(SpendCounter.__table__), history)
    budgets.warm(now)
    assert budgets.load(now + timedelta(seconds=10)) == 0  # three thousand old counters, none read
    with engine.begin() as connection:
        connection.execute(update(SpendCounter.__table__).where(SpendCounter.ref == "OLD-7").values(tokens=500, updated_at=now + timedelta(seconds=11)))
    assert budgets.load(now + timedelta(seconds=20)) == 1
    engine.dispose()


@pytest.mark.postgres
async def test_on_postgresql_a_revocation_and_a_completion_reach_another_replica_at_once(tmp_path: Path, fake: Any, postgres_url: str) -> None:
    """Their refresh timers at 30 s: only the notification of the committed change (LISTEN/NOTIFY,
    storage/listen.py) can bring it to B within the few seconds waited here."""
    slow = {"auth": {"key_refresh_seconds": 30}, "work_items": {"mode": "active", "refresh_seconds": 30}}
    provider = MockProvider.asgi(fake.app())
    async for a in start_proxy(make_settings(tmp_path / "a", database_url=postgres_url, **slow), provider, fake):
        async for b in start_proxy(make_settings(tmp_path / "b", database_url=postgres_url, **slow), provider, fake):
            (key_id, key), (_, other) = await _new_key(a, "dana"), await _new_key(a, "eve")
            assert (await a.http.post("/api/work-items", json={"id": "NOTE-1"}, headers=a.admin_headers)).status_code == 201
            assert (await _ask(b, key, "NOTE-1")).status_code == 200  # B holds the key and the item
            assert (await _ask(b, other, "NOTE-1")).status_code == 200

            assert (await a.http.delete(f"/api/keys/{key_id}", headers=a.admin_headers)).status_code == 200
            await wait_until(lambda replica=b, revoked=key: _status(replica, revoked, "NOTE-1"), lambda s: s == 401, timeout=3, what="B refusing the key revoked through A")
            assert (await a.http.post("/api/work-items/NOTE-1/complete", headers=a.admin_headers)).status_code == 200
            await wait_until(lambda replica=b, held=other: _status(replica, held, "NOTE-1"), lambda s: s == 403, timeout=3, what="B refusing the item completed through A")


@pytest.mark.postgres
async def test_a_listener_cut_off_reconnects_reads_what_it_missed_and_listens_again(
    tmp_path: Path, fake: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """Both listeners' connections are ended by the server (as a failover or an administrator would):
    a revocation made meanwhile reaches B when its listener reconnects, and the next change reaches it
    through the notification again; the 30 s timers never get the chance."""
    monkeypatch.setattr(listen, "RETRY_SECONDS", 0.5)
    slow = {"auth": {"key_refresh_seconds": 30}, "work_items": {"mode": "active", "refresh_seconds": 30}}
    provider = MockProvider.asgi(fake.app())
    engine = make_engine(postgres_url)

    def listeners(terminate: bool = False) -> int:
        # Named after this process (both apps run in it): other tests' listeners are left alone.
        chosen = "pg_terminate_backend(pid)" if terminate else "pid"
        query = text(f"SELECT {chosen} FROM pg_stat_activity WHERE application_name = :name AND query = :listen")
        with engine.connect() as connection:
            return len(connection.execute(query, {"name": application_name("listener"), "listen": f"LISTEN {changes.CHANNEL}"}).all())

    async for a in start_proxy(make_settings(tmp_path / "a", database_url=postgres_url, **slow), provider, fake):
        async for b in start_proxy(make_settings(tmp_path / "b", database_url=postgres_url, **slow), provider, fake):
            (key_id, key), (_, other) = await _new_key(a, "dana"), await _new_key(a, "eve")
            assert (await a.http.post("/api/work-items", json={"id": "CUT-1"}, headers=a.admin_headers)).status_code == 201
            assert (await _ask(b, key, "CUT-1")).status_code == 200 and (await _ask(b, other, "CUT-1")).status_code == 200
            await wait_until(lambda: anyio.to_thread.run_sync(listeners), lambda n: n == 2, timeout=10, what="both listening")
            assert await anyio.to_thread.run_sync(lambda: listeners(terminate=True)) == 2

            assert (await a.http.delete(f"/api/keys/{key_id}", headers=a.admin_headers)).status_code == 200
            await wait_until(lambda replica=b, revoked=key: _status(replica, revoked, "CUT-1"), lambda s: s == 401, timeout=5, what="B refusing the key revoked while it was cut off")
            await wait_until(lambda: anyio.to_thread.run_sync(listeners), lambda n: n == 2, timeout=10, what="both listening again")
            assert (await a.http.post("/api/work-items/CUT-1/complete", headers=a.admin_headers)).status_code == 200
            await wait_until(lambda replica=b, held=other: _status(replica, held, "CUT-1"), lambda s: s == 403, timeout=3, what="B refusing the item completed through A")
    engine.dispose()


def _notify(engine: Any) -> None:
    with engine.begin() as connection:
        connection.execute(text(f"NOTIFY {changes.CHANNEL}"))


@pytest.mark.postgres
def test_a_listener_whose_files_are_numbered_past_1024_still_hears_every_change(postgres_url: str) -> None:
    """A busy server holds many sockets, so its listener's own get numbers that select() refuses."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this machine allows {hard} open files, fewer than the test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY else min(max(soft, 1200), hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    engine = make_engine(postgres_url)
    heard = threading.Semaphore(0)
    listener = listen.ChangeListener(engine, heard.release)
    try:
        listener.start()
        assert heard.acquire(timeout=10), "the listener never connected"
        for _ in range(3):
            _notify(engine)
            assert heard.acquire(timeout=5), "a notification was not heard"
    finally:
        listener.close()
        listener.close()  # a second close does nothing
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        engine.dispose()


@pytest.mark.postgres
def test_a_listener_survives_a_failure_of_its_own_and_listens_again(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listen, "RETRY_SECONDS", 0.1)
    engine = make_engine(postgres_url)
    calls: list[int] = []
    heard = threading.Semaphore(0)

    def on_change() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in a reader")
        heard.release()

    listener = listen.ChangeListener(engine, on_change)
    listen.ChangeListener(engine, on_change).close()  # closing one never started does nothing
    try:
        listener.start()
        assert heard.acquire(timeout=10), "the listener did not come back after the failure"
        _notify(engine)
        assert heard.acquire(timeout=5), "a notification after the failure was not heard"
    finally:
        listener.close()
        engine.dispose()


async def test_a_key_looked_up_while_the_process_stops_is_told_to_try_again_not_a_server_error(tmp_path: Path) -> None:
    """A request that arrives as the app shuts down, with a key not in memory: the lookup's threads are
    gone, and the answer is the 503 of a database that cannot be asked (a retry reaches another replica)."""
    from taskproxy.errors import ServiceUnavailable

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    prepare_schema(engine)
    keys = KeyStore(engine, admin_key=None)
    keys.close()
    with pytest.raises(ServiceUnavailable) as caught:
        await keys.authenticate(Headers({"authorization": "Bearer tp-" + "k" * 43}))
    assert caught.value.retry_after == 5  # Retry-After, as the admin API's 503s say (tests/test_blackhole.py: the header)
    items = ItemCache(engine)
    items.close()
    with pytest.raises(ServiceUnavailable) as caught:
        await Policy("known", items).check("PROJ-1")
    assert caught.value.retry_after == 5
    engine.dispose()


async def test_a_lookup_waiting_for_a_thread_when_the_process_stops_is_told_so_too() -> None:
    """A lookup queued behind a slow one when close() drops the queue: the same 503 answer as one that
    arrives after close(), not a cancelled request."""
    import time as clock

    from taskproxy.guard.lookups import Lookups, LookupTimeout

    lookups = Lookups("test", at_once=1)
    slow = asyncio.ensure_future(lookups.run(clock.sleep, 0.3))
    queued = asyncio.ensure_future(lookups.run(lambda: "found"))
    await asyncio.sleep(0.05)
    lookups.close()
    with pytest.raises(LookupTimeout):
        await queued
    assert await slow is None


async def test_a_rate_checked_after_the_leases_stopped_counts_alone_rather_than_refuse(tmp_path: Path) -> None:
    """Leases cannot be taken once the process is stopping: a key below its limit is still admitted
    (counted by this process alone), not told it sent too many."""
    from taskproxy.guard.ratelimit import RateLimiter

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    prepare_schema(engine)
    limiter = RateLimiter(30, engine)
    limiter.close()
    for _ in range(10):  # past the first slice (3)
        await limiter.check("key_1")
        await asyncio.sleep(0.01)
    engine.dispose()
