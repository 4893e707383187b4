"""Report snapshots (`reports.snapshot_minutes`, reports/snapshots.py): one replica at a time computes
the adoption report and the signals over the last 30 days, and `?snapshot=latest` serves the stored
answer, which is exactly the report of its own period, from any replica."""

from __future__ import annotations

import gzip
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from conftest import BOTH_DATABASES
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import FakeUpstream, cli_json, quoted, run_cli, running_server, wait_until, write_config
from sqlalchemy import event, select

from taskproxy.dashboard import data
from taskproxy.dashboard.format import iso_attr
from taskproxy.errors import ServiceUnavailable
from taskproxy.reports.adoption import adoption_report
from taskproxy.reports.adoption_export import adoption_csv
from taskproxy.reports.named import overview_snapshot_name
from taskproxy.reports.signals import gaming_signals
from taskproxy.reports.snapshots import Definition, SnapshotKeeper, compute_and_store, kept_name, snapshot_reports
from taskproxy.config import load_settings
from taskproxy.settings import Settings
from taskproxy.storage import snapshots
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.storage.models import ReportSnapshot
from taskproxy.timeutil import iso, utcnow

T0 = datetime(2026, 12, 1, 9, 0)
EVERY = timedelta(minutes=10)
HOLD = timedelta(minutes=30)


def _store(engine, name: str, me: str, until: datetime, body: bytes, computed_at: datetime | None = None) -> bool:  # type: ignore[no-untyped-def]
    return snapshots.store(engine, name, me, since=until - timedelta(days=30), until=until, computed_at=computed_at or until, seconds=1.5, body=body)


