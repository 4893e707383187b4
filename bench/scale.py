"""Seed scale: `python bench/scale.py [--postgres URL] [--schema NAME] [--events N] [--skip-seed] ...`

Builds (or resumes building) the seed organisation in a PostgreSQL schema of its own with
`bench/seed_org.py` (default: 85,000 keys, 5,000 teams, 2,000,000 work items, 100,000,000 usage
events over 90 days; database `TASKPROXY_BENCH_POSTGRES_URL`, default
`postgresql://postgres@127.0.0.1:5432/taskproxy_bench`, created if missing; never `test`), then, with
three `taskproxy serve` replicas against it (mode `active`, a default per-item budget and team
budgets, so every request looks up its key, its item and their spend), measures:

- per replica: resident memory after the load (and its peak), and CPU used while idle for
  `--idle-seconds` (the background refreshes: change feed, spend counters), as % of a core;
- how long a revocation and an item's completion made through one replica take to reach the other
  two (each replica had used the key and the item before);
- added latency p50/p99 at concurrency 1 and 32 (bench/loadgen.py, the fake provider in its own
  process), against three replicas of the same configuration on an empty schema, running at the same
  time: the two sets take turns (`--latency-rounds`, 4: each set goes first in half of them; medians
  reported), and each turn records the CPU of the loaded replica, of its two siblings and of
  PostgreSQL;
- the writer's sustained insert rate into the seeded schema from one process (repo.write_batch,
  batches of 500: events, rollups and spend counters in one transaction);
- with `--parts writers` (not in the default run): 1, 2 and 4 writer processes at once, as several
  replicas' writers are, for 20 s each: the events per second the database takes from all of them;
- the adoption report, a work item's view, a team report and the signals over the last 30 days;
- `serve --workers 2` against one worker: requests/s at concurrency 32, with lean neighbours
  (bench/lean.py: nginx as the provider, wrk as the load; skipped, saying so, where they are not
  installed), one worker and two taking turns, `--rounds` times;
- with `--parts served-reports` (not in the default run): one replica's resident memory before and
  after it serves the adoption report and the signals over HTTP, and at its peak;
- three replicas with `reports.snapshot_minutes` set (`--parts snapshots`): how long the first
  snapshot of each report took to compute, and reading it back from each replica over HTTP
  (`?snapshot=latest`).

Prints the results, writes them to bench/results/scale-<parts>.json, and ends with a table of the
targets against what the run measured, each met or missed. The numbers in docs/scale.md come from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import lean  # noqa: E402
from loadgen import run_load  # noqa: E402
from seed_org import schema_url, seed  # noqa: E402
from targets import FakeProvider, Taskproxy  # noqa: E402
from write_path import make_rows  # noqa: E402

from taskproxy.ids import time_ordered_id
from taskproxy.memory import collector_paused
from taskproxy.reports.adoption import adoption_report  # noqa: E402
from taskproxy.reports.items import work_item_view  # noqa: E402
from taskproxy.reports.signals import gaming_signals  # noqa: E402
from taskproxy.reports.usage import usage_grouped  # noqa: E402
from taskproxy.settings import ReportSettings
from taskproxy.storage import repo  # noqa: E402
from taskproxy.storage.db import ReportSession, make_engine, upgrade_schema  # noqa: E402
from taskproxy.timeutil import utcnow  # noqa: E402

RESULTS = BENCH / "results"
DEFAULT_POSTGRES = os.environ.get("TASKPROXY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/taskproxy_bench")
REPLICAS = 3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command's name: [0] state, [1] ppid, [11:13] utime, stime, [13:15] cutime, cstime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _seconds(ticks: list[str]) -> float:
    return sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    return _seconds(_stat_fields(pid)[11:13])


def memory_mib(pid: int) -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": int(status["VmRSS"].split()[0]) / 1024, "peak": int(status["VmHWM"].split()[0]) / 1024}


class Replica(Taskproxy):
    """`taskproxy serve` on the seeded schema, configured as a large company would run it."""

    def __init__(self, folder: Path, provider_url: str, database_url: str, name: str, workers: int = 1, snapshot_minutes: float = 0) -> None:
        self.workers = workers
        self.snapshot_minutes = snapshot_minutes
        self.startup_s = 0.0
        super().__init__(folder, provider_url, database_url, name)

    def configure(self, *, slowed_down: bool = False) -> None:
        config = {
            "database_url": self.database_url,
            "models": [{"name": "gpt-4o-mini", "provider": "openai", "base_url": f"{self.provider_url}/v1"}],
            "recording": {"spool_path": str(self.folder / f"{self.name}-spool.jsonl")},
            "work_items": {"mode": "active"},
            "budgets": {"work_item_tokens": 10**15, "teams": {f"team-{n}": {"tokens": 10**15} for n in range(20)}},
        }
        if self.snapshot_minutes:
            config["reports"] = {"snapshot_minutes": self.snapshot_minutes}
        self.config.write_text(json.dumps(config, indent=2))

    def command(self, port: int) -> list[str]:
        return [*super().command(port), "--workers", str(self.workers)]

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_key}"}

    def new_key(self, owner: str, team: str) -> tuple[str, str]:
        reply = httpx.post(f"{self.url}/api/keys", json={"owner": owner, "team": team}, headers=self.admin(), timeout=30)
        reply.raise_for_status()
        return reply.json()["id"], reply.json()["key"]


def ask(url: str, key: str, item: str, expect: int | None = None) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}", "X-Work-Item": item}, timeout=30)
    if expect is not None and reply.status_code != expect:
        raise RuntimeError(f"{url}: {item}: {reply.status_code} {reply.text[:300]}")
    return reply.status_code


def seconds_until(check: Callable[[], bool], since: float, timeout: float = 60.0) -> float:
    """Seconds from `since` (perf_counter) until `check()` holds."""
    while not check():
        if time.perf_counter() - since > timeout:
            raise RuntimeError(f"not reached within {timeout} s")
        time.sleep(0.02)
    return time.perf_counter() - since


def open_items(url: str, count: int) -> list[str]:
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id FROM work_items WHERE status IN ('open', 'in_progress') AND budget_tokens IS NULL ORDER BY id LIMIT :n"), {"n": count})
        found = [row[0] for row in rows]
    engine.dispose()
    return found


def latency(replica: Replica, key: str, item: str, concurrency: int, seconds: float) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}", "X-Work-Item": item}
    result = asyncio.run(run_load(f"{replica.url}/v1/chat/completions", concurrency=concurrency, duration=seconds, max_requests=200_000,
                                  headers=headers, warmup=1.0))  # fmt: skip
    return {k: result[k] for k in ("count", "rps", "p50_ms", "p99_ms", "errors", "error_examples")}


def postgres_cpu_seconds() -> float:
    """CPU used so far by the machine's PostgreSQL: its running processes (backends included), and
    the processes that ended (a backend of a closed connection, an autovacuum worker), which the
    kernel adds to their parent's `cutime`/`cstime` once the postmaster has reaped them."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = _stat_fields(entry.name)
            total += _seconds(fields[11:13])
            parent = Path(f"/proc/{fields[1]}/comm")
            if not parent.exists() or parent.read_text().strip() != "postgres":  # the postmaster
                total += _seconds(fields[13:15])
        except OSError:  # gone meanwhile
            continue
    return total


