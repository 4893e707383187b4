"""Each provider has its own connections (`server.max_connections_per_provider`): a provider that
accepts requests and never finishes them holds its own, and the others' requests go on. Before, every
provider shared one pool of 1,000: a self-hosted server that hung took all of it, and a request to a
healthy provider waited for a connection until its connect timeout (504 after 5 s; found by a review)."""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from serve_helpers import FakeUpstream, fake_upstream, running_server, wait_until, write_config

pytestmark = pytest.mark.serve
HELD = 5


def test_a_provider_that_never_finishes_holds_its_own_connections_not_the_others(tmp_path: Path, upstream: FakeUpstream) -> None:
    with fake_upstream() as healthy:
        models = [{"name": "gpt-4o-mini", "base_url": f"{healthy.url}/v1", "connect_timeout_seconds": 2},
                  {"name": "fake-hang", "base_url": f"{upstream.url}/v1", "connect_timeout_seconds": 2}]  # fmt: skip
        config = write_config(tmp_path, upstream.url, models=models, server={"max_connections_per_provider": HELD})
        with running_server(config, tmp_path / "server.log") as server, ExitStack() as held:
            key = server.new_key()
            body = json.dumps({"model": "fake-hang", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
            request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Work-Item: PROJ-1\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
            for _ in range(HELD):  # every connection this process may open to the hanging provider, each held by a stream
                client = held.enter_context(closing(socket.create_connection(("127.0.0.1", server.port))))
                client.sendall(request)
            wait_until(lambda: upstream.fake.active, lambda active: active == HELD, 10)
            started = time.monotonic()
            answer = server.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                                      headers={"authorization": f"Bearer {key}", "X-Work-Item": "PROJ-2"}, timeout=10)  # fmt: skip
            assert answer.status_code == 200 and time.monotonic() - started < 1.5, (answer.status_code, answer.text[:200])
            # The hanging provider's next request waits for one of its own connections, up to its connect timeout.
            waited = server.http.post("/v1/chat/completions", json={"model": "fake-hang", "messages": [{"role": "user", "content": "hi"}]},
                                      headers={"authorization": f"Bearer {key}", "X-Work-Item": "PROJ-3"}, timeout=10)  # fmt: skip
            assert waited.status_code == 504 and waited.json()["error"]["code"] == "upstream_timeout", waited.text[:200]
