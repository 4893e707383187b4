"""The taskproxy benchmark, one command: `python bench/run.py [--quick]`.

Starts the fake provider (bench/fake_server.py) and a real `taskproxy serve` (recording on, SQLite
in a temporary folder) as their own processes, then measures, alternating in one run, the same
requests sent directly to the fake provider and through the proxy: non-streaming and streaming
(20 chunks), concurrency 1 and 32, a few repetitions each. Reports medians with min–max over the
repetitions, the latency the proxy adds, its CPU seconds per request (/proc/<pid>/stat), its
startup time and resident memory, and checks through the admin API that every request it served
was recorded. Writes bench/results/latest.json and latest.md and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import DEFAULT_BODY, run_load  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
WORK_ITEM = "BENCH-1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> float | None:
    """SIGTERM, then SIGKILL after `timeout`; returns how long a clean exit took (None if killed)."""
    if proc.poll() is not None:
        return 0.0
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return time.perf_counter() - start
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


class Proxy:
    def __init__(self, folder: Path, provider_url: str, admin_key: str) -> None:
        self.folder = folder
        self.config = folder / "taskproxy.yaml"
        self.config.write_text(json.dumps({  # JSON is YAML
            "database_url": f"sqlite:///{folder / 'bench.db'}",
            "models": [{"name": "gpt-4o-mini", "provider": "openai", "base_url": f"{provider_url}/v1"}],
            "recording": {"spool_path": str(folder / "spool.jsonl")},
        }, indent=2))
        self.env = {**os.environ, "TASKPROXY_ADMIN_KEY": admin_key}
        self.env.pop("TASKPROXY_DATABASE_URL", None)
        self.env.pop("TASKPROXY_CONFIG", None)
        self.admin_key = admin_key
        self.proc: subprocess.Popen | None = None

    def create_key(self) -> str:
        out = subprocess.run([sys.executable, "-m", "taskproxy", "keys", "create", "--owner", "bench", "--team", "bench",
                              "--json", "--config", str(self.config)], env=self.env, check=True, capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)["key"]

    def start(self) -> float:
        """Spawn `taskproxy serve`; returns seconds from spawn to /healthz 200."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.folder / f"proxy-{self.port}.log", "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "taskproxy", "serve", "--config", str(self.config), "--port", str(self.port),
                                      "--log-level", "warning"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(f"{self.url}/healthz", self.proc)
        return time.perf_counter() - start

    def stop(self) -> float | None:
        took = stop(self.proc) if self.proc else None
        self.log.close()
        return took

    def recorded_requests(self) -> int:
        rows = httpx.get(f"{self.url}/api/usage", params={"group_by": "work_item"},
                         headers={"authorization": f"Bearer {self.admin_key}"}, timeout=30).json()["groups"]
        return sum(int(r.get("requests") or 0) for r in rows if r.get("work_item") == WORK_ITEM)


