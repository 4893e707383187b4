"""What a load leaves resident in one `taskproxy serve` replica (docs/scale-runs.md, "Memory").

One replica, configured as `bench/scale.py` configures them, on an empty schema of its own
(`load_leftover`) in the benchmark database: 300 items, 1,000 requests spread over them, 12 s idle,
then its resident memory; then 10 s of load at concurrency 1 and 10 s at 32 on one key and item,
60 s idle (the upstream connections' keep-alive ends, the idle check collects and trims), and its
resident memory again. Prints both and their difference, as JSON.

    python bench/load_leftover.py [--postgres URL] [--load-seconds 10]

To compare two versions of the code, run it once per version with PYTHONPATH pointing at the
other version's `src` (the replica inherits the environment).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).parent))
import scale
from seed_org import schema_url

from taskproxy.storage.db import make_engine, upgrade_schema

SCHEMA = "load_leftover"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=scale.DEFAULT_POSTGRES)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)

    admin = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    admin.dispose()
    url = schema_url(args.postgres, SCHEMA)
    upgrade_schema(make_engine(url))
    folder = scale.BENCH / "results" / "load-leftover"
    folder.mkdir(parents=True, exist_ok=True)
    fake = scale.FakeProvider(folder)
    fake.start()
    try:
        with scale.replicas_on(folder, fake.url, url, 1, "leftover") as (replica,):
            _, key = replica.new_key("load", "team-1")
            for n in range(300):
                reply = httpx.post(f"{replica.url}/api/work-items", json={"id": f"P-{n}"}, headers=replica.admin(), timeout=30)
                reply.raise_for_status()
            for n in range(1000):
                scale.ask(replica.url, key, f"P-{n % 300}", expect=200)
            time.sleep(12)
            before = scale.memory_mib(replica.proc.pid)
            load = {c: scale.latency(replica, key, "P-1", c, args.load_seconds) for c in (1, 32)}
            time.sleep(60)
            after = scale.memory_mib(replica.proc.pid)
    finally:
        fake.stop()
    print(json.dumps({"before_mib": before, "load": load, "after_mib": after, "left_mib": round(after["rss"] - before["rss"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
