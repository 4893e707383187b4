"""A database that vanishes without closing its connections (a failover, a host powered off, a
firewall forgetting them): packets to it are dropped, so nothing tells the proxy the connections are
dead. The proxy must go on answering at its usual pace, spool what the database does not answer
(the connections themselves end within their TCP timeouts, storage/db.py), and write all of it once
the database is back.

The black hole is made with nftables on loopback (root only): a rule drops every packet to and from
the port of a TCP relay that stands between the proxy and PostgreSQL, so only this test's connections
fall into it."""

from __future__ import annotations

import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from serve_helpers import fake_upstream, run_cli, running_server, start_server, write_config
from sqlalchemy import text
from sqlalchemy.engine import Engine
from tcp_relay import TcpRelay, black_hole_unavailable

from taskproxy.storage.db import make_engine

pytestmark = [pytest.mark.postgres, pytest.mark.serve]


def _assert_rollups_and_counters_match_the_events(engine: Engine) -> None:
    """What the reports and the budgets read (the rollups, the spend counters) adds up to the events:
    a batch committed late and replayed from the spool counted once in each."""
    with engine.connect() as connection:
        events = connection.execute(text("SELECT count(*), coalesce(sum(total_tokens), 0) FROM usage_events")).one()
        for table in ("usage_hourly", "usage_daily"):
            summed = connection.execute(text(f"SELECT coalesce(sum(requests), 0), coalesce(sum(total_tokens), 0) FROM {table}")).one()
            assert tuple(summed) == tuple(events), f"{table}: {tuple(summed)} for the events' {tuple(events)}"
        counted = connection.execute(text("SELECT coalesce(sum(tokens), 0) FROM spend_counters WHERE scope = 'item'")).scalar_one()
        assert counted == events[1], f"spend counters: {counted} tokens for the events' {events[1]}"


def _relay_to(postgres_url: str) -> tuple[TcpRelay, str]:
    """A relay to the test's PostgreSQL that can be black-holed, and the database URL through it
    (skipped where nftables cannot run; a failure in CI, which installs it)."""
    if reason := black_hole_unavailable():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    relay = TcpRelay(urlsplit(postgres_url).port or 5432)
    return relay, postgres_url.replace(f":{relay.target[1]}/", f":{relay.port}/", 1)