def summarize(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def fmt(s: dict, digits: int = 2, unit: str = "") -> str:
    if s["median"] is None:
        return "–"
    f = lambda v: f"{v:.{digits}f}"  # noqa: E731
    if s["min"] == s["max"]:
        return f"{f(s['median'])}{unit}"
    return f"{f(s['median'])}{unit} ({f(s['min'])}–{f(s['max'])})"


def main() -> int:
    parser = argparse.ArgumentParser(description="taskproxy benchmark: direct vs through the proxy, against a fake provider")
    parser.add_argument("--quick", action="store_true", help="shorter windows, 2 repetitions (about a minute)")
    args = parser.parse_args()
    duration, warmup, reps, startups = (1.5, 0.3, 2, 1) if args.quick else (4.0, 0.5, 3, 3)
    max_requests = 50_000
    scenarios = [(stream, conc) for stream in (False, True) for conc in (1, 32)]

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    began = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="taskproxy-bench-"))
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    fake_log = open(folder / "fake.log", "w")
    fake = subprocess.Popen([sys.executable, str(BENCH / "fake_server.py"), "--port", str(fake_port)], stdout=fake_log, stderr=subprocess.STDOUT)
    proxy = Proxy(folder, fake_url, "tp-bench-admin-" + secrets.token_urlsafe(16))
    results: dict[str, Any] = {}
    try:
        wait_healthy_fake(fake_url, fake)
        key = proxy.create_key()
        startup_times = []
        for _ in range(startups - 1):  # throwaway starts, for the startup figure only
            startup_times.append(proxy.start())
            proxy.stop()
        startup_times.append(proxy.start())
        pid = proxy.proc.pid
        print(f"fake provider on {fake_url} (pid {fake.pid}); taskproxy on {proxy.url} (pid {pid}); SQLite in {folder}", flush=True)
        print(f"{'quick' if args.quick else 'full'} run: {reps} repetitions × {len(scenarios)} scenarios × 2 targets, {duration}s windows", flush=True)

        targets = {
            "direct": (f"{fake_url}/v1/chat/completions", {"authorization": "Bearer sk-fake"}),
            "proxy": (f"{proxy.url}/v1/chat/completions", {"authorization": f"Bearer {key}", "X-Work-Item": WORK_ITEM}),
        }
        windows: list[dict] = []
        proxy_ok = 0
        for rep in range(reps):
            for stream, conc in scenarios:
                order = ["direct", "proxy"] if rep % 2 == 0 else ["proxy", "direct"]
                for target in order:
                    url, headers = targets[target]
                    mark = lambda: {"proxy": cpu_seconds(pid), "fake": cpu_seconds(fake.pid), "loadgen": cpu_seconds(os.getpid()),  # noqa: E731
                                    "wall": time.perf_counter()}
                    r = asyncio.run(run_load(url, concurrency=conc, duration=duration, warmup=warmup, max_requests=max_requests,
                                             stream=stream, headers=headers, body=DEFAULT_BODY, mark=mark))
                    a, b = r.pop("mark_start"), r.pop("mark_end")
                    n = max(r["count"], 1)
                    for proc_name in ("proxy", "fake", "loadgen"):
                        r[f"{proc_name}_cpu_ms_per_req"] = round((b[proc_name] - a[proc_name]) * 1000 / n, 4)
                        r[f"{proc_name}_cpu_util"] = round((b[proc_name] - a[proc_name]) / (b["wall"] - a["wall"]), 3)
                    r.update(target=target, rep=rep)
                    if target == "proxy":
                        proxy_ok += r["total_ok"]
                    windows.append(r)
                    label = f"{'stream' if stream else 'json'} c={conc:<2} {target:<6}"
                    print(f"  rep {rep + 1} {label} {r['count']:>6} req {r['errors']} err {r['rps']:>8.1f} req/s  p50 {r['p50_ms']:.2f} ms  "
                          f"p99 {r['p99_ms']:.2f} ms  proxy cpu {r['proxy_cpu_ms_per_req']:.3f} ms/req", flush=True)

        # Usage must not be lost under load: the proxy's own count against what it answered.
        deadline = time.monotonic() + 15
        while (recorded := proxy.recorded_requests()) < proxy_ok and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        recorded = proxy.recorded_requests()
        memory = memory_kib(pid)
        proxy_cpu_total = cpu_seconds(pid)
        shutdown = proxy.stop()
        results = build_results(args.quick, duration, warmup, reps, windows, scenarios)
        results.update(
            startup_seconds=summarize(startup_times), startup_samples=[round(s, 3) for s in startup_times],
            proxy_memory_kib_after_run=memory, proxy_cpu_seconds_total=round(proxy_cpu_total, 2),
            recording={"served_ok": proxy_ok, "recorded": recorded, "lost": proxy_ok - recorded, "exact": recorded == proxy_ok},
            shutdown_seconds=None if shutdown is None else round(shutdown, 3),
            instructions_per_request="not measured: `perf stat -e instructions:u` reports <not supported> on this machine (no hardware counters in the VM)",
            machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                     "note": "load generator, fake provider and proxy share these CPUs"},
            total_seconds=round(time.perf_counter() - began, 1),
        )
    finally:
        if proxy.proc and proxy.proc.poll() is None:
            proxy.stop()
        stop(fake)
        fake_log.close()
    ok = results["recording"]["exact"] and all(w["errors"] == 0 for w in results["windows"])
    if ok:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"kept {folder} for inspection (logs, database)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (RESULTS / "latest.md").write_text(md)
    print("\n" + md)
    return 0 if ok else 1


def wait_healthy_fake(url: str, proc: subprocess.Popen) -> None:
    # The fake has no /healthz; any HTTP answer means it listens.
    start = time.perf_counter()
    while time.perf_counter() - start < 30:
        if proc.poll() is not None:
            raise RuntimeError("fake provider exited")
        try:
            httpx.get(f"{url}/_fake/requests", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.02)
    raise RuntimeError("fake provider did not start")