@dataclass
class Setup:
    """A set of replicas ready for the latency load: the loaded one, its siblings, its key and item."""

    name: str
    replicas: list[Replica]
    key: str
    item: str


def latency_turns(setups: list[Setup], seconds: float, rounds: int) -> dict[str, Any]:
    """Concurrency 1 and 32 on each setup's first replica, the setups taking turns (their order swapped
    every round), so that a drift of the machine shows as a spread in both, not as a difference between
    them. Each turn also records the CPU (% of a core) of the replica under load, of its idle siblings
    together, and of PostgreSQL."""
    turns: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {1: [], 32: []} for s in setups}
    for round_ in range(rounds):
        for concurrency in (1, 32):
            for setup in setups if round_ % 2 == 0 else setups[::-1]:
                loaded, siblings = setup.replicas[0], setup.replicas[1:]
                before = (cpu_seconds(loaded.proc.pid), sum(cpu_seconds(r.proc.pid) for r in siblings), postgres_cpu_seconds())
                started = time.perf_counter()
                result = latency(loaded, setup.key, setup.item, concurrency, seconds)
                took = time.perf_counter() - started
                after = (cpu_seconds(loaded.proc.pid), sum(cpu_seconds(r.proc.pid) for r in siblings), postgres_cpu_seconds())
                result["cpu_percent"] = dict(zip(("replica", "siblings", "postgres"), (round(100 * (a - b) / took, 1) for a, b in zip(after, before))))
                turns[setup.name][concurrency].append(result)
                log(f"{setup.name}, concurrency {concurrency}: {result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms, "
                    f"CPU {result['cpu_percent']}")  # fmt: skip
    medians = {
        name: {c: {**{f: statistics.median(t[f] for t in runs) for f in ("rps", "p50_ms", "p99_ms")},
                   "count": sum(t["count"] for t in runs), "errors": sum(t["errors"] for t in runs)} for c, runs in by_concurrency.items()}
        for name, by_concurrency in turns.items()
    }  # fmt: skip
    return {"turns": turns, "medians": medians}