def test_a_database_gone_silent_is_noticed_the_usage_spooled_and_written_when_it_is_back(postgres_url: str, tmp_path: Path) -> None:
    relay, relayed_url = _relay_to(postgres_url)
    spool = tmp_path / "spool.jsonl"
    direct = make_engine(postgres_url)

    def recorded() -> int:
        with direct.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM usage_events")).scalar_one())

    def spooled() -> int:
        return sum(path.stat().st_size for path in tmp_path.glob("spool*"))

    try:
        with fake_upstream() as upstream:
            config = write_config(tmp_path, upstream.url, database_url=relayed_url,
                                  recording={"spool_path": str(spool), "flush_interval_seconds": 0.1, "batch_size": 5},
                                  budgets={"work_item_tokens": 2_000}, limits={"requests_per_minute": 400})  # fmt: skip
            assert run_cli("db", "upgrade", config=config).returncode == 0
            with running_server(config, tmp_path / "serve.log") as server:
                key = server.new_key()
                # Registered: its budget is shared by leases (an id met first in a request is this process's alone).
                assert server.http.post("/api/work-items", json={"id": "HOLE-1"}, headers=server.admin_headers).status_code == 201
                headers = {"authorization": f"Bearer {key}", "X-Work-Item": "HOLE-1"}
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

                answered: list[float] = []

                def ask(item: str = "HOLE-1") -> float:
                    started = time.monotonic()
                    reply = server.http.post("/v1/chat/completions", json=body, headers={**headers, "X-Work-Item": item})
                    assert reply.status_code == 200, reply.text
                    answered.append(time.monotonic() - started)
                    return answered[-1]

                for _ in range(10):
                    ask()
                deadline = time.monotonic() + 10
                while recorded() < 10 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert recorded() == 10

                with relay.black_hole():
                    # The request path reads no table: answered at once while the writer waits on the dead connection.
                    # HOLE-1's budget (2,000 tokens, ~20 a request) is leased in slices of 200: the first slice
                    # asked for in the dark is waited for 1 s, then this process's own count decides for a while.
                    dark = [ask() for _ in range(20)]
                    assert sum(dark) < 5.0, dark
                    # Under load too, on items started meanwhile (not in memory), and past the first slice of the
                    # key's rate (400 a minute, in slices of 40): neither the writer (its queue would fill and hold
                    # requests back), nor the items' lookups, nor the rate's lease wait on the dead connections.
                    loaded = len(answered)
                    with ThreadPoolExecutor(max_workers=8) as pool:
                        list(pool.map(lambda n: [ask(f"HOLE-{100 + n}") for _ in range(40)], range(8)))
                    assert statistics.median(answered[loaded:]) < 0.25, sorted(answered[loaded:])[::20]
                    started = time.monotonic()
                    ready = server.http.get("/readyz")
                    assert ready.status_code == 503 and time.monotonic() - started < 4.0, ready.text  # a probe answers in time
                    assert "did not answer within" in ready.text or "does not answer" in ready.text, ready.text
                    # A flood of probes (no key needed) costs one ping, and one thread, at a time: a thread each
                    # stayed until its connection's TCP timeout (hundreds of them; found by a review).
                    threads = _threads(server.process.pid)
                    with ThreadPoolExecutor(max_workers=10) as pool:
                        probes = list(pool.map(lambda _: server.http.get("/readyz").status_code, range(20)))
                    assert probes == [503] * 20 and _threads(server.process.pid) - threads < 5, (probes, _threads(server.process.pid) - threads)
                    # A key this process does not hold cannot be checked: a 503 an SDK retries after the time it says.
                    stranger = {"authorization": "Bearer tp-" + "s" * 43, "x-api-key": "tp-" + "s" * 43, "X-Work-Item": "HOLE-1"}
                    for path in ("/v1/chat/completions", "/v1/messages"):
                        refused = server.http.post(path, json=body, headers=stranger)
                        assert refused.status_code == 503 and refused.headers.get("retry-after") == "5", (path, refused.headers, refused.text)
                    # Nor can a response this process does not hold, read back or continued: told so within the
                    # lookups' second, not after the TCP timeouts (tens of seconds).
                    for method, path, payload in (("GET", "/v1/responses/resp_elsewhere", None),
                                                  ("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "go on", "previous_response_id": "resp_elsewhere"})):  # fmt: skip
                        started = time.monotonic()
                        refused = server.http.request(method, path, json=payload, headers=headers)
                        assert refused.status_code == 503 and time.monotonic() - started < 4.0, (path, refused.text, time.monotonic() - started)
                    # The writer spools what the database does not answer within 2 s.
                    deadline = time.monotonic() + 60
                    while spooled() == 0 and time.monotonic() < deadline:
                        ask()
                        time.sleep(0.5)
                    assert spooled() > 0, "the writer was still waiting on a connection to a database that was gone"

                # Back: every answered request is written exactly once, what was spooled included.
                deadline = time.monotonic() + 60
                while (recorded() < len(answered) or spooled()) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert spooled() == 0
                assert recorded() == len(answered)
                _assert_rollups_and_counters_match_the_events(direct)
    finally:
        direct.dispose()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_process_stopped_while_the_database_is_silent_exits_promptly_and_the_next_writes_its_spool(
    postgres_url: str, tmp_path: Path, stop: signal.Signals
) -> None:
    """A rolling restart during a failover: the stopping process must not wait out the TCP timeouts of
    connections to a database that does not answer (its lookups, its writer, its budget slices, its
    snapshots' claims), and what it could not write waits in its spool for the next process."""
    relay, relayed_url = _relay_to(postgres_url)
    spool = tmp_path / "spool.jsonl"
    direct = make_engine(postgres_url)
    try:
        with fake_upstream() as upstream:
            config = write_config(tmp_path, upstream.url, database_url=relayed_url, server={"shutdown_grace_seconds": 2},
                                  recording={"spool_path": str(spool), "flush_interval_seconds": 0.1, "batch_size": 5},
                                  budgets={"work_item_tokens": 2_000}, limits={"requests_per_minute": 400})  # fmt: skip
            assert run_cli("db", "upgrade", config=config).returncode == 0
            server = start_server(config, tmp_path / "serve.log")
            try:
                key = server.new_key()
                assert server.http.post("/api/work-items", json={"id": "HOLE-1"}, headers=server.admin_headers).status_code == 201
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                answered = 0

                def ask(item: str) -> None:
                    nonlocal answered
                    reply = server.http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}", "X-Work-Item": item})
                    assert reply.status_code == 200, reply.text
                    answered += 1

                for _ in range(5):
                    ask("HOLE-1")
                with relay.black_hole():
                    # Lookups of items not in memory, a budget's slice and the writer's batches all wait on dead connections.
                    with ThreadPoolExecutor(max_workers=4) as pool:
                        list(pool.map(lambda n: [ask(f"HOLE-{200 + n}") for _ in range(5)], range(4)))
                    for _ in range(20):
                        ask("HOLE-1")
                    time.sleep(3)  # the writer's batch has outlived its wait
                    started = time.monotonic()
                    server.process.send_signal(stop)
                    server.process.wait(120)
                    took = time.monotonic() - started
                # uvicorn re-raises the signal once it has stopped: SIGTERM ends the process, SIGINT exits 130.
                assert server.process.returncode in (0, -signal.SIGTERM, 130), server.log()[-3000:]
                assert took < 10.0, f"exit took {took:.1f} s:\n{server.log()[-3000:]}"
            finally:
                server.stop()
            assert spool.exists() or any(tmp_path.glob("spool*")), "nothing was spooled"
            with running_server(config, tmp_path / "again.log"):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with direct.connect() as connection:
                        if int(connection.execute(text("SELECT count(*) FROM usage_events")).scalar_one()) >= answered:
                            break
                    time.sleep(0.2)
                with direct.connect() as connection:
                    assert int(connection.execute(text("SELECT count(*) FROM usage_events")).scalar_one()) == answered
                _assert_rollups_and_counters_match_the_events(direct)
    finally:
        direct.dispose()


def _threads(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Threads:")).split()[1])
