"""`taskproxy db upgrade` on a database in use: a migration that must lock a table against readers
waits for the sessions reading it, and every new query on that table queues behind its wait. With
`--lock-wait` it gives up instead, rolled back whole, and says why (storage/db.upgrade_schema)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import child_env, write_config
from sqlalchemy import text

from taskproxy.storage.db import _alembic, current_revision, head_revision, make_engine

pytestmark = pytest.mark.postgres


def upgrade(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "taskproxy", "db", "upgrade", "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=child_env(), check=False)


def test_an_upgrade_blocked_by_a_long_reader_gives_up_and_holds_nobody_up(postgres_url: str, tmp_path: Path) -> None:
    from alembic import command

    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        command.upgrade(_alembic(connection), "0015")  # 0016 drops indexes of usage_events: it must lock the table
    config = write_config(tmp_path, "http://127.0.0.1:9", database_url=postgres_url)

    reader = engine.connect()  # a report's long transaction, reading the events
    reader.execute(text("SELECT count(*) FROM usage_events")).scalar_one()
    others: list[float] = []

    def another_reader() -> None:  # a query arriving while the upgrade waits: it queues behind the upgrade
        with engine.connect() as connection:
            deadline = time.monotonic() + 30
            waiting = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND database = (SELECT oid FROM pg_database WHERE "
                           "datname = current_database()) AND relation::regclass::text LIKE 'usage_events%'")  # this schema's (search_path)
            while not connection.execute(waiting).scalar_one():
                assert time.monotonic() < deadline, "the upgrade never waited for a lock"
                connection.rollback()
                time.sleep(0.02)
            connection.rollback()
            started = time.monotonic()
            connection.execute(text("SET statement_timeout = 20000"))
            connection.execute(text("SELECT count(*) FROM usage_events")).scalar_one()
        others.append(time.monotonic() - started)

    thread = threading.Thread(target=another_reader)
    thread.start()
    try:
        started = time.monotonic()
        blocked = upgrade(config, "--lock-wait", "2")
        took = time.monotonic() - started
    finally:
        thread.join(30)
        reader.rollback()
        reader.close()
    assert blocked.returncode == 2, blocked.stderr
    assert "waited more than 2 s for a lock" in blocked.stderr and "rolled back" in blocked.stderr, blocked.stderr
    assert "still at revision 0015" in blocked.stderr and "DROP INDEX" in blocked.stderr, blocked.stderr
    assert took < 15, took
    assert others and 0.5 < others[0] < 2.5, others  # it queued behind the upgrade, for what was left of its wait
    with engine.connect() as connection:
        assert current_revision(connection) == "0015"  # nothing half-done
        indexes = set(connection.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'usage_events'")).scalars())
    assert "ix_usage_events_response_id_new" not in indexes and "ix_usage_events_team_ts" in indexes

    done = upgrade(config)  # the reader gone, it goes through
    assert done.returncode == 0, done.stderr
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    engine.dispose()