def propagation(replicas: list[Replica], item: str) -> dict[str, float]:
    """A key and an item used on every replica; revoked and completed through the first; the time until
    each of the others refuses."""
    first = replicas[0]

    def seconds_to_reach_the_others(owner: str, change: Callable[[str], httpx.Response], refused: int) -> float:
        key_id, key = first.new_key(owner, "team-1")
        for replica in replicas:
            ask(replica.url, key, item, expect=200)
        change(key_id).raise_for_status()
        committed = time.perf_counter()
        return max(seconds_until(lambda r=r: ask(r.url, key, item) == refused, committed) for r in replicas[1:])

    return {
        "revocation_s": seconds_to_reach_the_others(
            "propagation", lambda key_id: httpx.delete(f"{first.url}/api/keys/{key_id}", headers=first.admin(), timeout=30), 401),
        "completion_s": seconds_to_reach_the_others(
            "propagation-2", lambda _: httpx.post(f"{first.url}/api/work-items/{item}/complete", headers=first.admin(), timeout=30), 403),
    }  # fmt: skip


def writer_rate(url: str, seconds: float, ids: str = "time") -> dict[str, float]:
    """Batches of 500 events, as the writer sends them, for `seconds` of writing (making the rows is not
    counted: the proxy has them already). The events' times advance at 20 a second from the seeded
    period's last day, so the rollups' buckets move on as they do in service."""
    engine = make_engine(url)
    rng = random.Random(7)
    written, writing = 0, 0.0
    first = datetime.combine(utcnow().date() - timedelta(days=1), datetime.min.time()) + timedelta(hours=9)
    while writing < seconds:
        rows = make_rows(500, rng, keys=2000, start=first + timedelta(seconds=written / 20), ids=ids)
        started = time.perf_counter()
        repo.write_batch(engine, events=rows, rejections=[], new_items=[])
        writing += time.perf_counter() - started
        written += len(rows)
    engine.dispose()
    return {"events": written, "seconds": writing, "events_per_s": written / writing}


