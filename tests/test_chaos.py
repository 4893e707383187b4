"""A bad day, bounded in time: two `taskproxy serve` replicas on one PostgreSQL under concurrent load from
several keys, hostile ids mixed in, the database cut for seconds while the spool sits on a full filesystem,
a stream cut by its client and one by its provider, one replica sent SIGTERM mid-load. Afterwards, per
work item and per token, what is recorded is what the clients were answered, and nothing is set aside."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from sqlalchemy import func, select

from conftest import postgres_schema
from serve_helpers import fake_upstream, run_cli, start_server, write_config
from taskproxy.storage.db import make_engine
from taskproxy.storage.models import UsageEvent
from tcp_relay import TcpRelay

pytestmark = [pytest.mark.serve, pytest.mark.postgres]

ITEMS = [f"CHAOS-{n}" for n in range(6)]
HOSTILE = ["ﬃ" * 70 + "-1", "PROJ-1\u202e", "x" * 201]
REQUESTS = 360
SPREAD_SECONDS = 7.0


@pytest.fixture
def spool_folder(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """The spool's folder: a 64 KiB tmpfs that the outage fills (as root), else a plain folder."""
    folder = tmp_path / "spool"
    folder.mkdir()
    tiny = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield folder, tiny
    finally:
        if tiny:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_bad_day_loses_and_misstates_nothing(tmp_path: Path, spool_folder: tuple[Path, bool]) -> None:
    folder, tiny_disk = spool_folder
    with postgres_schema() as direct_url, fake_upstream() as upstream:
        relay = TcpRelay(urlsplit(direct_url).port or 5432)
        relayed_url = direct_url.replace(f":{relay.target[1]}/", f":{relay.port}/", 1)
        v1 = f"{upstream.url}/v1"
        models = [{"name": "gpt-4o-mini", "base_url": v1}, {"name": "hang", "base_url": v1, "upstream_model": "fake-hang"},
                  {"name": "cut", "base_url": v1, "upstream_model": "fake-cut"}]  # fmt: skip
        config = write_config(tmp_path, upstream.url, models=models, database_url=relayed_url,
                              recording={"spool_path": str(folder / "spool.jsonl"), "flush_interval_seconds": 0.1})  # fmt: skip
        assert run_cli("db", "upgrade", config=config).returncode == 0
        first, second = start_server(config, tmp_path / "a.log"), start_server(config, tmp_path / "b.log")
        try:
            keys = [first.new_key(owner=f"dev-{n}", team="platform") for n in range(3)]
            clients = {(r, k): server.openai(key) for r, server in enumerate((first, second)) for k, key in enumerate(keys)}
            for (_, _), client in clients.items():  # every replica knows every key before the database goes away
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "warm"}], extra_headers={"X-Work-Item": "WARM-1"})

            answered: dict[str, list[int]] = defaultdict(list)  # item -> total tokens of each answer a client got
            refused: list[int] = []
            readiness: list[tuple[int, str]] = []
            lock = threading.Lock()
            terminated = threading.Event()
            started = time.monotonic()

            def one(n: int) -> None:
                time.sleep(max(0.0, started + n * SPREAD_SECONDS / REQUESTS - time.monotonic()))
                replica = 1 if terminated.is_set() else n % 2
                client = clients[(replica, n % len(keys))]
                if n % 12 == 5:  # a hostile id, refused before anything goes upstream
                    with pytest.raises(openai.BadRequestError):
                        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                                       metadata={"work_item": HOSTILE[n % len(HOSTILE)]})  # fmt: skip
                    with lock:
                        refused.append(n)
                    return
                item = ITEMS[n % len(ITEMS)]
                try:
                    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {n}"}],
                                                           max_tokens=n % 4 + 1, extra_headers={"X-Work-Item": item})  # fmt: skip
                except openai.APIConnectionError:  # sent to the replica that is stopping: not answered, so not counted
                    return
                with lock:
                    answered[item].append(reply.usage.total_tokens)

            def chaos() -> None:
                time.sleep(1.0)
                relay.cut()
                deadline = time.monotonic() + 3.5
                while time.monotonic() < deadline:
                    response = httpx.get(f"{first.url}/readyz", timeout=5)
                    with lock:
                        readiness.append((response.status_code, response.text))
                    time.sleep(0.2)
                relay.restore()
                time.sleep(1.0)
                terminated.set()
                first.sigterm()  # mid-load: it finishes what it has, drains its writer and spool, and exits

            def streams() -> None:
                time.sleep(2.0)  # during the outage
                client = clients[(1, 0)]
                with client.chat.completions.create(model="hang", messages=[{"role": "user", "content": "cut by me"}], stream=True,
                                                    extra_headers={"X-Work-Item": "CHAOS-901"}) as stream:  # fmt: skip
                    next(iter(stream))  # one chunk, then the client hangs up
                with pytest.raises(openai.APIError):
                    for _ in client.chat.completions.create(model="cut", messages=[{"role": "user", "content": "cut by them"}], stream=True,
                                                            extra_headers={"X-Work-Item": "CHAOS-902"}):  # fmt: skip
                        pass

            helpers = [threading.Thread(target=chaos), threading.Thread(target=streams)]
            for helper in helpers:
                helper.start()
            with ThreadPoolExecutor(max_workers=10) as pool:
                list(pool.map(one, range(REQUESTS)))
            for helper in helpers:
                helper.join(30)
            assert first.process.wait(30) in (0, -15)  # the SIGTERM'd replica drained and exited
            second.sigterm()
            assert second.process.wait(30) in (0, -15)
        finally:
            first.stop()
            second.stop()

        engine = make_engine(direct_url)
        e = UsageEvent.__table__.c
        with engine.connect() as connection:
            ok = connection.execute(
                select(e.work_item, func.count(), func.sum(e.total_tokens), func.count(func.distinct(e.id)))
                .where(e.work_item.in_(ITEMS), e.status == 200, e.error.is_(None)).group_by(e.work_item)
            ).all()  # fmt: skip
            other = connection.execute(select(e.work_item, e.status, e.error).where(e.work_item.not_in([*ITEMS, "WARM-1"]))).all()
            stray = connection.execute(select(func.count()).where(e.work_item.in_(ITEMS), (e.status != 200) | e.error.is_not(None))).scalar_one()
        engine.dispose()
        recorded = {item: (count, int(tokens), distinct) for item, count, tokens, distinct in ok}
        expected = {item: (len(tokens), sum(tokens), len(tokens)) for item, tokens in answered.items()}
        assert recorded == expected  # per work item: every answered request once, with the tokens the client was told
        assert stray == 0  # and nothing else on those items
        assert sorted((item, error) for item, _, error in other) == [("CHAOS-901", "client_disconnected"), ("CHAOS-902", "upstream_error")]
        assert not list(folder.glob("*.rejected.jsonl"))  # nothing set aside
        assert len(refused) == sum(1 for n in range(REQUESTS) if n % 12 == 5)
        statuses = [status for status, _ in readiness]
        if tiny_disk:  # the outage filled the spool's disk: readiness said so while usage was held in memory
            assert 503 in statuses and any("neither written nor spooled" in text for _, text in readiness), readiness
        print(f"\n{sum(len(t) for t in answered.values())} answered, {len(refused)} hostile ids refused, readiness during the outage "
              f"{sorted(set(statuses))}, spool on a {'64 KiB tmpfs' if tiny_disk else 'plain folder'}: recorded exactly")
