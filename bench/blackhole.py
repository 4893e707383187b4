"""Requests answered while PostgreSQL has gone silent (a failover, a host powered off): every packet
between the proxy and the database is dropped, so no connection is closed and nothing tells the
proxy they are dead.

    sudo python bench/blackhole.py [--postgres URL] [--clients 16] [--before 5] [--dark 40] [--after 5]

One `taskproxy serve` (open work items, the fake provider) reaches PostgreSQL through a TCP relay on
loopback; `--clients` threads send chat requests without pause, each on a work item of its own; after
`--before` seconds nftables drops every packet to and from the relay's port for `--dark` seconds. The
script prints, for each phase, the requests answered, their latency (p50, p99, max) and statuses, and
at the end whether every answered request was recorded. It needs root and nftables
(`apt-get install nftables`), and a database of its own (default: `taskproxy_bench`, schema
`bench_blackhole`, dropped after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import create_engine, text
from targets import FakeProvider, Taskproxy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tcp_relay import TcpRelay, black_hole_unavailable

SCHEMA = "bench_blackhole"


def summary(latencies: list[tuple[float, int]]) -> dict[str, object]:
    seconds = sorted(latency for latency, _ in latencies)
    if not seconds:
        return {"requests": 0}
    return {"requests": len(seconds), "p50_ms": round(seconds[len(seconds) // 2] * 1000, 1),
            "p99_ms": round(seconds[int(len(seconds) * 0.99)] * 1000, 1), "max_ms": round(seconds[-1] * 1000),
            "statuses": sorted({status for _, status in latencies})}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("TASKPROXY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/taskproxy_bench"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--dark", type=float, default=40.0)
    parser.add_argument("--after", type=float, default=5.0)
    args = parser.parse_args()
    if reason := black_hole_unavailable():
        print(f"cannot drop packets: {reason}", file=sys.stderr)
        return 2
    url = args.postgres.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    parts = urlsplit(args.postgres)
    relay = TcpRelay(parts.port or 5432, parts.hostname or "127.0.0.1")
    relayed = args.postgres.replace(f":{parts.port or 5432}/", f":{relay.port}/", 1) + f"?options=-csearch_path%3D{SCHEMA}"
    folder = Path(tempfile.mkdtemp(prefix="taskproxy-blackhole-"))
    provider = FakeProvider(folder)
    provider.start()
    proxy = Taskproxy(folder, provider.url, relayed, "blackhole")
    subprocess.run([sys.executable, "-m", "taskproxy", "db", "upgrade", "--config", str(proxy.config)], env=proxy.env(), check=True)
    proxy.start()
    proxy.create_key()
    phase, latencies = ["before"], {"before": [], "dark": [], "after": []}
    stop_at = time.monotonic() + args.before + args.dark + args.after
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def client(n: int) -> None:
        headers = {"authorization": f"Bearer {proxy.key}", "X-Work-Item": f"HOLE-{n}"}
        with httpx.Client(base_url=proxy.url, timeout=60) as http:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                status = http.post("/v1/chat/completions", json=body, headers=headers).status_code
                latencies[phase[0]].append((time.monotonic() - started, status))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(args.before)
        phase[0] = "dark"
        with relay.black_hole():
            time.sleep(args.dark)
        phase[0] = "after"
        for thread in threads:
            thread.join()
        answered = sum(1 for phase_latencies in latencies.values() for _, status in phase_latencies if status == 200)
        deadline, recorded = time.monotonic() + 120, 0
        while time.monotonic() < deadline:
            with admin.connect() as connection:
                recorded = int(connection.execute(text(f"SELECT count(*) FROM {SCHEMA}.usage_events")).scalar_one())
            if recorded >= answered:
                break
            time.sleep(0.5)
        print(json.dumps({name: summary(values) for name, values in latencies.items()} | {"answered": answered, "recorded": recorded}, indent=2))
    finally:
        proxy.stop()
        provider.stop()
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
