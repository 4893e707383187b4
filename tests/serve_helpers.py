"""Helpers for tests that drive a real `taskproxy serve` process on 127.0.0.1.

The server runs as a subprocess (`python -m taskproxy serve`); the fake provider runs in the test
process (`serve_in_thread`) so a test can read what it received. Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from taskproxy.fake_provider import FakeProvider
from taskproxy.localserver import serve_in_thread

ADMIN_KEY = "tp-process-test-admin-key-0123456789"
STARTUP_TIMEOUT = 15.0
# Variables that would change which config or database the subprocess uses, or route loopback traffic.
_SCRUBBED_ENV = ("TASKPROXY_CONFIG", "TASKPROXY_DATABASE_URL", "TASKPROXY_ADMIN_KEY", "TASKPROXY_URL", "TASKPROXY_API_KEY",
                 "OPENAI_API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound then released: connections are refused)."""
    return free_port()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def write_config(folder: Path, fake_url: str, *, models: list[dict] | None = None, name: str = "taskproxy.yaml", **extra: Any) -> Path:
    """A config with the fake provider's models; `extra` adds or replaces top-level keys."""
    base = f"{fake_url}/v1"
    data: dict[str, Any] = {
        "database_url": f"sqlite:///{folder / 't.db'}",
        "models": models
        if models is not None
        else [
            {"name": "gpt-4o-mini", "base_url": base},
            {"name": "fake-500", "base_url": base},
            {"name": "fake-429", "base_url": base},
            {"name": "fake-slow", "base_url": base, "read_timeout_seconds": 0.5},
            {"name": "fake-cut", "base_url": base},
            {"name": "fake-hang", "base_url": base},
            # The fake's behaviour follows the model it receives: this one hangs, and the proxy gives up after 0.5 s.
            {"name": "hang-short", "base_url": base, "upstream_model": "fake-hang", "read_timeout_seconds": 0.5},
            {"name": "dead", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "connect_timeout_seconds": 2},
        ],
        "recording": {"spool_path": str(folder / "spool.jsonl"), "flush_interval_seconds": 0.05},
    }
    data.update(extra)
    path = folder / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(*args: str, config: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`taskproxy ARGS` run in this process, as the console script runs it (`cli.main`; the script, `cli.run`, then exits), with its
    output, error output and exit code, in an environment of its own (`env`, else `child_env()`).
    In-process: a new interpreter per call cost the suite over a minute. `run_cli_process` runs the
    installed command itself."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from unittest import mock

    from taskproxy.cli import main

    argv = [*args, *(["--config", str(config)] if config is not None else [])]
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env or child_env(), clear=True), redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse, and the developer commands' messages, exit as the interpreter would
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str, config: Path | None = None, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m taskproxy ARGS` in a process of its own."""
    command = [sys.executable, "-m", "taskproxy", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or child_env())


def cli_json(*args: str, config: Path | None = None) -> Any:
    result = run_cli(*args, config=config)
    assert result.returncode == 0, f"taskproxy {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def wait_until(fetch: Callable[[], Any], done: Callable[[Any], bool] = bool, timeout: float = 5.0, interval: float = 0.05, what: str = "") -> Any:
    """Call `fetch` until `done(value)`, and return that value; fail the test when `timeout` runs out first."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'the awaited condition'} not reached within {timeout} s; last value: {value!r:.1000}")
        time.sleep(interval)


def quoted(item_id: str) -> str:
    return urllib.parse.quote(item_id, safe="")


@dataclass
class FakeUpstream:
    fake: FakeProvider
    url: str

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.fake.received


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeProvider(slow_seconds=2.0)
    with serve_in_thread(fake.app()) as url:
        yield FakeUpstream(fake, url)


@contextmanager
def quiet_upstream() -> Iterator[str]:
    """The fake provider in a process of its own (its URL), for a client whose timings must not depend
    on what the test process is doing meanwhile (a flood served by the in-process fake, say)."""
    # The socket is bound here and handed to the child: no other process can take the port meanwhile.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by each connection it accepts
    port = listener.getsockname()[1]
    code = ("import uvicorn; from taskproxy.fake_provider import FakeProvider; "
            f"uvicorn.run(FakeProvider().app(), fd={listener.fileno()}, log_level='warning', access_log=False, lifespan='off')")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code], env=child_env(), pass_fds=(listener.fileno(),))
    listener.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                httpx.get(f"{url}/_fake/requests", timeout=1, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the fake provider's process did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class ServerProcess:
    """A `taskproxy serve` subprocess and clients for it."""

    config: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    admin_key: str = ADMIN_KEY
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return str(yaml.safe_load(self.config.read_text())["database_url"])

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_key}"}

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        except OSError:
            return ""

    def openai(self, key: str, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=f"{self.url}/v1", max_retries=0, timeout=15, http_client=httpx.Client(trust_env=False), **kwargs)

    def admin_get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers=self.admin_headers)

    def new_key(self, owner: str = "dana", team: str | None = "payments", role: str = "developer") -> str:
        response = self.http.post("/api/keys", json={"owner": owner, "team": team, "role": role}, headers=self.admin_headers)
        assert response.status_code == 201, response.text
        return response.json()["key"]

    def events(self, work_item: str, expected: int, timeout: float = 5.0) -> list[dict]:
        """Poll the events API until `expected` events of `work_item` are visible."""

        def fetch() -> list[dict]:
            response = self.admin_get("/api/usage/events", work_item=work_item)
            assert response.status_code == 200, response.text
            return response.json()

        return wait_until(fetch, lambda events: len(events) >= expected, timeout)

    def work_item(self, item_id: str, expected_requests: int, timeout: float = 5.0) -> dict:
        """Poll `GET /api/work-items/{id}` until it shows `expected_requests` requests."""

        def fetch() -> dict:
            response = self.admin_get(f"/api/work-items/{quoted(item_id)}")
            assert response.status_code in (200, 404), response.text
            return response.json() if response.status_code == 200 else {}

        return wait_until(fetch, lambda item: item.get("requests", 0) >= expected_requests, timeout)

    def stop(self, timeout: float = 10.0) -> int:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def memory_mib(self) -> tuple[float, float]:
        """(resident now, peak resident since start), MiB."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server(
    config: Path, log_path: Path, *, env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (), open_files: int | None = None
) -> ServerProcess:
    """Start `taskproxy serve` on a free port and wait (≤ 15 s) until /healthz answers. `open_files`
    sets the process's open-file limit, soft and hard (as on many servers: 1,024)."""
    import resource

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    log_file = log_path.open("wb")
    # Port 0: the server binds a port of its own and says which in its log. A port picked here and
    # released before the server binds it could be taken meanwhile (the suite runs in parallel), and
    # a health check could then reach another test's server.
    process = subprocess.Popen(
        [sys.executable, "-m", "taskproxy", "serve", "--config", str(config), "--port", "0", *extra_args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env or child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY),
        preexec_fn=limit_open_files,
    )
    log_file.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    port: int | None = None
    while port is None:
        if (found := _LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))) is not None:
            port = int(found[1])
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise RuntimeError(f"taskproxy serve did not start (exit {process.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    server = ServerProcess(config=config, port=port, process=process, log_path=log_path)
    while True:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"taskproxy serve exited with {process.returncode} at start:\n{server.log()}")
        try:
            if server.http.get("/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"taskproxy serve did not answer /healthz within {STARTUP_TIMEOUT}s:\n{server.log()}")
        time.sleep(0.05)


_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@contextmanager
def running_server(config: Path, log_path: Path, **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(config, log_path, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    """The response is `status` with OpenAI's error shape and `code`; returns the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error
