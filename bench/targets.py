"""The processes the benchmark measures: the fake provider, taskproxy (SQLite or PostgreSQL) and the
LiteLLM proxy (installed by the script in its own virtual environment). Each is started as its own
process on 127.0.0.1, optionally under a wrapper command (valgrind, for instruction counts).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
WORK_ITEM = "BENCH-1"
MODEL = "gpt-4o-mini"
LITELLM_VERSION = "1.106.2"
LITELLM_VENV = BENCH / ".litellm-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, *, any_status: bool = False) -> float:
    """Seconds until `url` answers 200 (or anything, with `any_status`); raises if the process exits."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]}… exited with {proc.returncode} before answering {url}")
        try:
            status = httpx.get(url, timeout=1).status_code
            if any_status or status == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> float | None:
    """SIGTERM, then SIGKILL after `timeout`; how long a clean exit took (None if killed)."""
    if proc is None or proc.poll() is not None:
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


class Served:
    """One server process: `start()` returns seconds from spawn to its health URL answering."""

    name = "?"
    health_path = "/healthz"
    startup_timeout = 60.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = None

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wrapper: list[str] = (), timeout: float | None = None) -> float:  # type: ignore[assignment]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(self.folder / f"{self.name}-{port}.log", "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen([*wrapper, *self.command(port)], env=self.env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        wait_http(self.url + self.health_path, self.proc, timeout or self.startup_timeout, any_status=self.health_path == "")
        return time.perf_counter() - started

    def stop(self) -> float | None:
        took = stop(self.proc)
        if self.log:
            self.log.close()
        return took

    # what the load generator sends
    endpoint = "/v1/chat/completions"

    def headers(self) -> dict[str, str]:
        return {}


class FakeProvider(Served):
    name = "fake"
    health_path = ""

    def __init__(self, folder: Path, *options: str) -> None:
        super().__init__(folder)
        self.options = options  # extra fake_server.py arguments (--flood-bytes, ...)

    def command(self, port: int) -> list[str]:
        return [sys.executable, str(BENCH / "fake_server.py"), "--port", str(port), *self.options]

    def headers(self) -> dict[str, str]:
        return {"authorization": "Bearer sk-fake"}


class Taskproxy(Served):
    """`taskproxy serve`, one worker, recording on, a key and `X-Work-Item` on every request."""

    def __init__(self, folder: Path, provider_url: str, database_url: str, name: str, extra_models: tuple[dict, ...] = ()) -> None:
        super().__init__(folder)
        self.name = name
        self.extra_models = extra_models
        self.database_url = database_url
        self.admin_key = "tp-bench-admin-" + secrets.token_urlsafe(16)
        self.provider_url = provider_url
        self.config = folder / f"{name}.yaml"
        self.configure()
        self.key = ""

    def configure(self, *, slowed_down: bool = False) -> None:
        """Write the config. `slowed_down` (under valgrind, ~50× slower): the writer flushes every 1 s
        (its maximum) instead of 0.25 s, and the periodic reloads of keys, registry and budgets run
        every 10 minutes instead of 5–10 s, so that per request they cost what they do at full speed
        rather than 50× more."""
        config: dict = {
            "database_url": self.database_url,
            "models": [{"name": MODEL, "provider": "openai", "base_url": f"{self.provider_url}/v1"},
                       *({**m, "base_url": f"{self.provider_url}/v1"} for m in self.extra_models)],
            "recording": {"spool_path": str(self.folder / f"{self.name}-spool.jsonl")},
        }
        if slowed_down:
            config["recording"]["flush_interval_seconds"] = 1.0
            config["auth"] = {"key_refresh_seconds": 600}
            config["work_items"] = {"refresh_seconds": 600}
            config["budgets"] = {"refresh_seconds": 600}
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def env(self) -> dict[str, str]:
        env = {**os.environ, "TASKPROXY_ADMIN_KEY": self.admin_key}
        env.pop("TASKPROXY_DATABASE_URL", None)
        env.pop("TASKPROXY_CONFIG", None)
        return env

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "taskproxy", "serve", "--config", str(self.config), "--port", str(port), "--log-level", "warning"]

    def create_key(self) -> None:
        out = subprocess.run([sys.executable, "-m", "taskproxy", "keys", "create", "--owner", "bench", "--team", "bench", "--json",
                              "--config", str(self.config)], env=self.env(), check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
        self.key = json.loads(out.stdout)["key"]

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", "X-Work-Item": WORK_ITEM}

    def recorded_requests(self) -> int:
        rows = httpx.get(f"{self.url}/api/usage", params={"group_by": "work_item"},
                         headers={"authorization": f"Bearer {self.admin_key}"}, timeout=60).json()["groups"]  # fmt: skip
        return sum(int(r.get("requests") or 0) for r in rows if r.get("work_item") == WORK_ITEM)


def ensure_litellm(log: callable = print) -> Path:  # type: ignore[valid-type]
    """The LiteLLM proxy in its own virtual environment (bench/.litellm-venv), installed once."""
    python = LITELLM_VENV / "bin" / "python"
    marker = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if marker.exists():
        return python
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once; a minute or two)…")
    venv.create(LITELLM_VENV, with_pip=True, clear=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True, timeout=1800)
    marker.touch()
    return python


class LiteLLMProxy(Served):
    """The LiteLLM proxy: one worker, no database, its bundled price map, logging off."""

    name = "litellm"
    health_path = "/health/liveliness"
    startup_timeout = 600.0  # under valgrind it takes minutes

    def __init__(self, folder: Path, provider_url: str, python: Path) -> None:
        super().__init__(folder)
        self.python = python
        self.master_key = "sk-bench-" + secrets.token_urlsafe(24)
        self.config = folder / "litellm.yaml"
        self.config.write_text(json.dumps({
            "model_list": [{"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{provider_url}/v1", "api_key": "sk-fake"}}],
            "litellm_settings": {"turn_off_message_logging": True, "drop_params": True},
        }, indent=2))  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "DATABASE_URL"))}
        return {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": self.master_key}

    def command(self, port: int) -> list[str]:
        return [str(self.python), str(self.python.parent / "litellm"), "--config", str(self.config), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1"]  # fmt: skip

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.master_key}"}