def _writing_until(url: str, seed: int, ready: Any, seconds: float, results: Any) -> None:
    """One of `writers_at_once`' processes: rows made before the window (their ids and times renewed for
    each batch, which costs next to nothing), then batches of 500 for `seconds` from the common start."""
    engine = make_engine(url)
    rng = random.Random(seed)
    day = datetime.combine(utcnow().date() - timedelta(days=1), datetime.min.time()) + timedelta(hours=9)
    pool = [make_rows(500, rng, keys=2000, start=day + timedelta(minutes=n)) for n in range(20)]
    ready.wait()  # every process has made its rows: they start together
    began = time.perf_counter()
    written = batches = 0
    while time.perf_counter() - began < seconds:
        rows = pool[batches % len(pool)]
        for row in rows:
            row["ts"] = row["ts"] + timedelta(seconds=1)
            row["id"] = time_ordered_id(row["ts"])
        repo.write_batch(engine, events=rows, rejections=[], new_items=[])
        written += len(rows)
        batches += 1
    took = time.perf_counter() - began
    engine.dispose()
    results.put({"events": written, "seconds": took})


def writers_at_once(url: str, seconds: float, counts: tuple[int, ...] = (1, 2, 4)) -> dict[str, dict[str, Any]]:
    """`n` writer processes writing at once into the same schema (the same 2,000 people and 900 items:
    their rollup rows are shared, as one person's requests spread over several replicas are): the
    events per second the database took from all of them together, for each `n`."""
    context = multiprocessing.get_context("fork")
    found: dict[str, dict[str, Any]] = {}
    for count in counts:
        ready, results = context.Barrier(count), context.Queue()
        processes = [context.Process(target=_writing_until, args=(url, 100 * count + n, ready, seconds, results)) for n in range(count)]
        for process in processes:
            process.start()
        each = [results.get(timeout=seconds + 600) for _ in processes]
        for process in processes:
            process.join(timeout=60)
            if process.exitcode != 0:
                raise RuntimeError(f"a writer process ended with {process.exitcode}")
        events = sum(one["events"] for one in each)
        window = max(one["seconds"] for one in each)
        found[str(count)] = {"events": events, "seconds": window, "events_per_s": events / window,
                             "per_process": [one["events"] / one["seconds"] for one in each]}  # fmt: skip
        log(f"{count} writers at once: {found[str(count)]['events_per_s']:,.0f} events/s")
    return found


def timed(call: Callable[[], Any], runs: int = 3) -> dict[str, float]:
    call()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def once(call: Callable[[], Any]) -> dict[str, float]:
    started = time.perf_counter()
    call()
    took = time.perf_counter() - started
    return {"median_s": took, "min_s": took, "max_s": took}


def in_report_process(compute: Callable[[], Any]) -> Any:
    """`compute()` as a report's process runs it (reports/runner.py): with the cyclic collector paused."""
    with collector_paused():
        return compute()


def reports(url: str) -> dict[str, dict[str, float]]:
    engine = make_engine(url, report=ReportSession.of(ReportSettings()))  # as a report's process makes it (reports/runner.py)
    with engine.connect() as connection:
        busy = connection.execute(text("SELECT ref FROM spend_counters WHERE scope = 'item' ORDER BY tokens DESC LIMIT 1")).scalar_one()
    since = utcnow() - timedelta(days=30)
    cases: list[tuple[str, Callable[[], Any], int]] = [
        ("adoption report, 30 days", lambda: in_report_process(lambda: adoption_report(engine, since=since, until=utcnow())), 3),
        (f"work item view ({busy}, the busiest)", lambda: work_item_view(engine, busy), 3),
        ("team report (usage by team), 30 days", lambda: usage_grouped(engine, "team", since), 3),
        ("signals, 30 days", lambda: in_report_process(lambda: gaming_signals(engine, since=since, until=utcnow())), 0),
    ]
    found = {}
    for name, call, runs in cases:  # each logged as it is measured: the signals may take long
        found[name] = timed(call, runs) if runs else once(call)
        log(f"{name}: {found[name]}")
    engine.dispose()
    return found


