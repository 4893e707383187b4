"""Lean neighbours for measuring the proxy's own scaling on a small machine: a provider that is nginx
answering one fixed chat completion, and load from wrk (C). On two cores, the Python fake provider and
load generator take about as much CPU per request as the proxy itself, so a second proxy worker had
little left to use: `serve --workers 2` against one measured the neighbours, not the proxy.

Both need Debian's packages (`apt-get install -y nginx-light wrk`); `available()` says whether they are here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from targets import MODEL, Served

REPLY = {
    "id": "chatcmpl-lean", "object": "chat.completion", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Retries with jitter added."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27},
}  # fmt: skip


def available() -> str | None:
    """None when both are installed, else what is missing."""
    missing = [name for name in ("nginx", "wrk") if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    return f"{' and '.join(missing)} not installed (apt-get install -y nginx-light wrk)" if missing else None


class StaticProvider(Served):
    """nginx on 127.0.0.1 answering every request with the same chat completion (usage included)."""

    name = "nginx"
    health_path = ""

    def command(self, port: int) -> list[str]:
        runtime = Path(tempfile.mkdtemp(prefix="nginx-", dir=self.folder))
        body = json.dumps(REPLY).replace("'", "\\'")
        (runtime / "nginx.conf").write_text(f"""
worker_processes 1;
pid {runtime}/nginx.pid;
error_log {runtime}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {runtime}/body;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
}}
""")
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(runtime / "nginx.conf"), "-g", "daemon off;"]


def wrk_load(url: str, headers: dict[str, str], body: dict[str, Any], concurrency: int, seconds: float, folder: Path) -> dict[str, Any]:
    """wrk, one thread, `concurrency` connections, after 1 s of warm-up: requests/s, p50/p99 latency
    (wrk's own, over every request), and the answers that were not 200."""
    script = folder / "wrk-post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    base = ["wrk", "-t1", f"-c{concurrency}", "-s", str(script)]
    subprocess.run([*base, "-d1s", url], check=True, capture_output=True, timeout=60)
    out = subprocess.run([*base, f"-d{seconds:g}s", "--latency", url], check=True, capture_output=True, text=True, timeout=seconds + 60).stdout
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": _ms(re.search(r"\s50%\s+([\d.]+\w+)", out)), "p99_ms": _ms(re.search(r"\s99%\s+([\d.]+\w+)", out)),
            "count": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "errors": sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
                      + sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))}  # fmt: skip


def _ms(match: re.Match[str] | None) -> float | None:
    if match is None:
        return None
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", match.group(1)).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]
