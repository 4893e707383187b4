"""The Responses WebSocket against a provider that answers a streamed request oddly, through a real
`taskproxy serve` (its production HTTP client) and a provider written on a raw socket: an error body
cut or stalled, a whole JSON response instead of events, an `error` event in the middle of a stream.
Each turn is recorded, once, as the same answer over HTTP is, and the socket serves the next turn."""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ADMIN_KEY, ServerProcess, child_env, running_server, wait_until, write_config
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.serve

USAGE = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 50,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1050}  # fmt: skip


def _response(model: str, status: str = "completed", usage: dict | None = None) -> dict:
    output = [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "Done.", "annotations": []}]}]  # fmt: skip
    return {"id": f"resp_{model}", "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": output if status == "completed" else [], "usage": usage}  # fmt: skip


def _event(data: dict) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


ERROR_HEAD = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


class RawProvider:
    """A provider on 127.0.0.1 written on a raw socket; each request is answered by its model's script."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received: list[str] = []
        self.bodies: list[dict] = []
        self.release = threading.Event()  # ends a stalled answer
        self.scripts: dict[str, Callable[[socket.socket], None]] = {
            "ws-500-cut": self._cut, "ws-500-stall": self._stall, "ws-200-json": self._json, "ws-error": self._error_event, "ws-ok": self._ok,
            "ws-bomb": self._bomb, "ws-200-stall": self._json_stall, "ws-json-bomb": self._json_bomb, "ws-ok-linger": self._ok_linger,
        }  # fmt: skip
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += conn.recv(65536)
            self.bodies.append(json.loads(body))
            model = self.bodies[-1]["model"]
            self.received.append(model)
            self.scripts[model](conn)

    @staticmethod
    def _cut(conn: socket.socket) -> None:
        conn.sendall(ERROR_HEAD + _chunk(b'{"error": {"message": "The server had an err'))
        time.sleep(0.1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a close

    def _stall(self, conn: socket.socket) -> None:
        conn.sendall(ERROR_HEAD + _chunk(b'{"error": {"message": "The server had an err'))
        self.release.wait(15)

    @staticmethod
    def _json(conn: socket.socket) -> None:
        body = json.dumps(_response("ws-200-json", usage=USAGE)).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip

    @staticmethod
    def _error_event(conn: socket.socket) -> None:
        created = _response("ws-error", "in_progress")
        conn.sendall(STREAM_HEAD + _event({"type": "response.created", "sequence_number": 0, "response": created})
                     + _event({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0,
                               "content_index": 0, "delta": "Half an ans"})
                     + _event({"type": "error", "sequence_number": 2, "code": "server_error", "message": "The model failed.", "param": None}))  # fmt: skip

    @staticmethod
    def _ok(conn: socket.socket) -> None:
        usage = {**USAGE, "input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
        conn.sendall(STREAM_HEAD + _event({"type": "response.created", "sequence_number": 0, "response": _response("ws-ok", "in_progress")})
                     + _event({"type": "response.completed", "sequence_number": 1, "response": _response("ws-ok", usage=usage)}))  # fmt: skip

    def _ok_linger(self, conn: socket.socket) -> None:
        """`ws-ok`'s answer, its stream then kept open a while (a provider slow to close it)."""
        self._ok(conn)
        self.release.wait(3)

    @staticmethod
    def _bomb(conn: socket.socket) -> None:
        """A last event whose `output` holds 3,000 JSON values: more than the server's limits.max_json_nodes here."""
        response = {**_response("ws-bomb"), "output": [[] for _ in range(3_000)]}
        conn.sendall(STREAM_HEAD + _event({"type": "response.created", "sequence_number": 0, "response": _response("ws-bomb", "in_progress")})
                     + _event({"type": "response.completed", "sequence_number": 1, "response": response}))  # fmt: skip

    def _json_stall(self, conn: socket.socket) -> None:
        """200 and half of a whole JSON response, then nothing."""
        body = json.dumps(_response("ws-200-stall", usage=USAGE)).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])  # fmt: skip
        self.release.wait(15)

    @staticmethod
    def _json_bomb(conn: socket.socket) -> None:
        """A whole JSON response whose `output` holds 3,000 JSON values: more than the server's limit here."""
        body = json.dumps({**_response("ws-json-bomb", usage=USAGE), "output": [[] for _ in range(3_000)]}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture(scope="module")
def provider() -> Iterator[RawProvider]:
    raw = RawProvider()
    yield raw
    raw.close()


def _config(folder: Path, provider: RawProvider, **extra: Any) -> Path:
    base = f"{provider.url}/v1"
    models = [{"name": name, "base_url": base} for name in provider.scripts]
    models.append({"name": "ws-500-bounded", "base_url": base, "upstream_model": "ws-500-stall", "max_response_seconds": 1})
    models.append({"name": "ws-200-bounded", "base_url": base, "upstream_model": "ws-200-stall", "max_response_seconds": 1, "fallbacks": ["ws-ok"]})
    return write_config(folder, provider.url, models=models, **extra)


@pytest.fixture(scope="module")
def server(provider: RawProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("socket-replies")
    with running_server(_config(folder, provider), folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as running:
        yield running


def _socket(server: ServerProcess, work_item: str) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    return connect(url, additional_headers={"Authorization": f"Bearer {server.new_key(owner='noa')}", "X-Work-Item": work_item},
                   open_timeout=5, close_timeout=5)  # fmt: skip


def _turn(socket_: ClientConnection, model: str) -> list[dict[str, Any]]:
    """The messages of one turn, up to its last event or an error."""
    socket_.send(json.dumps({"type": "response.create", "model": model, "input": "Fix the failing test."}))
    messages = []
    while True:
        messages.append(json.loads(socket_.recv(10)))
        if messages[-1]["type"] in ("response.completed", "response.failed", "response.incomplete", "error"):
            return messages


def test_an_error_body_the_provider_cuts_or_stalls_is_recorded_and_the_socket_goes_on(server: ServerProcess) -> None:
    """A 500 whose body is reset halfway, and one that stalls past max_response_seconds: each is recorded
    and answered with an error, and the socket serves the next turn. The cut ended the socket with a
    traceback and recorded nothing; the stall was waited on without end (found by a review)."""
    with _socket(server, "PROJ-81") as socket_:
        cut = _turn(socket_, "ws-500-cut")
        started = time.monotonic()
        stalled = _turn(socket_, "ws-500-bounded")
        waited = time.monotonic() - started
        after = _turn(socket_, "ws-ok")
    assert [m["type"] for m in cut] == ["error"] and cut[0]["status"] == 502 and cut[0]["error"]["code"] == "upstream_error", cut
    assert [m["type"] for m in stalled] == ["error"] and stalled[0]["status"] == 504 and "max_response_seconds" in stalled[0]["error"]["message"]
    assert waited < 5, waited
    assert after[-1]["type"] == "response.completed", after
    events = sorted(server.events("PROJ-81", 3), key=lambda e: e["ts"])
    assert [(e["model"], e["status"], e["error"]) for e in events] == [
        ("ws-500-cut", 502, "upstream_error"), ("ws-500-bounded", 504, "upstream_timeout"), ("ws-ok", 200, None)]


def test_a_client_leaving_while_an_error_body_is_read_is_recorded(server: ServerProcess, provider: RawProvider) -> None:
    since = len(provider.received)
    with _socket(server, "PROJ-82") as socket_:
        socket_.send(json.dumps({"type": "response.create", "model": "ws-500-stall", "input": "Fix the failing test."}))
        wait_until(lambda: provider.received[since:], bool, 5)
        time.sleep(1)
    [event] = server.events("PROJ-82", 1)
    assert (event["status"], event["error"]) == (499, "client_disconnected")


def test_a_turn_reading_an_error_body_when_the_server_shuts_down_is_recorded(provider: RawProvider, tmp_path: Path) -> None:
    with running_server(_config(tmp_path, provider), tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
        since = len(provider.received)
        with _socket(server, "PROJ-83") as socket_:
            socket_.send(json.dumps({"type": "response.create", "model": "ws-500-stall", "input": "Fix the failing test."}))
            wait_until(lambda: provider.received[since:], bool, 5)
            server.sigterm()
            server.process.wait(20)
        log = server.log()
    with closing(sqlite3.connect(tmp_path / "t.db")) as db:
        rows = db.execute("SELECT status, error FROM usage_events WHERE work_item = 'PROJ-83'").fetchall()
    assert rows == [(503, "proxy_shutdown")], log
    assert "not recorded" not in log, log


def test_a_whole_json_answer_to_a_streamed_request_is_relayed_as_events_and_billed(server: ServerProcess) -> None:
    """A provider that ignores `stream: true` and answers the whole response as JSON: the client gets
    it as `response.created` and `response.completed`, and it is billed from its usage, as over HTTP
    (the socket answered 502 and recorded 0 tokens for what the provider billed)."""
    client = server.openai(server.new_key(owner="noa"))
    with client.responses.connect(extra_headers={"X-Work-Item": "PROJ-84"}, max_retries=0) as connection:
        connection.response.create(model="ws-200-json", input="Fix the failing test.")
        events = []
        while not events or events[-1].type not in ("response.completed", "error"):
            events.append(connection.recv())
    assert [e.type for e in events] == ["response.created", "response.completed"], events
    assert events[-1].response.output_text == "Done." and events[-1].response.usage.input_tokens == 1000
    [event] = server.events("PROJ-84", 1)
    assert (event["status"], event["error"], event["usage_source"]) == (200, None, "provider")
    assert (event["prompt_tokens"], event["completion_tokens"]) == (1000, 50)


def test_a_providers_error_event_ends_its_turn_and_is_recorded_as_over_http(server: ServerProcess) -> None:
    """The provider's `error` event is the turn's last message: no error of the proxy's follows it,
    which the client read as the first message of its next turn (found by a review). It is recorded
    as over HTTP, 502 with the provider's error code."""
    with _socket(server, "PROJ-85") as socket_:
        failed = _turn(socket_, "ws-error")
        after = _turn(socket_, "ws-ok")
    assert [m["type"] for m in failed] == ["response.created", "response.output_text.delta", "error"], failed
    assert failed[-1]["code"] == "server_error"
    assert [m["type"] for m in after] == ["response.created", "response.completed"], after
    events = sorted(server.events("PROJ-85", 2), key=lambda e: e["ts"])
    assert [(e["model"], e["status"], e["error"], e["provider_error"]) for e in events] == [
        ("ws-error", 502, "upstream_error", "server_error"), ("ws-ok", 200, None, None)]


def test_a_client_leaving_once_its_answer_is_whole_is_not_recorded_as_gone(server: ServerProcess) -> None:
    """The client closes as soon as its `response.completed` came, while the provider has yet to close
    the stream: the answer was whole, and it is recorded so, not `client_disconnected` (a run of the
    suite caught it so for `ws-ok`, whose stream closes at once)."""
    with _socket(server, "PROJ-86") as socket_:
        answered = _turn(socket_, "ws-ok-linger")
    assert answered[-1]["type"] == "response.completed"
    [event] = server.events("PROJ-86", 1)
    assert (event["status"], event["error"], event["total_tokens"]) == (200, None, 12), event


def test_a_last_event_with_more_json_values_than_the_limit_is_not_kept_for_a_continuation(provider: RawProvider, tmp_path: Path) -> None:
    """The socket decoded every last event whole to keep the conversation: a provider's 14 MiB event of
    5 million empty arrays stopped the event loop for seconds and held ~344 MiB per socket (found by a
    review). Past limits.max_json_nodes it is relayed and billed, not decoded: a continuation of it goes
    to the provider by its id, as over HTTP."""
    config = _config(tmp_path, provider, limits={"max_json_nodes": 1000})
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server, _socket(server, "PROJ-86") as socket_:
        assert _turn(socket_, "ws-bomb")[-1]["type"] == "response.completed"
        since = len(provider.bodies)
        socket_.send(json.dumps({"type": "response.create", "model": "ws-ok", "input": "Go on.", "previous_response_id": "resp_ws-bomb"}))
        while json.loads(socket_.recv(10))["type"] not in ("response.completed", "error"):
            pass
        [continued] = provider.bodies[since:]
        assert continued["previous_response_id"] == "resp_ws-bomb" and continued["input"] == "Go on.", continued  # not expanded
        assert [e["status"] for e in server.events("PROJ-86", 2)] == [200, 200]


def test_a_whole_json_answer_cut_short_is_not_sent_to_the_fallback(server: ServerProcess, provider: RawProvider) -> None:
    """The provider answered 200 and stalled half-way through its JSON: the socket took the read's
    timeout for a failure to retry, asked the fallback model too, and had the work done and billed
    twice (found by a review). Over HTTP it is a 504, not retried; so here."""
    since = len(provider.received)
    with _socket(server, "PROJ-87") as socket_:
        [refused] = _turn(socket_, "ws-200-bounded")
    assert refused["type"] == "error" and refused["status"] == 504, refused
    assert provider.received[since:] == ["ws-200-stall"]  # the fallback's provider was not asked
    [event] = server.events("PROJ-87", 1)
    assert (event["status"], event["error"]) == (504, "upstream_timeout")


def test_a_whole_json_answer_with_more_json_values_than_the_limit_is_billed_not_decoded(provider: RawProvider, tmp_path: Path) -> None:
    """A whole JSON response was decoded however many values it held (1.4 million empty arrays took
    0.7 s, all kept for the next turn; found by a review). Past limits.max_json_nodes it is billed
    from its usage and answered with an error, as one too large to relay is."""
    config = _config(tmp_path, provider, limits={"max_json_nodes": 1000})
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server, _socket(server, "PROJ-88") as socket_:
        [refused] = _turn(socket_, "ws-json-bomb")
        assert refused["type"] == "error" and "too large to relay" in refused["error"]["message"], refused
        [event] = server.events("PROJ-88", 1)
    assert (event["prompt_tokens"], event["completion_tokens"], event["usage_source"]) == (1000, 50, "provider")
