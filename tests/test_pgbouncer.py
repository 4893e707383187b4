"""Behind PgBouncer: the report processes' engines connect through a real PgBouncer in session mode,
the setup many companies put in front of PostgreSQL. PgBouncer refuses a connection whose startup
packet carries an `options` parameter (unless told to ignore it), so nothing taskproxy sets per
connection may travel there."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
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


@pytest.fixture
def bouncer_url(postgres_url: str) -> Iterator[str]:
    """A PgBouncer on loopback whose database `tp` is the test server's, in the test's own schema."""
    if not os.path.exists(PGBOUNCER):
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed; `bash .ci/run` installs it")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer, or `bash .ci/run`)")
    server = urlsplit(postgres_url)
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    port = _free_port()
    # Not pytest's tmp_path: PgBouncer drops root for another user, who cannot enter root's private folders.
    tmp_path = Path(tempfile.mkdtemp(prefix="tp-pgbouncer-"))
    tmp_path.chmod(0o755)
    (tmp_path / "users.txt").write_text('"postgres" ""\n')
    (tmp_path / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"tp = host={server.hostname} port={server.port or 5432} dbname={server.path.lstrip('/')} user=postgres "
        f"connect_query='SET search_path={schema}'\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp_path / 'users.txt'}\npool_mode = session\n"
        "logfile =\npidfile =\n"
    )
    # PgBouncer will not run as root; the machine's postgres user (or nobody) owns the files it writes.
    command = [PGBOUNCER, str(tmp_path / "pgbouncer.ini")]
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
        shutil.rmtree(tmp_path, ignore_errors=True)


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

