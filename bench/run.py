"""The taskproxy benchmark, one command: `python bench/run.py [--quick]`.

In one run, on 127.0.0.1, against a fake OpenAI provider in its own process, it measures the same
requests sent directly to the provider, through taskproxy (recording on, SQLite and PostgreSQL)
and through the LiteLLM proxy (installed by the script in bench/.litellm-venv; no database, its
bundled price map, logging off), alternating targets within every repetition:

1. start-up: spawn to the first proxied request answered, a few starts each;
2. latency and throughput: non-streaming and streaming (20 chunks), concurrency 1 and 32, with the
   CPU time each server process used per request (/proc/<pid>/stat);
3. recording: every request taskproxy answered must be in its usage table (checked via the API);
4. memory: taskproxy's resident memory after 100,000 requests, and after 100,000 more;
5. instructions per request of each proxy process, counted by callgrind (bench/instructions.py).

Writes bench/results/latest.json, latest.md and latest.svg (the chart) and prints the table with
the issue's targets checked. Exit status 1 when a request failed or a recorded count is off; with
--strict, 2 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chart import render_svg  # noqa: E402
from instructions import Callgrind, available as callgrind_available  # noqa: E402
from loadgen import DEFAULT_BODY, run_load  # noqa: E402
from report import markdown, targets_table  # noqa: E402
from targets import FakeProvider, LiteLLMProxy, Served, Taskproxy, ensure_litellm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = [(False, 1), (False, 32), (True, 1), (True, 32)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def summarize(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def load(target: Served, *, stream: bool, concurrency: int, duration: float, warmup: float, max_requests: int,
         timeout: float = 30.0, mark: Any = None) -> dict[str, Any]:  # fmt: skip
    return asyncio.run(run_load(target.url + target.endpoint, concurrency=concurrency, duration=duration, warmup=warmup,
                                max_requests=max_requests, stream=stream, headers=target.headers(), body=DEFAULT_BODY,
                                request_timeout=timeout, mark=mark))  # fmt: skip


def start_measured(target: Served) -> tuple[float, int]:
    """Spawn, wait for the health URL, send one request: (seconds from spawn to its answer, requests answered)."""
    began = time.perf_counter()
    target.start()
    r = load(target, stream=False, concurrency=1, duration=60, warmup=0, max_requests=1, timeout=60)
    if r["count"] != 1 or r["errors"]:
        raise RuntimeError(f"{target.name}: the first request failed: {r['error_examples']}")
    return time.perf_counter() - began, r["total_ok"]


def postgres_database(url: str) -> tuple[str | None, str | None]:
    """A fresh database for the run on the server at `url`: (its URL, None) or (None, why not)."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[dev]')"
    name = f"taskproxy_bench_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        return None, f"PostgreSQL at {url} cannot be used: {str(exc).strip().splitlines()[0]}"
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}", None