@BOTH_DATABASES
def test_a_snapshot_is_read_back_whole_in_pieces_and_never_mixed_with_the_next(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    monkeypatch.setattr(snapshots, "READ_PIECE_BYTES", 7)
    body = bytes(range(256)) * 3 + b"tail"  # every byte value; not a multiple of the piece
    assert snapshots.claim(engine, "signals", "a:1", T0, EVERY, HOLD)
    assert _store(engine, "signals", "a:1", T0, body)
    assert snapshots.latest(engine, "signals").body == body  # type: ignore[union-attr]

    # A new snapshot stored while the old one is being read: the reader starts again, on the new one.
    newer = b"the next one, longer than a piece or two" * 5
    pieces_read = 0

    def store_after_the_second_piece(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        nonlocal pieces_read
        if "substr" in statement.lower():
            pieces_read += 1
            if pieces_read == 2:
                other = make_engine(database_url)
                assert snapshots.claim(other, "signals", "b:2", T0 + EVERY, EVERY, HOLD)
                assert _store(other, "signals", "b:2", T0 + EVERY, newer)
                other.dispose()

    event.listen(engine, "before_cursor_execute", store_after_the_second_piece)
    assert snapshots.latest(engine, "signals").body == newer  # type: ignore[union-attr]
    assert pieces_read > 3
    engine.dispose()


@BOTH_DATABASES
def test_one_claimant_at_a_time_and_only_when_the_snapshot_is_due(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    assert snapshots.is_due(engine, "adoption", T0, EVERY)
    won: list[str] = []
    start = threading.Barrier(6)

    def claim(me: str) -> None:
        start.wait()
        if snapshots.claim(engine, "adoption", me, T0, EVERY, HOLD):
            won.append(me)

    claimants = [threading.Thread(target=claim, args=(f"host:{n}",)) for n in range(6)]
    for thread in claimants:
        thread.start()
    for thread in claimants:
        thread.join()
    assert len(won) == 1  # six processes at once: one computes
    [holder] = won
    assert not snapshots.is_due(engine, "adoption", T0, EVERY)  # held
    assert snapshots.latest(engine, "adoption") is None  # nothing is served before the first is stored
    loser = "host:0" if holder != "host:0" else "host:1"
    assert not _store(engine, "adoption", loser, T0, b"not mine")  # only the holder stores
    assert _store(engine, "adoption", holder, T0, b'{"overall": {}}', computed_at=T0 + timedelta(minutes=1))
    kept = snapshots.latest(engine, "adoption")
    assert kept is not None and (kept.until, kept.computed_by, kept.body) == (T0, holder, b'{"overall": {}}')

    later = T0 + timedelta(minutes=5)
    assert not snapshots.is_due(engine, "adoption", later, EVERY) and not snapshots.claim(engine, "adoption", "b:2", later, EVERY, HOLD)
    due = T0 + timedelta(minutes=11)
    assert snapshots.is_due(engine, "adoption", due, EVERY) and snapshots.claim(engine, "adoption", "b:2", due, EVERY, HOLD)
    assert not snapshots.claim(engine, "adoption", "c:3", due + timedelta(minutes=1), EVERY, HOLD)  # held by b ...
    assert snapshots.claim(engine, "adoption", "c:3", due + timedelta(minutes=31), EVERY, HOLD)  # ... until its claim runs out
    assert not _store(engine, "adoption", "b:2", due, b"too late")  # b outlived its claim: it changes nothing
    assert not _store(engine, "adoption", "c:3", T0 - timedelta(minutes=1), b"older")  # nor does an older period
    assert snapshots.latest(engine, "adoption").body == b'{"overall": {}}'  # type: ignore[union-attr]

    failed = due + timedelta(minutes=32)  # c's computation failed: nobody tries again before the back-off ends
    snapshots.back_off(engine, "adoption", "c:3", failed + timedelta(minutes=10))
    assert not snapshots.claim(engine, "adoption", "d:4", failed + timedelta(minutes=9), EVERY, HOLD)
    assert snapshots.claim(engine, "adoption", "d:4", failed + timedelta(minutes=11), EVERY, HOLD)

    assert snapshots.claim(engine, "signals", "d:4", failed, EVERY, HOLD)  # each report on its own
    snapshots.release(engine, "d:4")  # d stops: both its claims go at once
    now = failed + timedelta(minutes=12)
    assert snapshots.claim(engine, "adoption", "e:5", now, EVERY, HOLD) and snapshots.claim(engine, "signals", "e:5", now, EVERY, HOLD)
    engine.dispose()


@BOTH_DATABASES
def test_a_computation_longer_than_its_claim_keeps_it_and_nobody_starts_it_twice(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    hold = timedelta(seconds=0.6)  # renewed every 0.2 s; each step below outlasts it several times
    running = {"report": threading.Event(), "overview": threading.Event()}
    go_on = {"report": threading.Event(), "overview": threading.Event()}

    def slow(step: str):  # type: ignore[no-untyped-def]
        def compute(engine, *, since, until, **_):  # type: ignore[no-untyped-def]
            running[step].set()
            assert go_on[step].wait(30)
            return {"step": step}

        return compute

    def broken(engine, **_):  # type: ignore[no-untyped-def]
        raise RuntimeError("this follower fails")

    definition = Definition(slow("report"), {}, then=(("broken", broken, {}), ("overview", slow("overview"), {})))
    outcome: list[float | None] = []
    computing = threading.Thread(target=lambda: outcome.append(
        compute_and_store(engine, name="adoption", me="a:1", every=EVERY, definition=definition, hold=hold)))  # fmt: skip
    computing.start()

    def another_process_claims(name: str, every: timedelta) -> bool:
        return snapshots.claim(engine, name, "b:2", utcnow(), every, hold)

    assert running["report"].wait(30)
    time.sleep(3 * hold.total_seconds())
    assert not another_process_claims("adoption", timedelta(0))  # still computing: still held
    go_on["report"].set()
    assert running["overview"].wait(30)
    time.sleep(3 * hold.total_seconds())
    assert not another_process_claims("overview", timedelta(0))
    # The follower that failed was let go at once and is not renewed: another process may take it.
    assert another_process_claims("broken", timedelta(0))
    go_on["overview"].set()
    computing.join(30)
    assert outcome and outcome[0] is not None
    assert orjson.loads(gzip.decompress(snapshots.latest(engine, "overview").body)) == {"step": "overview"}  # type: ignore[union-attr]
    # Once stored, nothing is renewed: a claim is taken as soon as the snapshot is due.
    time.sleep(hold.total_seconds())
    assert another_process_claims("adoption", timedelta(0))
    engine.dispose()


def _as_served(report: dict) -> dict:
    return orjson.loads(orjson.dumps(report))


def _period(body: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(body["since"].removesuffix("Z")), datetime.fromisoformat(body["until"].removesuffix("Z"))


@pytest.mark.postgres
def test_two_replicas_serve_the_snapshot_one_of_them_computed_and_it_is_the_report_of_its_period(
    tmp_path: Path, upstream: FakeUpstream, postgres_url: str
) -> None:
    config = write_config(tmp_path, upstream.url, database_url=postgres_url, reports={"snapshot_minutes": 0.02})  # every 1.2 s
    assert run_cli("db", "upgrade", config=config).returncode == 0
    with running_server(config, tmp_path / "a.log") as first, running_server(config, tmp_path / "b.log") as second:
        admin = first.admin_headers
        keys = [first.new_key(owner=f"dev-{n}", team="payments") for n in range(5)]  # a team shown, not withheld
        for n, key in enumerate(keys):
            client = (first, second)[n % 2].openai(key)
            for item in ("PAY-1", "PAY-2"):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {n}"}],
                                               extra_headers={"X-Work-Item": item})  # fmt: skip
        first.work_item("PAY-1", 5)
        first.work_item("PAY-2", 5)
        completed = first.http.post(f"/api/work-items/{quoted('PAY-1')}/complete", headers=admin)
        assert completed.status_code == 200, completed.text
        recorded = utcnow()  # after the completion's commit: a snapshot of a period that ends later includes it

        def latest(server, path: str = "/api/reports/adoption") -> httpx.Response:  # type: ignore[no-untyped-def]
            return server.http.get(path, params={"snapshot": "latest"}, headers=admin, timeout=30)

        def after_completion(reply: httpx.Response) -> bool:
            return reply.status_code == 200 and _period(reply.json())[1] > recorded

        engine = make_engine(postgres_url)
        for server in (first, second):  # each serves a snapshot computed after the completion (by either)
            reply = wait_until(lambda server=server: latest(server), after_completion, timeout=30, what="a snapshot after the completion")
            body = reply.json()
            assert body["overall"]["completed_items"] == 1 and body["overall"]["ai_assisted_items"] == 1, body["overall"]
            since, until = _period(body)
            assert until - since == timedelta(days=30)
            assert body == _as_served(adoption_report(engine, since=since, until=until, team=None))  # the report of its period, exactly
            assert 0 <= int(reply.headers["age"]) < 30 and reply.headers["last-modified"].endswith("GMT")
            # One team's part of it: what computing with `team` gives, for a team shown and one below the floor.
            for team in ("payments", "nobody-here"):
                part = server.http.get("/api/reports/adoption", params={"snapshot": "latest", "team": team}, headers=admin, timeout=30)
                assert part.status_code == 200 and "age" in part.headers, part.text
                assert part.json() == _as_served(adoption_report(engine, since=since, until=until, team=team))

        signals = wait_until(lambda: latest(second, "/api/reports/signals"), after_completion, timeout=30, what="the signals' snapshot")
        since, until = _period(signals.json())
        assert signals.json() == _as_served(gaming_signals(engine, since=since, until=until))

        as_csv = wait_until(lambda: latest(first, "/api/reports/adoption.csv"), lambda r: r.status_code == 200, timeout=30)
        assert as_csv.headers["content-type"].startswith("text/csv") and "age" in as_csv.headers
        assert "payments" in as_csv.text and as_csv.text.count("\n") > 2
        engine.dispose()


def test_a_snapshot_is_asked_for_plainly_and_says_why_there_is_none(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream.url)  # snapshots off (the default)
    with running_server(config, tmp_path / "serve.log") as server:
        admin = server.admin_headers
        developer = {"authorization": f"Bearer {server.new_key()}"}
        for path in ("/api/reports/adoption", "/api/reports/adoption.csv", "/api/reports/signals"):
            off = server.http.get(path, params={"snapshot": "latest"}, headers=admin)
            assert off.status_code == 404 and off.json()["error"]["code"] == "not_found", off.text
            assert "reports.snapshot_minutes" in off.json()["error"]["message"]
            assert server.http.get(path, params={"snapshot": "latest"}, headers=developer).status_code == 403  # admins only, first
            wrong = server.http.get(path, params={"snapshot": "newest"}, headers=admin)
            assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "snapshot", wrong.text
            if path == "/api/reports/adoption.csv":  # the JSON snapshot answers for one team; the CSV stays whole
                teamed = server.http.get(path, params={"snapshot": "latest", "team": "payments"}, headers=admin)
                assert teamed.status_code == 400 and teamed.json()["error"]["param"] == "team", teamed.text
            dated = server.http.get(path, params={"snapshot": "latest", "since": "7d"}, headers=admin)
            assert dated.status_code == 400 and dated.json()["error"]["param"] == "since", dated.text
            assert "its own period" in dated.json()["error"]["message"]
            assert server.http.get(path, headers=admin).status_code == 200  # computed on demand, as before


def test_the_first_snapshot_is_on_its_way_then_served(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream.url, reports={"snapshot_minutes": 60})
    with running_server(config, tmp_path / "serve.log") as server:
        admin = server.admin_headers
        first = server.http.get("/api/reports/adoption", params={"snapshot": "latest"}, headers=admin)
        if first.status_code == 404:  # the replica computes the first at start, in a report process
            assert "no snapshot yet" in first.json()["error"]["message"], first.text
        served = wait_until(lambda: server.http.get("/api/reports/adoption", params={"snapshot": "latest"}, headers=admin),
                            lambda r: r.status_code == 200, timeout=30, what="the first snapshot")  # fmt: skip
        assert served.json()["overall"]["completed_items"] == 0
        assert served.headers["content-encoding"] == "gzip"  # stored gzipped, sent as stored (httpx asks for gzip)
        again = server.http.get("/api/reports/adoption", params={"snapshot": "latest"}, headers=admin)
        assert again.content == served.content  # not computed again within the hour
        plain = server.http.get("/api/reports/adoption", params={"snapshot": "latest"}, headers={**admin, "accept-encoding": "identity"})
        assert "content-encoding" not in plain.headers and plain.content == served.content  # unpacked for a client without gzip
        with_csv = server.http.get("/api/reports/adoption.csv", params={"snapshot": "latest"}, headers=admin)
        assert with_csv.text == adoption_csv(served.json())
        assert cli_json("report", "adoption", "--latest", "--json", config=config) == served.json()  # the CLI reads the same row

        # The dashboard's overview of the default period shows its own snapshot, which is the overview of its period.
        dashboard = httpx.Client(base_url=server.url, trust_env=False, timeout=30)
        assert dashboard.post("/dashboard/login", data={"key": server.admin_key}, follow_redirects=False).status_code == 303
        page = wait_until(lambda: dashboard.get("/dashboard"), lambda r: 'data-testid="snapshot"' in r.text, timeout=30, what="the overview's snapshot")
        engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
        settings = load_settings(config, env={"TASKPROXY_ADMIN_KEY": server.admin_key})
        kept = data.kept_overview(engine, overview_snapshot_name(settings))
        assert kept.view.weeks and isinstance(kept.view.weeks[0]["since"], datetime)
        assert _as_served(kept.view) == _as_served(data.overview(engine, settings, kept.since, kept.until))
        kept_adoption = snapshots.latest(engine, kept_name(settings, "adoption"))
        assert (kept.since, kept.until) == (kept_adoption.since, kept_adoption.until)  # made from the adoption report's computation
        # /metrics says when each was computed, and how long it took: what a platform team alerts on.
        scraped = {(sample.name, sample.labels.get("report")): sample.value
                   for family in text_string_to_metric_families(server.http.get("/metrics", headers=admin).text) for sample in family.samples}
        for report, snapshot in (("adoption", kept_adoption), ("overview", kept)):
            computed = scraped[("taskproxy_report_snapshot_computed_timestamp_seconds", report)]
            assert computed == pytest.approx(snapshot.computed_at.replace(tzinfo=UTC).timestamp(), abs=1e-3)
        assert scraped[("taskproxy_report_snapshot_compute_seconds", "adoption")] == pytest.approx(kept_adoption.seconds)
        assert f'datetime="{iso_attr(kept.until)}" data-testid="until"' in page.text  # the page says the period it shows: the snapshot's
        assert 'data-testid="snapshot"' not in dashboard.get("/dashboard", params={"since": "30d"}).text  # a period asked for: computed
        signals_page = wait_until(lambda: dashboard.get("/dashboard/signals"), lambda r: 'data-testid="snapshot"' in r.text, timeout=30,
                                  what="the signals' snapshot")  # fmt: skip
        kept_signals = data.kept_signals_page(engine, name=kept_name(settings, "signals"))
        assert 'data-testid="snapshot"' in signals_page.text and f'datetime="{iso_attr(kept_signals.until)}" data-testid="until"' in signals_page.text
        assert kept_signals.view == data.shown_signals(_as_served(gaming_signals(engine, since=kept_signals.since, until=kept_signals.until)))
        assert 'data-testid="snapshot"' not in dashboard.get("/dashboard/signals", params={"since": "7d"}).text
        # Every read of the signals is audited, and a read of their snapshot says of which period.
        assert server.http.get("/api/reports/signals", params={"snapshot": "latest"}, headers=admin).status_code == 200
        shown = f"snapshot_period={iso(kept_signals.since)}/{iso(kept_signals.until)}"
        expected = {("GET /dashboard/signals", shown), ("GET /dashboard/signals", "since=7d"), ("GET /api/reports/signals", f"snapshot=latest&{shown}")}
        audit = wait_until(lambda: {(e["action"], e["target"]) for e in server.http.get("/api/audit", params={"limit": 10_000}, headers=admin).json()},
                           lambda found: expected <= found, timeout=30, what="the audit of the signals' reads")  # fmt: skip
        assert {entry for entry in audit if entry[0] == "GET /dashboard/signals"} <= expected | {("GET /dashboard/signals", None)}
        engine.dispose()
        dated = run_cli("report", "adoption", "--latest", "--since", "7d", config=config)
        assert dated.returncode != 0 and "its own period" in dated.stderr, dated


class _KilledAfterClaiming:
    """A report runner whose report process claims the snapshot and is then killed (the OOM killer)."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine, self.started = engine, 0

    async def run(self, function, **kwargs):  # type: ignore[no-untyped-def]
        self.started += 1
        assert snapshots.claim(self.engine, kwargs["name"], kwargs["me"], utcnow(), kwargs["every"], HOLD)
        raise ServiceUnavailable("The report's process ended before it finished (signal SIGKILL).")


@pytest.mark.anyio
async def test_a_computation_that_fails_backs_off_and_a_stopping_process_lets_go(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'snapshots.db'}")
    upgrade_schema(engine)
    settings = Settings(database_url="sqlite:///taskproxy.db", models=[], reports={"snapshot_minutes": 60})
    runner = _KilledAfterClaiming(engine)
    adoption, signals = kept_name(settings, "adoption"), kept_name(settings, "signals")
    keeper = SnapshotKeeper(engine, runner, timedelta(minutes=60), snapshot_reports(settings))  # type: ignore[arg-type]
    await keeper._keep(signals)
    assert runner.started == 1
    row = _row(engine, signals)
    assert row.claimed_by is not None and timedelta(minutes=9) < row.claimed_until - utcnow() <= timedelta(minutes=10), row
    await keeper._keep(signals)  # the next look: not tried again before the back-off ends
    assert runner.started == 1 and not snapshots.is_due(engine, signals, utcnow(), timedelta(minutes=60))

    await keeper._keep(adoption)  # another report cut short as the process stops ...
    keeper.close()  # ... which lets go of every claim it holds
    assert _row(engine, adoption).claimed_by is None and _row(engine, signals).claimed_by is None
    assert snapshots.is_due(engine, adoption, utcnow(), timedelta(minutes=60))
    engine.dispose()


def _row(engine, name: str):  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return connection.execute(select(ReportSnapshot.__table__).where(ReportSnapshot.__table__.c.name == name)).one()


def test_a_snapshot_is_read_only_by_processes_that_would_compute_it_alike() -> None:
    def settings(**reports: object) -> Settings:
        return Settings(database_url="sqlite:///taskproxy.db", models=[], privacy=reports.pop("privacy", {}), reports={"snapshot_minutes": 60, **reports})

    same = [kept_name(settings(), "adoption"), kept_name(settings(snapshot_minutes=5), "adoption")]
    assert same[0] == same[1] and same[0].startswith("adoption:")  # how often is not how it is computed
    assert kept_name(settings(privacy={"min_group_size": 8}), "adoption") != same[0]  # another privacy floor: not that snapshot
    assert kept_name(settings(stale_after_days=30), "adoption") != same[0]
    assert overview_snapshot_name(settings(privacy={"min_group_size": 8})) != overview_snapshot_name(settings())
    assert set(snapshot_reports(settings())) == {kept_name(settings(), "adoption"), kept_name(settings(), "signals")}


class _Computes:
    """A report runner whose report process stores a tiny snapshot, as compute_and_store would, except
    for the signals (another replica's turn, say)."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine

    async def run(self, function, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs["name"].startswith("signals:") or not snapshots.claim(self.engine, kwargs["name"], kwargs["me"], utcnow(), kwargs["every"], HOLD):
            return None
        _store(self.engine, kwargs["name"], kwargs["me"], utcnow(), b"{}")
        return 0.1


@pytest.mark.anyio
async def test_snapshots_no_process_computes_any_more_are_deleted_after_a_week(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'snapshots.db'}")
    upgrade_schema(engine)
    now = utcnow()
    mine = snapshot_reports(Settings(database_url="sqlite:///taskproxy.db", models=[], reports={"snapshot_minutes": 60}))
    kept_long_ago = "adoption:0123456789ab"  # an earlier version's, or made under another privacy floor
    for name, computed_at in [(kept_long_ago, now - timedelta(days=8)), ("adoption:recent000000", now - timedelta(days=6)),
                              ("signals:computing000", now - timedelta(days=8)), *((name, now - timedelta(days=8)) for name in mine)]:  # fmt: skip
        assert snapshots.claim(engine, name, "old-replica", computed_at, EVERY, HOLD)
        assert _store(engine, name, "old-replica", computed_at, b"x" * 1000, computed_at=computed_at)
    assert snapshots.claim(engine, "signals:computing000", "old-replica", now, EVERY, HOLD)  # held: being computed now

    keeper = SnapshotKeeper(engine, _Computes(engine), timedelta(minutes=60), mine)  # type: ignore[arg-type]
    with anyio.move_on_after(3):  # one round of the keeper's loop: it keeps its own, then prunes
        await keeper.run()
    with engine.connect() as connection:
        left = set(connection.execute(select(ReportSnapshot.__table__.c.name)).scalars())
    assert left == {"adoption:recent000000", "signals:computing000", *mine}
    adoption, signals = kept_name(Settings(database_url="sqlite:///taskproxy.db", models=[]), "adoption"), kept_name(Settings(database_url="sqlite:///taskproxy.db", models=[]), "signals")
    assert snapshots.latest(engine, adoption).computed_at > now  # its own: refreshed,
    assert snapshots.latest(engine, signals).computed_at < now - timedelta(days=7)  # or not yet, but never deleted
    engine.dispose()


def _stuck(engine, *, since, until, pid_file: str, **_):  # type: ignore[no-untyped-def]
    Path(pid_file).write_text(str(__import__("os").getpid()))
    time.sleep(600)  # a lock never granted, say


@pytest.mark.anyio
async def test_a_stuck_snapshot_computation_is_stopped_and_its_claim_runs_out(tmp_path: Path) -> None:
    """Not renewed for ever: another replica may compute the snapshot once the stuck one lets go."""
    import os
    import signal

    from taskproxy.reports.runner import ReportRunner

    engine = make_engine(f"sqlite:///{tmp_path / 'snapshots.db'}")
    upgrade_schema(engine)
    pid_file = tmp_path / "report.pid"
    keeper = SnapshotKeeper(engine, ReportRunner(engine), timedelta(minutes=60), {"stuck": Definition(_stuck, {"pid_file": str(pid_file)})},
                            longest=timedelta(seconds=8))  # fmt: skip  (a loaded machine can take seconds to start the report's process)
    with anyio.fail_after(30):
        await keeper._keep("stuck")
    report = int(pid_file.read_text())
    for _ in range(100):  # stopped with the cut (SIGTERM), not left sleeping
        try:
            os.kill(report, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(report, signal.SIGKILL)
        pytest.fail("the stuck report's process was left running")
    row = _row(engine, "stuck")
    assert row.computed_at is None and row.claimed_until - utcnow() <= timedelta(minutes=10), row  # backed off, not held on
    engine.dispose()


@BOTH_DATABASES
def test_claims_are_renewed_no_longer_than_the_longest_computation(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    hold, go_on, running = timedelta(seconds=0.3), threading.Event(), threading.Event()

    def stuck(engine, **_):  # type: ignore[no-untyped-def]
        running.set()
        assert go_on.wait(30)
        return {}

    computing = threading.Thread(target=lambda: compute_and_store(engine, name="adoption", me="a:1", every=EVERY,
                                                                  definition=Definition(stuck, {}), hold=hold, longest=timedelta(seconds=1)))  # fmt: skip
    computing.start()
    assert running.wait(30)
    time.sleep(0.6)  # longer than one hold: only a renewal keeps the claim
    assert not snapshots.claim(engine, "adoption", "b:2", utcnow(), timedelta(0), hold)  # renewed while young
    time.sleep(1 + 3 * hold.total_seconds())
    assert snapshots.claim(engine, "adoption", "b:2", utcnow(), timedelta(0), hold)  # then let run out
    go_on.set()
    computing.join(30)
    engine.dispose()


@pytest.mark.postgres
def test_a_follower_snapshot_the_database_refuses_is_let_go_and_the_report_is_kept(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The database refusing a follower (here its name is longer than the table allows, which
    PostgreSQL refuses and SQLite would not) is that follower's failure: the report it is made from
    is stored and its computation counts as done."""
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    refused = "overview:" + "x" * 40
    definition = Definition(lambda engine, **_: {"report": 1}, {}, then=((refused, lambda engine, **_: {"overview": 1}, {}),))
    seconds = compute_and_store(engine, name="adoption", me="a:1", every=EVERY, definition=definition)
    assert seconds is not None
    assert orjson.loads(gzip.decompress(snapshots.latest(engine, "adoption").body)) == {"report": 1}  # type: ignore[union-attr]
    assert f"the snapshot {refused} could not be made from adoption" in caplog.text
    engine.dispose()