def build_results(quick: bool, duration: float, warmup: float, reps: int, windows: list[dict], scenarios: list) -> dict:
    rows = []
    for stream, conc in scenarios:
        mine = lambda t: sorted((w for w in windows if w["stream"] == stream and w["concurrency"] == conc and w["target"] == t), key=lambda w: w["rep"])  # noqa: E731
        d, p = mine("direct"), mine("proxy")
        row: dict[str, Any] = {"mode": "stream (20 chunks)" if stream else "non-streaming", "stream": stream, "concurrency": conc}
        for name, ws in (("direct", d), ("proxy", p)):
            for metric in ("rps", "p50_ms", "p90_ms", "p99_ms", "ttfb_p50_ms"):
                row[f"{name}_{metric}"] = summarize([w[metric] for w in ws])
            row[f"{name}_count"] = sum(w["count"] for w in ws)
            row[f"{name}_errors"] = sum(w["errors"] for w in ws)
        # Paired by repetition (each pair measured back to back).
        row["added_p50_ms"] = summarize([b["p50_ms"] - a["p50_ms"] for a, b in zip(d, p)])
        row["added_p99_ms"] = summarize([b["p99_ms"] - a["p99_ms"] for a, b in zip(d, p)])
        row["rps_ratio"] = summarize([b["rps"] / a["rps"] for a, b in zip(d, p)])
        row["p50_ratio"] = summarize([b["p50_ms"] / a["p50_ms"] for a, b in zip(d, p)])
        row["proxy_cpu_ms_per_req"] = summarize([w["proxy_cpu_ms_per_req"] for w in p])
        row["proxy_cpu_util"] = summarize([w["proxy_cpu_util"] for w in p])
        row["fake_cpu_ms_per_req_direct"] = summarize([w["fake_cpu_ms_per_req"] for w in d])
        row["loadgen_cpu_ms_per_req_direct"] = summarize([w["loadgen_cpu_ms_per_req"] for w in d])
        rows.append(row)
    return {"quick": quick, "window_seconds": duration, "warmup_seconds": warmup, "repetitions": reps, "rows": rows, "windows": windows}


def markdown(r: dict) -> str:
    lines = [
        f"taskproxy benchmark ({'quick' if r['quick'] else 'full'}: {r['repetitions']} repetitions of {r['window_seconds']} s windows, "
        f"alternating direct/proxy; median (min–max) over repetitions). Machine: {r['machine']['cpus']} CPUs shared by the load "
        "generator, the fake provider and the proxy; loopback; SQLite recording on.",
        "",
        "| mode | conc | direct req/s | proxy req/s | proxy/direct | direct p50 / p99 ms | proxy p50 / p99 ms | added p50 ms | added p99 ms | proxy TTFB p50 ms | proxy CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['mode']} | {row['concurrency']} | {fmt(row['direct_rps'], 0)} | {fmt(row['proxy_rps'], 0)} | {fmt(row['rps_ratio'], 2)} "
            f"| {fmt(row['direct_p50_ms'])} / {fmt(row['direct_p99_ms'])} | {fmt(row['proxy_p50_ms'])} / {fmt(row['proxy_p99_ms'])} "
            f"| {fmt(row['added_p50_ms'])} | {fmt(row['added_p99_ms'])} | {fmt(row['proxy_ttfb_p50_ms'])} | {fmt(row['proxy_cpu_ms_per_req'], 3)} |"
        )
    rec, mem = r["recording"], r["proxy_memory_kib_after_run"]
    errors = sum(w["errors"] for w in r["windows"])
    lines += [
        "",
        f"- proxy startup (spawn → /healthz 200): {fmt(r['startup_seconds'], 2, ' s')} over {len(r['startup_samples'])} start(s)",
        f"- proxy resident memory after the run: VmRSS {mem.get('VmRSS', 0) / 1024:.1f} MiB (peak VmHWM {mem.get('VmHWM', 0) / 1024:.1f} MiB); "
        f"{rec['served_ok']} requests served through it in total (warm-up included)",
        f"- recording under load: served {rec['served_ok']}, recorded {rec['recorded']} → {'exact' if rec['exact'] else 'MISMATCH (' + str(rec['lost']) + ' lost)'}",
        f"- errors in measured windows: {errors}; clean shutdown took {r['shutdown_seconds']} s",
        f"- instructions per request: {r['instructions_per_request']}",
        f"- total run time: {r['total_seconds']} s",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