def drop_postgres_database(admin_url: str, database_url: str) -> None:
    import psycopg

    name = database_url.rpartition("/")[2]
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description="taskproxy benchmark: direct vs taskproxy (SQLite, PostgreSQL) vs the LiteLLM proxy")
    parser.add_argument("--quick", action="store_true", help="short windows, 2 repetitions, 2 × 10,000-request memory runs (~5 min)")
    parser.add_argument("--postgres-url", default=os.environ.get("TASKPROXY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
                        help="a server where the run may create (and then drop) a database of its own")  # fmt: skip
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy (no install)")
    parser.add_argument("--no-instructions", action="store_true", help="skip the callgrind phase")
    parser.add_argument("--memory-requests", type=int, help="requests in each of the two memory runs (default 100,000; quick 10,000)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    parser.add_argument("--only-instructions", action="store_true", help="only the callgrind phase (to compare two trees' instruction counts)")
    args = parser.parse_args()
    quick = args.quick
    duration, warmup, reps, startups = (1.5, 0.3, 2, 1) if quick else (4.0, 0.5, 3, 3)
    memory_requests = args.memory_requests or (10_000 if quick else 100_000)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    began = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="taskproxy-bench-"))
    notes: list[str] = []
    fake = FakeProvider(folder)
    fake.start()
    litellm_python = None
    if not args.no_litellm:
        litellm_python = ensure_litellm()
    pg_url, why = postgres_database(args.postgres_url)
    if why:
        notes.append(f"taskproxy on PostgreSQL not measured: {why}")
        print(notes[-1], flush=True)
    proxies: list[Served] = [Taskproxy(folder, fake.url, f"sqlite:///{folder / 'bench.db'}", "taskproxy-sqlite")]
    if pg_url:
        proxies.append(Taskproxy(folder, fake.url, pg_url, "taskproxy-postgres"))
    if litellm_python:
        proxies.append(LiteLLMProxy(folder, fake.url, litellm_python))
    results: dict[str, Any] = {"quick": quick, "window_seconds": duration, "warmup_seconds": warmup, "repetitions": reps, "notes": notes}
    ok = True
    try:
        if args.only_instructions:
            for proxy in proxies:
                if isinstance(proxy, Taskproxy):
                    proxy.create_key()
            why_not = callgrind_available()
            results["instructions"] = {"skipped": why_not} if why_not else count_instructions(folder, proxies, quick)
            print(json.dumps(results["instructions"], indent=2), flush=True)
            return 0
        # 1. start-up
        startup: dict[str, list[float]] = {}
        served = {p.name: 0 for p in proxies if isinstance(p, Taskproxy)}  # successful answers, to check the recording
        for proxy in proxies:
            if isinstance(proxy, Taskproxy):
                proxy.create_key()
            times = []
            for attempt in range(startups):
                seconds, answered = start_measured(proxy)
                times.append(seconds)
                if proxy.name in served:
                    served[proxy.name] += answered
                if attempt < startups - 1:
                    proxy.stop()
            startup[proxy.name] = times
            print(f"{proxy.name}: started in {', '.join(f'{t:.2f}' for t in times)} s (spawn → first request answered)", flush=True)
        results["startup_seconds"] = {name: summarize(ts) | {"samples": [round(t, 3) for t in ts]} for name, ts in startup.items()}

        # 2. latency and throughput, alternating targets
        targets: list[Served] = [fake, *proxies]
        windows: list[dict] = []
        for rep in range(reps):
            for stream, conc in SCENARIOS:
                order = targets[rep % len(targets):] + targets[: rep % len(targets)]
                for target in order:
                    pid = target.pid

                    def mark(pid: int = pid) -> dict[str, float]:
                        return {"cpu": cpu_seconds(pid), "wall": time.perf_counter()}

                    r = load(target, stream=stream, concurrency=conc, duration=duration, warmup=warmup, max_requests=50_000, mark=mark)
                    a, b = r.pop("mark_start"), r.pop("mark_end")
                    r["cpu_ms_per_req"] = round((b["cpu"] - a["cpu"]) * 1000 / max(r["count"], 1), 4)
                    r["cpu_util"] = round((b["cpu"] - a["cpu"]) / (b["wall"] - a["wall"]), 3)
                    r.update(target=target.name, rep=rep)
                    windows.append(r)
                    if target.name in served:
                        served[target.name] += r["total_ok"]
                    print(f"  rep {rep + 1} {'stream' if stream else 'json  '} c={conc:<2} {target.name:<18} {r['count']:>6} req {r['errors']} err "
                          f"{r['rps']:>8.1f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  cpu {r['cpu_ms_per_req']:.3f} ms/req", flush=True)
        results["windows"] = windows
        results["rows"] = build_rows(windows, [t.name for t in targets])

        # 3. recording
        recording = {}
        for proxy in proxies:
            if isinstance(proxy, Taskproxy):
                recording[proxy.name] = check_recorded(proxy, served[proxy.name])
                ok &= recording[proxy.name]["exact"]
        results["recording"] = recording

        # 4. memory (taskproxy on SQLite, the first proxy)
        results["memory"] = memory_runs(proxies[0], memory_requests)
        for proxy in proxies:
            results.setdefault("shutdown_seconds", {})[proxy.name] = proxy.stop()

        # 5. instructions per request
        why_not = "skipped (--no-instructions)" if args.no_instructions else callgrind_available()
        results["instructions"] = {"skipped": why_not} if why_not else count_instructions(folder, proxies, quick)
    finally:
        for p in [*proxies, fake]:
            p.stop()
        if pg_url:
            drop_postgres_database(args.postgres_url, pg_url)
    errors = sum(w["errors"] for w in results["windows"])
    ok &= errors == 0
    results.update(
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "note": "the load generator, the fake provider and the proxy share these CPUs"},
        total_seconds=round(time.perf_counter() - began, 1),
    )  # fmt: skip
    results["targets"] = targets_table(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (RESULTS / "latest.md").write_text(md)
    (RESULTS / "latest.svg").write_text(render_svg(results))
    print("\n" + md)
    if ok:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"kept {folder} for inspection (logs, database)")
    if not ok:
        return 1
    return 2 if args.strict and not all(t["met"] for t in results["targets"] if t["met"] is not None) else 0