def served_reports(replica: Replica, until: datetime) -> dict[str, Any]:
    """The replica's own memory around the period reports it serves over HTTP (computed in a report
    process of their own), with `until` fixed."""
    found: dict[str, Any] = {"before": memory_mib(replica.proc.pid)}
    stamp = until.strftime("%Y-%m-%dT%H:%M:%SZ")
    for name in ("adoption", "signals"):
        started = time.perf_counter()
        reply = httpx.get(f"{replica.url}/api/reports/{name}", params={"until": stamp}, headers=replica.admin(), timeout=900)
        reply.raise_for_status()
        took = time.perf_counter() - started
        time.sleep(1)
        found[name] = {"seconds": took, "answer_mb": len(reply.content) / 1e6, "after": memory_mib(replica.proc.pid)}
        log(f"served {name} report: {found[name]}")
    return found


def served_snapshots(replicas: list[Replica], url: str, reads: int = 10) -> dict[str, Any]:
    """With snapshots on (every 60 minutes) in every replica: how long the first computation of each
    report took (in whichever replica claimed it), and how long reading the stored answer takes, from
    each replica, over HTTP."""
    found: dict[str, Any] = {}
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    for name, path in (("adoption", "adoption"), ("signals", "signals")):
        started = time.perf_counter()
        while httpx.get(f"{replicas[0].url}/api/reports/{path}", params={"snapshot": "latest"}, headers=replicas[0].admin(), timeout=60).status_code != 200:
            if time.perf_counter() - started > 1800:
                raise RuntimeError(f"no {name} snapshot within 30 minutes")
            time.sleep(1)
        with engine.connect() as connection:
            row = connection.execute(text("SELECT seconds, computed_by, length(body) FROM report_snapshots WHERE name LIKE :n AND body IS NOT NULL"),
                                     {"n": f"{name}:%"}).one()  # fmt: skip
        times = []
        for n in range(reads):
            replica = replicas[n % len(replicas)]
            began = time.perf_counter()
            httpx.get(f"{replica.url}/api/reports/{path}", params={"snapshot": "latest"}, headers=replica.admin(), timeout=60).raise_for_status()
            times.append(time.perf_counter() - began)
        right_after = [memory_mib(r.proc.pid) for r in replicas]
        time.sleep(12)  # a replica hands freed memory back when it has been idle a few seconds (process.py)
        found[name] = {"computed_in_s": row[0], "computed_by": row[1], "stored_mb": row[2] / 1e6, "read_median_s": statistics.median(times),
                       "read_max_s": max(times), "memory_mib_right_after": right_after,
                       "memory_mib_idle": [memory_mib(r.proc.pid) for r in replicas]}  # fmt: skip
        log(f"{name} snapshot: {found[name]}")
    # The dashboard's overview (the adoption report, twelve weeks of completions, the top items), from its snapshot.
    started = time.perf_counter()
    while True:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT seconds, computed_by, length(body) FROM report_snapshots WHERE name LIKE 'overview:%' AND body IS NOT NULL")).first()
        if row is not None:
            break
        if time.perf_counter() - started > 1800:
            raise RuntimeError("no overview snapshot within 30 minutes")
        time.sleep(1)
    times = []
    for n in range(reads):
        replica = replicas[n % len(replicas)]
        with httpx.Client(base_url=replica.url, timeout=120) as browser:
            if browser.post("/dashboard/login", data={"key": replica.admin_key}).status_code != 303:
                raise RuntimeError("could not sign in to the dashboard")
            began = time.perf_counter()
            page = browser.get("/dashboard")
            times.append(time.perf_counter() - began)
            if 'data-testid="snapshot"' not in page.text:
                raise RuntimeError("the overview was not served from its snapshot")
    with engine.connect() as connection:  # made from the adoption report's computation, for its period
        periods = connection.execute(text("SELECT count(DISTINCT (since, until)) FROM report_snapshots WHERE body IS NOT NULL "
                                          "AND (name LIKE 'overview:%' OR name LIKE 'adoption:%')")).scalar_one()  # fmt: skip
    found["overview"] = {"computed_in_s": row[0], "computed_by": row[1], "stored_mb": row[2] / 1e6, "page_median_s": statistics.median(times),
                         "page_max_s": max(times), "memory_mib": [memory_mib(r.proc.pid) for r in replicas],
                         "same_period_as_adoption": periods == 1}  # fmt: skip
    log(f"overview snapshot: {found['overview']}")
    engine.dispose()
    return found


