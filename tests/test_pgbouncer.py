"""Behind PgBouncer, which many companies put in front of PostgreSQL: taskproxy's engines connect
through a real PgBouncer. It refuses a connection whose startup packet carries an `options`
parameter (unless told to ignore it), so nothing taskproxy sets per connection may travel there; and
in transaction mode consecutive transactions of one client run on whichever server connection is
free, so nothing may be left on a server connection for later (a prepared statement)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text

from taskproxy.reports.runner import CLIENT_CHECK_MS
from taskproxy.storage.db import make_engine

pytestmark = pytest.mark.postgres

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _pgbouncer(postgres_url: str, pool_mode: str, pool_size: int = 20, *, server_port: int | None = None, settings: str = "") -> Iterator[str]:
    """A PgBouncer on loopback whose database `tp` is the test server's, in the test's own schema
    (PgBouncer refuses the URL's `options`: the schema is set on each server connection it opens).
    `server_port`: reach the server there instead (a relay); `settings`: more lines of pgbouncer.ini."""
    if not os.path.exists(PGBOUNCER):
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed; `bash .ci/run` installs it")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer, or `bash .ci/run`)")
    server = urlsplit(postgres_url)
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    port = _free_port()
    # Not pytest's tmp_path: PgBouncer drops root for another user, who cannot enter root's private folders.
    folder = Path(tempfile.mkdtemp(prefix="tp-pgbouncer-"))
    folder.chmod(0o755)
    (folder / "users.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"tp = host={server.hostname} port={server_port or server.port or 5432} dbname={server.path.lstrip('/')} user=postgres "
        f"connect_query='SET search_path={schema}'\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\npool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n"
        "logfile =\npidfile =\n" + settings
    )
    # PgBouncer will not run as root; the machine's postgres user (or nobody) owns the files it writes.
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command.insert(1, "--user=postgres" if _user_exists("postgres") else "--user=nobody")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stdout.read().decode() if process.stdout else ""
                    pytest.fail(f"pgbouncer did not start: {output}")
                time.sleep(0.05)
        yield f"postgresql://postgres@127.0.0.1:{port}/tp"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def bouncer_url(postgres_url: str) -> Iterator[str]:
    with _pgbouncer(postgres_url, "session") as url:
        yield url


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_a_report_process_engine_connects_through_pgbouncer_and_still_asks_the_server_to_watch_for_its_death(bouncer_url: str) -> None:
    engine = make_engine(bouncer_url, client_check_ms=CLIENT_CHECK_MS)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
            # Session mode keeps the server connection for the client: the SET made at connect holds.
            assert connection.execute(text(
                "SELECT setting FROM pg_settings WHERE name = 'client_connection_check_interval'")).scalar() == str(CLIENT_CHECK_MS)
    finally:
        engine.dispose()



def test_a_server_that_refuses_the_client_check_still_gives_the_report_a_working_connection(postgres_url: str) -> None:
    """PostgreSQL 13 and older do not know `client_connection_check_interval` and refuse the SET: the
    report runs without the safeguard rather than fail. Here a value out of range is refused the same
    way (PostgreSQL 15 on this machine knows the setting)."""
    engine = make_engine(postgres_url, client_check_ms=-1)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
            assert connection.execute(text("SHOW client_connection_check_interval")).scalar_one() == "0"
    finally:
        engine.dispose()


def test_behind_pgbouncer_in_transaction_mode_two_connections_repeat_a_query_on_one_server_connection(postgres_url: str) -> None:
    """psycopg prepares a query on the server once a connection has run it 5 times: through one
    server connection shared in turn, the second client's prepare would find the first's."""
    with _pgbouncer(postgres_url, "transaction", pool_size=1) as url:
        engine = make_engine(url)
        try:
            with engine.connect() as first, engine.connect() as second:
                for n in range(10):
                    for connection in (first, second):
                        assert connection.execute(text("SELECT :n + 1"), {"n": n}).scalar() == n + 1
                        connection.commit()  # the server connection goes back to PgBouncer's pool
        finally:
            engine.dispose()


def test_a_proxy_behind_pgbouncer_in_transaction_mode_records_every_request(postgres_url: str, tmp_path: Path) -> None:
    from serve_helpers import fake_upstream, run_cli, running_server, write_config

    requests, clients = 240, 8
    with _pgbouncer(postgres_url, "transaction", pool_size=2) as url, fake_upstream() as upstream:
        config = write_config(tmp_path, upstream.url, database_url=url,
                              recording={"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 0.05})  # fmt: skip
        assert run_cli("db", "upgrade", config=config).returncode == 0
        with running_server(config, tmp_path / "serve.log") as server:
            keys = [server.new_key(owner=f"person-{n}") for n in range(clients)]
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

            def send(n: int) -> int:
                headers = {"authorization": f"Bearer {keys[n % clients]}", "X-Work-Item": f"POOL-{n % 30}"}
                return server.http.post("/v1/chat/completions", json=body, headers=headers).status_code

            with ThreadPoolExecutor(max_workers=clients) as pool:
                statuses = list(pool.map(send, range(requests)))
            assert statuses == [200] * requests
            engine = make_engine(postgres_url)
            try:
                def recorded() -> int:
                    with engine.connect() as connection:
                        return int(connection.execute(text("SELECT count(*) FROM usage_events")).scalar_one())

                deadline = time.monotonic() + 15
                while recorded() < requests and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert recorded() == requests
            finally:
                engine.dispose()
        log = (tmp_path / "serve.log").read_text()
        assert "refused a batch" not in log and "prepared statement" not in log, log[-3000:]


def test_behind_pgbouncer_with_a_query_timeout_a_silent_server_fails_a_query_in_time(postgres_url: str) -> None:
    """PgBouncer answers its clients whatever the server does, so libpq's TCP timeouts (storage/db.py)
    never fire: a query to a server gone silent waits on PgBouncer's own timeouts. With the settings
    the README gives (`query_timeout` here 5 s) it fails after them, and taskproxy's waits end; PgBouncer's
    defaults leave it hanging for the kernel's quarter of an hour."""
    from tcp_relay import TcpRelay, black_hole_unavailable

    if reason := black_hole_unavailable():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    relay = TcpRelay(urlsplit(postgres_url).port or 5432)
    settings = "query_timeout = 5\nserver_connect_timeout = 5\ntcp_user_timeout = 10000\ntcp_keepalive = 1\ntcp_keepidle = 5\n"
    with _pgbouncer(postgres_url, "transaction", pool_size=2, server_port=relay.port, settings=settings) as url:
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                assert connection.execute(text("SELECT 1")).scalar_one() == 1
            with relay.black_hole():
                started = time.monotonic()
                with pytest.raises(Exception) as failed, engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                took = time.monotonic() - started
            assert "query_timeout" in str(failed.value) or "server" in str(failed.value), failed.value
            assert took < 15, f"the query waited {took:.1f} s"
        finally:
            engine.dispose()
