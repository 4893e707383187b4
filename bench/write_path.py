"""The writer's database work, alone: `python bench/write_path.py [--rows N] [--batch B] [--postgres URL]`.

Writes N usage events shaped like the proxy's (`Exchange.to_record()` rows) through
`repo.write_batch` in batches of B (the writer's default 500), on a fresh SQLite file and on a fresh
PostgreSQL schema (created and dropped here), and reports rows per second and the CPU seconds this
process spent per 10,000 rows (the writer thread's cost inside the proxy); for PostgreSQL also the
server backend's CPU (/proc/<backend pid>/stat). Each variant runs --repeat times on empty tables;
the median is reported. `--variant` compares ways of writing (see VARIANTS).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from taskproxy.ids import time_ordered_id
from taskproxy.storage import repo
from taskproxy.storage.db import make_engine, upgrade_schema

DEFAULT_POSTGRES = os.environ.get("TASKPROXY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def make_rows(count: int, rng: random.Random, keys: int = 50, start: datetime = datetime(2026, 11, 1, 9, 30), ids: str = "time") -> list[dict]:
    """Events as the proxy records them under load: `keys` people at work at once (each on one item, mostly
    with one model), 20 requests a second between them from `start`, four models, some unpriced and failed.
    `ids`: "time" as the proxy makes them (taskproxy/ids.py), "random" (uuid4, as releases before 2026-12-04)."""
    models = ["gpt-4o-mini", "claude-sonnet", "gpt-4.1", "local-llama"]
    rows = []
    for n in range(count):
        key = rng.randrange(keys)
        prompt, completion = rng.randint(50, 4000), rng.randint(10, 1500)
        model = models[key % 4] if rng.random() < 0.9 else rng.choice(models)
        ts = start + timedelta(seconds=n / 20, microseconds=rng.randrange(10**6))
        rows.append({
            "id": time_ordered_id(ts) if ids == "time" else uuid.uuid4().hex, "ts": ts,
            "key_id": f"key{key:05d}", "owner": f"person-{key}", "team": None if key % 17 == 0 else f"team-{key % 40}",
            "work_item": f"PROJ-{(key * 7 + n // 5000) % 900}", "attribution_source": "header", "route": "/v1/chat/completions",
            "model": model, "upstream_model": model, "provider": "openai", "status": 200 if rng.random() > 0.03 else 500,
            "error": None, "attempt": 1, "stream": rng.random() < 0.5, "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0,
            "est_prompt_tokens": prompt, "usage_source": "provider", "cost_nanos": None if model == "local-llama" else prompt * 150 + completion * 600,
            "latency_ms": round(rng.uniform(50, 900), 3), "ttfb_ms": round(rng.uniform(20, 200), 3), "prompt_hash": uuid.uuid4().hex,
            "user_agent": "openai-python/1.0", "prompt_text": None, "completion_text": None,
        })  # fmt: skip
    return rows


def write_all(engine: Engine, rows: list[dict], batch: int, write: Callable[..., None]) -> None:
    for start in range(0, len(rows), batch):
        write(engine, events=rows[start : start + batch], rejections=[], new_items=[])


def backend_pid(engine: Engine) -> int | None:
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def measure(engine: Engine, rows: list[dict], batch: int, write: Callable[..., None]) -> dict[str, float]:
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM usage_events"))
        connection.execute(text("DELETE FROM usage_hourly"))
        connection.execute(text("DELETE FROM usage_daily"))
        connection.execute(text("DELETE FROM usage_key_daily"))
        connection.execute(text("DELETE FROM usage_team_daily"))
        connection.execute(text("DELETE FROM usage_item_totals"))
    server = backend_pid(engine)  # one thread: the pool holds one connection, every batch goes through this backend
    server_before = cpu_seconds(server) if server else 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    write_all(engine, rows, batch, write)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per = 10_000 / len(rows)
    found = {"rows_per_s": len(rows) / wall, "cpu_s_per_10k": cpu * per, "wall_s_per_10k": wall * per}
    if server:
        found["server_cpu_s_per_10k"] = (cpu_seconds(server) - server_before) * per
    return found


def events_only(engine: Engine, *, events: list[dict], **_: object) -> None:
    """What write_batch did before the rollups (before commit 3813a47): the events insert alone, as SQLAlchemy executemany of dicts."""
    from taskproxy.storage.models import UsageEvent

    with engine.begin() as connection:
        connection.execute(repo.insert_ignoring_duplicates(engine.dialect.name, UsageEvent.__table__), events)


def events_only_bulk(engine: Engine, *, events: list[dict], **_: object) -> None:
    """The events insert as write_batch now does it (storage/bulk.py), without the rollup: its share of the cost."""
    from taskproxy.storage import bulk
    from taskproxy.storage.models import UsageEvent

    with engine.begin() as connection:
        bulk.insert_new(connection, UsageEvent.__table__, events)


VARIANTS: dict[str, Callable[..., None]] = {
    "events_only_sqlalchemy": events_only,
    "events_only_bulk": events_only_bulk,
    "write_batch": repo.write_batch,
}


def run(url: str, rows: list[dict], batch: int, repeat: int, variants: list[str]) -> dict[str, dict[str, float]]:
    engine = make_engine(url)
    upgrade_schema(engine)
    write_all(engine, rows[: batch * 2], batch, repo.write_batch)  # warm-up: connections, statement caches
    results = {}
    for name in variants:
        runs = [measure(engine, rows, batch, VARIANTS[name]) for _ in range(repeat)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    engine.dispose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keys", type=int, default=50, help="people at work at once (distinct rollup rows per batch grow with it)")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server to use; '' to skip PostgreSQL")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    args = parser.parse_args(argv)
    rows = make_rows(args.rows, random.Random(7), args.keys)
    variants = args.variant or list(VARIANTS)

    table = [f"{args.rows} rows in batches of {args.batch} from {args.keys} keys at once, median of {args.repeat}", "",
             "| database | variant | rows/s | client CPU s / 10k rows | server CPU s / 10k rows |", "|---|---|---:|---:|---:|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for name, result in run(f"sqlite:///{folder}/bench.db", rows, args.batch, args.repeat, variants).items():
            table.append(f"| SQLite | {name} | {result['rows_per_s']:.0f} | {result['cpu_s_per_10k']:.3f} | (in process) |")
    if args.postgres:
        from sqlalchemy import create_engine

        admin = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://", 1))
        schema = "bench_write_" + uuid.uuid4().hex[:8]
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
        try:
            url = f"{args.postgres}{'&' if '?' in args.postgres else '?'}options=-csearch_path%3D{schema}"
            for name, result in run(url, rows, args.batch, args.repeat, variants).items():
                table.append(f"| PostgreSQL | {name} | {result['rows_per_s']:.0f} | {result['cpu_s_per_10k']:.3f} | {result['server_cpu_s_per_10k']:.3f} |")
        finally:
            with admin.begin() as connection:
                connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