@contextmanager
def replicas_on(folder: Path, provider_url: str, url: str, count: int, prefix: str, workers: int = 1,
                snapshot_minutes: float = 0) -> Iterator[list[Replica]]:  # fmt: skip
    with ExitStack() as stack:
        started: list[Replica] = []
        for n in range(count):
            replica = Replica(folder, provider_url, url, f"{prefix}-{n}", workers=workers, snapshot_minutes=snapshot_minutes)
            replica.startup_s = replica.start(timeout=300)
            stack.callback(replica.stop)
            started.append(replica)
        yield started


def workers_lean(folder: Path, url: str, seconds: float, rounds: int) -> dict[str, Any]:
    """`serve --workers 2` against one, at concurrency 32, with nginx as the provider and wrk as the
    load, so that the proxy has the cores to itself but for them and PostgreSQL; one and two workers
    take turns, so a drift of the machine shows as a spread, not as a ratio."""
    missing = lean.available()
    if missing:
        log(f"--parts workers skipped: {missing}")
        return {"skipped": missing}
    item = open_items(url, 2)[1]
    provider = lean.StaticProvider(folder)
    provider.start()
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    try:
        for _ in range(rounds):
            for workers in (1, 2):
                with replicas_on(folder, provider.url, url, 1, f"lean-workers-{workers}", workers=workers) as (served,):
                    _, key = served.new_key(f"lean-workers-{workers}", "team-1")
                    ask(served.url, key, item, expect=200)
                    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Add retries with jitter to the payment webhook client."}],
                            "max_tokens": 20}  # fmt: skip
                    result = lean.wrk_load(f"{served.url}/v1/chat/completions", {"Authorization": f"Bearer {key}", "X-Work-Item": item}, body,
                                           32, seconds, folder)  # fmt: skip
                    runs[str(workers)].append(result)
                    log(f"lean --workers {workers}: {result}")
    finally:
        provider.stop()
    ratios = [two["rps"] / one["rps"] for one, two in zip(runs["1"], runs["2"], strict=True)]
    return {"runs": runs, "ratios": ratios, "ratio_median": statistics.median(ratios)}


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The issue's targets against what this run measured: (measure, target, measured, verdict), for the
    parts that ran. "No worse than empty" is taken strictly: the seeded medians against the empty ones."""
    rows: list[tuple[str, str, str, str]] = []

    def add(measure: str, target: str, measured: str, met: bool, missed: str = "missed") -> None:
        rows.append((measure, target, measured, "met" if met else missed))

    if "memory_mib" in results:
        rss = [m["rss"] for m in results["memory_mib"]]
        add("resident memory per replica after the load", "<= 150 MiB", f"{min(rss):.1f}-{max(rss):.1f} MiB (peak {max(m['peak'] for m in results['memory_mib']):.1f})",
            max(rss) <= 150)  # fmt: skip
        idle = results["idle_cpu_percent"]
        add("CPU while idle, per replica", "<= 1 % of a core", f"{min(idle):.2f}-{max(idle):.2f} %", max(idle) <= 1)
        for what, key in (("a revocation reaching the other replicas", "revocation_s"), ("a completion reaching the other replicas", "completion_s")):
            add(what, "<= 5 s", f"{results['propagation'][key]:.3f} s", results["propagation"][key] <= 5)
    if "latency" in results:
        seeded, empty = results["seeded"], results["empty"]
        for c in (1, 32):
            s_, e_ = seeded[c], empty[c]
            worse = max(s_["p50_ms"] / e_["p50_ms"], s_["p99_ms"] / e_["p99_ms"], e_["rps"] / s_["rps"]) - 1
            add(f"concurrency {c}, seeded (empty): req/s, p50 / p99", "no worse than empty",
                f"{s_['rps']:,.0f}, {s_['p50_ms']:.2f} / {s_['p99_ms']:.2f} ms ({e_['rps']:,.0f}, {e_['p50_ms']:.2f} / {e_['p99_ms']:.2f})",
                worse <= 0, f"missed by {100 * worse:.0f} %")  # fmt: skip
    if "workers_lean" in results and "ratio_median" in results["workers_lean"]:
        ratios = results["workers_lean"]["ratios"]
        add("serve --workers 2 / one worker, concurrency 32", ">= 1.6x",
            f"{results['workers_lean']['ratio_median']:.2f}x (turns {', '.join(f'{r:.2f}' for r in ratios)})", results["workers_lean"]["ratio_median"] >= 1.6)
    if "writer" in results:
        rate = results["writer"]["events_per_s"]
        add("the writer, one process", ">= 10,000 events/s", f"{rate:,.0f} events/s", rate >= 10_000)
    for name, measured in results.get("reports", {}).items():
        target = 5.0 if name.startswith("signals") else 1.0
        add(f"{name}, computed", f"< {target:g} s", f"{measured['median_s']:.2f} s", measured["median_s"] < target)
    for name, target in (("adoption", 1.0), ("signals", 5.0)):
        if name in results.get("snapshots", {}):
            read = results["snapshots"][name]
            add(f"{name} report, its latest snapshot read over HTTP", f"< {target:g} s",
                f"{read['read_median_s']:.2f} s (computed in {read['computed_in_s']:.1f} s)", read["read_median_s"] < target)  # fmt: skip
    return rows


def print_verdicts(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[n]) for row in rows) for n in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=sys.stderr)


class _Skip(Exception):
    """The replicas' measurements are not wanted (--parts)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--schema", default="bench_seed")
    parser.add_argument("--keys", type=int, default=85_000)
    parser.add_argument("--teams", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--events", type=int, default=100_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--skip-seed", action="store_true", help="measure the schema as it is")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--event-ids", choices=("time", "random"), default="time",
                        help="the writer's event ids: time-ordered as the proxy makes them, or random (uuid4, as before 2026-12-04)")
    parser.add_argument("--rounds", type=int, default=3, help="--parts workers: how many turns of one worker and two")
    parser.add_argument("--latency-rounds", type=int, default=4, choices=range(1, 101), metavar="N",
                        help="how many turns the seeded and the empty replicas take at each concurrency (even: each goes first as often)")
    parser.add_argument("--parts", default="replicas,workers,writer,reports,snapshots", help="which measurements to make (comma-separated)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))

    folder = BENCH / "results" / "scale-run"
    folder.mkdir(parents=True, exist_ok=True)
    seeded_url = schema_url(args.postgres, args.schema)
    if not args.skip_seed:
        seed(args.postgres, args.schema, keys=args.keys, teams=args.teams, items=args.items, events=args.events, days=args.days, log=log)
    empty_url = schema_url(args.postgres, "bench_empty")
    admin = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS bench_empty CASCADE"))
        connection.execute(text("CREATE SCHEMA bench_empty"))
    admin.dispose()
    upgrade_schema(make_engine(empty_url))
    with make_engine(seeded_url).connect() as connection:
        sizes = {t: connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("api_keys", "work_items", "usage_events")}
    log(f"measuring on {sizes}")
    results: dict[str, Any] = {"sizes": sizes, "machine": platform.platform(), "cpus": os.cpu_count()}

    fake = FakeProvider(folder)
    fake.start()
    try:
        if "replicas" not in parts:
            raise _Skip
        items = open_items(seeded_url, 4000)
        with replicas_on(folder, fake.url, seeded_url, REPLICAS, "seeded") as replicas:
            results["startup_s"] = [r.startup_s for r in replicas]
            results["startup_rss_mib"] = [memory_mib(r.proc.pid)["rss"] for r in replicas]
            keys = [replicas[n % REPLICAS].new_key(f"load-{n}", f"team-{n % 50}") for n in range(60)]
            log("spreading requests over 60 keys and 3,000 items on the three replicas")
            for n in range(3000):
                ask(replicas[n % REPLICAS].url, keys[n % len(keys)][1], items[n], expect=200)
            # The same three replicas on an empty schema, idle but for the turns they take with the seeded ones.
            with replicas_on(folder, fake.url, empty_url, REPLICAS, "empty") as empties:
                empties[0].new_key("load", "team-1")
                httpx.post(f"{empties[0].url}/api/work-items", json={"id": "EMPTY-1"}, headers=empties[0].admin(), timeout=30).raise_for_status()
                _, empty_key = empties[0].new_key("load-2", "team-1")
                setups = [Setup("seeded", replicas, keys[0][1], items[0]), Setup("empty", empties, empty_key, "EMPTY-1")]
                results["latency"] = latency_turns(setups, args.load_seconds, args.latency_rounds)
            results["seeded"], results["empty"] = results["latency"]["medians"]["seeded"], results["latency"]["medians"]["empty"]
            log(f"latency medians: seeded {results['seeded']}, empty {results['empty']}")
            results["propagation"] = propagation(replicas, items[-1])
            log(f"propagation: {results['propagation']}")
            cpu_before = [cpu_seconds(r.proc.pid) for r in replicas]
            log(f"idle for {args.idle_seconds:.0f} s: the background refreshes alone")
            time.sleep(args.idle_seconds)
            results["idle_cpu_percent"] = [100 * (cpu_seconds(r.proc.pid) - b) / args.idle_seconds for r, b in zip(replicas, cpu_before, strict=True)]
            results["memory_mib"] = [memory_mib(r.proc.pid) for r in replicas]
            log(f"idle CPU {results['idle_cpu_percent']}, memory {results['memory_mib']}")
    except _Skip:
        pass
    finally:
        fake.stop()
    if "snapshots" in parts:  # the first snapshots take two minutes or more
        with create_engine(seeded_url.replace("postgresql://", "postgresql+psycopg://", 1)).begin() as connection:
            if connection.execute(text("SELECT to_regclass('report_snapshots')")).scalar() is not None:
                connection.execute(text("DELETE FROM report_snapshots"))  # so the first computation is measured
        with replicas_on(folder, "http://127.0.0.1:9", seeded_url, REPLICAS, "snapshots", snapshot_minutes=60) as served:
            results["snapshots"] = served_snapshots(served, seeded_url)
    if "served-reports" in parts:  # not in the default run: the two reports take two minutes more
        with replicas_on(folder, "http://127.0.0.1:9", seeded_url, 1, "reports") as (served,):
            midnight = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
            results["served_reports"] = served_reports(served, midnight)
    if "workers" in parts:
        results["workers_lean"] = workers_lean(folder, seeded_url, args.load_seconds, args.rounds)
    if "writer" in parts:
        results["writer"] = writer_rate(seeded_url, 20.0, ids=args.event_ids)
        log(f"writer: {results['writer']}")
    if "writers" in parts:  # not in the default run
        results["writers"] = writers_at_once(seeded_url, 20.0)
    if "reports" in parts:
        results["reports"] = reports(seeded_url)
        log(f"reports: {results['reports']}")
    results["verdicts"] = verdicts(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale-{'-'.join(sorted(parts))}.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    log("targets:")
    print_verdicts(results["verdicts"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