def build_rows(windows: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for stream, conc in SCENARIOS:
        row: dict[str, Any] = {"mode": "stream (20 chunks)" if stream else "non-streaming", "stream": stream, "concurrency": conc, "targets": {}}
        by = {n: sorted((w for w in windows if w["stream"] == stream and w["concurrency"] == conc and w["target"] == n), key=lambda w: w["rep"]) for n in names}
        direct = by[names[0]]
        litellm = by.get("litellm", [])
        for name in names:
            ws = by[name]
            t: dict[str, Any] = {m: summarize([w[m] for w in ws]) for m in ("rps", "p50_ms", "p90_ms", "p99_ms", "ttfb_p50_ms", "cpu_ms_per_req", "cpu_util")}
            t["errors"] = sum(w["errors"] for w in ws)
            if name != names[0]:  # paired with the direct window of the same repetition
                t["added_p50_ms"] = summarize([b["p50_ms"] - a["p50_ms"] for a, b in zip(direct, ws)])
                t["added_p99_ms"] = summarize([b["p99_ms"] - a["p99_ms"] for a, b in zip(direct, ws)])
                t["added_ttfb_p50_ms"] = summarize([b["ttfb_p50_ms"] - a["ttfb_p50_ms"] for a, b in zip(direct, ws)])
                t["rps_vs_direct"] = summarize([b["rps"] / a["rps"] for a, b in zip(direct, ws)])
            if litellm and name.startswith("taskproxy"):
                t["rps_vs_litellm"] = summarize([b["rps"] / a["rps"] for a, b in zip(litellm, ws)])
            row["targets"][name] = t
        rows.append(row)
    return rows


def check_recorded(proxy: Taskproxy, served: int) -> dict[str, Any]:
    """The proxy's own count of recorded requests against the successful answers it gave."""
    deadline = time.monotonic() + 30
    while (recorded := proxy.recorded_requests()) < served and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    recorded = proxy.recorded_requests()
    print(f"{proxy.name}: served {served}, recorded {recorded}", flush=True)
    return {"served_ok": served, "recorded": recorded, "lost": served - recorded, "exact": recorded == served}


def memory_runs(proxy: Served, requests: int) -> dict[str, Any]:
    """Two runs of `requests` (3/4 non-streaming, 1/4 streams, concurrency 32): RSS before and after each."""
    before = memory_mib(proxy.pid)
    runs = []
    for _ in range(2):
        started = time.perf_counter()
        answered = errors = 0
        for stream, share in ((False, 0.75), (True, 0.25)):
            r = load(proxy, stream=stream, concurrency=32, duration=3600, warmup=0, max_requests=int(requests * share))
            answered += r["count"]
            errors += r["errors"]
        time.sleep(1.0)  # the writer's last flush
        runs.append({"requests": answered, "errors": errors, "seconds": round(time.perf_counter() - started, 1), **memory_mib(proxy.pid)})
        print(f"{proxy.name}: memory after {answered} more requests: {runs[-1]}", flush=True)
    return {"target": proxy.name, "requests_per_run": requests, "before": before, "runs": runs,
            "growth_second_run_mib": round(runs[1]["VmRSS"] - runs[0]["VmRSS"], 1)}  # fmt: skip


def wait_quiet(pid: int, timeout: float = 600.0) -> None:
    """Until the process uses under 10% of a CPU over a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - before < 0.1:
            return


def count_instructions(folder: Path, proxies: list[Served], quick: bool) -> dict[str, Any]:
    """Each proxy restarted under callgrind; per scenario a warm-up, then a counted window of N requests."""
    out: dict[str, Any] = {"method": "valgrind --tool=callgrind (user-space instructions, all threads of the server process)"}
    for proxy in proxies:
        heavy = proxy.name == "litellm"  # ~40 M instructions a request: ~0.5 s each under valgrind
        sizes = {(False, 1): 30, (False, 32): 64, (True, 1): 20, (True, 32): 64} if heavy else \
                {(False, 1): 300, (False, 32): 640, (True, 1): 200, (True, 32): 320}  # fmt: skip
        if quick:
            sizes = {k: max(v // 3, 10) for k, v in sizes.items()}
        counter = Callgrind(folder, proxy.name)
        if isinstance(proxy, Taskproxy):
            proxy.configure(slowed_down=True)
        started = time.perf_counter()
        proxy.start(wrapper=counter.wrapper(), timeout=900)
        load(proxy, stream=False, concurrency=1, duration=3600, warmup=0, max_requests=3, timeout=600)
        wait_quiet(proxy.pid)  # start-up work (tiktoken's encodings, the first garbage collection) is not a request's
        counter.attach(proxy.pid)
        per: dict[str, Any] = {"startup_under_valgrind_seconds": round(time.perf_counter() - started, 1)}
        try:
            for (stream, conc), n in sizes.items():
                load(proxy, stream=stream, concurrency=conc, duration=3600, warmup=0, max_requests=min(n, 2 * conc + 5), timeout=600)
                answered: dict[str, Any] = {}

                def window() -> None:
                    answered.update(load(proxy, stream=stream, concurrency=conc, duration=3600, warmup=0, max_requests=n, timeout=600))

                total = counter.count(window, tail_seconds=1.5)  # the writer's last flush included
                key = f"{'stream' if stream else 'json'}_c{conc}"
                per[key] = {"requests": answered["count"], "errors": answered["errors"], "instructions": total,
                            "per_request": round(total / max(answered["count"], 1))}  # fmt: skip
                print(f"{proxy.name}: {key}: {per[key]['per_request'] / 1e6:.2f} M instructions per request ({answered['count']} requests)", flush=True)
        finally:
            proxy.stop()
        out[proxy.name] = per
    return out


if __name__ == "__main__":
    sys.exit(main())
