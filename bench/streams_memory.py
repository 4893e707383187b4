"""Memory per request in flight: `python bench/streams_memory.py [--streams 500] [--megabytes 1]`.

One `taskproxy serve` worker (SQLite, recording on) relays N concurrent streams of M MiB each, paced by
the fake provider (its own process: 64 KiB pieces, 50 ms apart) so that all of them are in flight at
once. A client in its own process (aiohttp) opens them all and reads each to its end. The proxy's
resident memory is sampled every 20 ms. Two rounds: the second shows whether anything stays behind.

Reported: resident memory before, its peak during each round (VmHWM is not used: it would keep the
first round's peak), after each round once the answers are recorded; the answers recorded against the
answers given. Targets (issue 13): peak under 300 MiB, and no growth from one round to the next.
Writes bench/results/streams_memory.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import WORK_ITEM, FakeProvider, Taskproxy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_TARGET_MIB = 300
GROWTH_TARGET_MIB = 5.0


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def client(url: str, key: str, streams: int) -> dict:
    import aiohttp

    body = {"model": "flood", "messages": [{"role": "user", "content": "stream"}], "stream": True}
    headers = {"authorization": f"Bearer {key}", "X-Work-Item": WORK_ITEM}
    sizes: list[int] = []
    failures: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                size = 0
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                sizes.append(size) if response.status == 200 else failures.append(str(response.status))
        except Exception as exc:  # counted, not raised: the report says how many failed
            failures.append(exc.__class__.__name__)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(streams)))
        took = time.perf_counter() - started
    return {"answered": len(sizes), "failed": failures, "mib_each": statistics.mean(sizes) / 2**20 if sizes else 0, "seconds": round(took, 2)}


def round_of(proxy: Taskproxy, streams: int) -> dict:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(resident_mib(proxy.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = subprocess.run([sys.executable, __file__, "--client", proxy.url, proxy.key, str(streams)], capture_output=True, text=True, check=True)
    done.set()
    sampler.join()
    result = json.loads(out.stdout)
    return {**result, "peak_mib": round(max(samples), 1)}


def settled_mib(proxy: Taskproxy, expected: int, timeout: float = 60.0) -> tuple[float, int]:
    """Resident memory once every answer is recorded and the process has been idle a few seconds."""
    deadline = time.monotonic() + timeout
    recorded = proxy.recorded_requests()
    while recorded < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        recorded = proxy.recorded_requests()
    time.sleep(3)
    return round(resident_mib(proxy.pid), 1), recorded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--megabytes", type=int, default=1)
    parser.add_argument("--piece-kib", type=int, default=16, help="the provider sends each stream in pieces of this size ...")
    parser.add_argument("--delay", type=float, default=0.05, help="... this many seconds apart")
    parser.add_argument("--client", nargs=3, metavar=("URL", "KEY", "STREAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        url, key, streams = args.client
        print(json.dumps(asyncio.run(client(url, key, int(streams)))))
        return 0

    with tempfile.TemporaryDirectory(prefix="taskproxy-streams-") as tmp:
        folder = Path(tmp)
        fake = FakeProvider(folder, "--flood-bytes", str(args.megabytes * 2**20), "--flood-piece-bytes", str(args.piece_kib * 1024), "--flood-delay", str(args.delay))
        fake.start()
        proxy = Taskproxy(folder, fake.url, f"sqlite:///{folder / 'streams.db'}", "taskproxy",
                          extra_models=({"name": "flood", "upstream_model": "fake-flood", "provider": "openai"},))  # fmt: skip
        try:
            proxy.start()
            proxy.create_key()
            httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "warm"}]},
                       headers=proxy.headers(), timeout=30)  # fmt: skip
            before, _ = settled_mib(proxy, 1)
            rounds = []
            for n in (1, 2):
                result = round_of(proxy, args.streams)
                after, recorded = settled_mib(proxy, 1 + n * args.streams)
                rounds.append({**result, "after_mib": after, "recorded": recorded - 1 - (n - 1) * args.streams})
                print(f"round {n}: {result['answered']} of {args.streams} streams of {result['mib_each']:.2f} MiB in {result['seconds']} s, "
                      f"peak {result['peak_mib']} MiB, after {after} MiB, recorded {rounds[-1]['recorded']}")
        finally:
            proxy.stop()
            fake.stop()
    growth = rounds[1]["after_mib"] - rounds[0]["after_mib"]
    peak = max(r["peak_mib"] for r in rounds)
    report = {
        "streams": args.streams, "megabytes_each": args.megabytes, "before_mib": before, "rounds": rounds,
        "peak_mib": peak, "growth_mib": round(growth, 1),
        "targets": {"peak_under_300_mib": peak < PEAK_TARGET_MIB, "no_growth": growth < GROWTH_TARGET_MIB,
                    "all_answered_and_recorded": all(r["answered"] == r["recorded"] == args.streams for r in rounds)},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streams_memory.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# {args.streams} concurrent streams of {args.megabytes} MiB through one worker",
        "",
        "| | resident MiB |", "|---|---:|", f"| before | {before} |",
        *(f"| round {n} peak / after | {r['peak_mib']} / {r['after_mib']} |" for n, r in enumerate(rounds, 1)),
        "", f"Targets: {json.dumps(report['targets'])}",
    ]  # fmt: skip
    (RESULTS / "streams_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(report["targets"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
