"""The Responses API over a WebSocket on /v1/responses, through a real `taskproxy serve` and the fake
provider: the openai SDK's `responses.connect()` as the client (and the `websockets` package for what
the SDK will not send). Each `response.create` is admitted and recorded like a POST; a continuation by
`previous_response_id` reaches the provider whole; refusals are `error` messages and the socket stays
usable; a client that leaves mid-answer is recorded as such, and so is a turn the server's shutdown ends."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, wait_until, write_config
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("socket")
    base = f"{upstream.url}/v1"
    models = [{"name": "gpt-4o-mini", "base_url": base}, {"name": "fake-slow", "base_url": base}, {"name": "fake-500", "base_url": base},
              {"name": "fake-cut", "base_url": base}, {"name": "fake-trickle", "base_url": base}, {"name": "fake-unending", "base_url": base},
              {"name": "fake-type-last", "base_url": base}]  # fmt: skip
    config = write_config(folder, upstream.url, models=models)
    with running_server(config, folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as running:
        yield running


def until_done(connection: Any) -> list[Any]:
    """The events of one response, up to its terminal event or an error."""
    events = []
    while True:
        event = connection.recv()
        events.append(event)
        if event.type in ("response.completed", "response.failed", "response.incomplete", "error"):
            return events


def sent_to_provider(upstream: FakeUpstream, since: int) -> list[dict]:
    return [r for r in upstream.received[since:] if r["path"] == "/v1/responses"]


def test_each_response_create_is_recorded_like_a_post_and_a_continuation_is_sent_whole(server: ServerProcess, upstream: FakeUpstream) -> None:
    client = server.openai(server.new_key(owner="noa"))
    since = len(upstream.received)
    with client.responses.connect(extra_headers={"X-Work-Item": "PROJ-51"}, max_retries=0) as connection:
        connection.response.create(model="gpt-4o-mini", input="Name the failing test.")
        first = until_done(connection)
        done = first[-1].response
        assert [e.type for e in first][:2] == ["response.created", "response.in_progress"] and first[-1].type == "response.completed"

        follow_up = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And fix it."}]}]
        connection.response.create(model="gpt-4o-mini", input=follow_up, previous_response_id=done.id, store=False,
                                   metadata={"work_item": "PROJ-52"})  # this message's own work item  # fmt: skip
        second = until_done(connection)[-1].response

    provider = sent_to_provider(upstream, since)
    assert len(provider) == 2 and all(r["body"]["stream"] is True for r in provider)
    whole = provider[1]["body"]
    assert "previous_response_id" not in whole  # the socket knew it: the provider gets the conversation
    assert whole["input"][0] == {"role": "user", "content": "Name the failing test."}
    assert whole["input"][1]["type"] == "message" and whole["input"][1]["content"][0]["text"] == done.output_text
    assert whole["input"][2:] == follow_up
    assert "metadata" not in whole and "x-work-item" not in provider[0]["headers"]

    [one] = server.events("PROJ-51", 1)
    [two] = server.events("PROJ-52", 1)
    assert (one["attribution_source"], two["attribution_source"]) == ("header", "body")
    for event, response in ((one, done), (two, second)):
        assert event["route"] == "/v1/responses" and event["stream"] is True and event["usage_source"] == "provider"
        assert (event["prompt_tokens"], event["completion_tokens"]) == (response.usage.input_tokens, response.usage.output_tokens)


def test_a_message_whose_work_item_is_null_is_billed_to_the_connections(server: ServerProcess, upstream: FakeUpstream) -> None:
    """`"metadata": {"work_item": null}` dropped the connection's X-Work-Item, so the key's binding (or
    a refusal) took its place, where a POST with the same body is billed to the header's item (found
    by a review)."""
    client = server.openai(server.new_key(owner="ines"))
    with client.responses.connect(extra_headers={"X-Work-Item": "PROJ-64"}, max_retries=0) as connection:
        connection.response.create(model="gpt-4o-mini", input="Name the failing test.", metadata={"work_item": None})  # type: ignore[dict-item]
        assert until_done(connection)[-1].type == "response.completed"
    [event] = server.events("PROJ-64", 1)
    assert event["attribution_source"] == "header"


def test_a_provider_writing_the_event_type_last_completes_its_turn(server: ServerProcess, upstream: FakeUpstream) -> None:
    """A provider that serializes the SDK's own event classes writes `type` after the whole response:
    the socket looked for it in each event's first 200 bytes, so a completed turn was recorded as
    `upstream_error`, the client got an error after `response.completed`, and the conversation was not
    kept for a continuation (found by a review)."""
    client = server.openai(server.new_key(owner="noa"))
    since = len(upstream.received)
    with client.responses.connect(extra_headers={"X-Work-Item": "PROJ-58"}, max_retries=0) as connection:
        connection.response.create(model="fake-type-last", input="Name the failing test.")
        first = until_done(connection)
        assert first[-1].type == "response.completed"
        follow_up = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And fix it."}]}]
        connection.response.create(model="fake-type-last", input=follow_up, previous_response_id=first[-1].response.id, store=False)
        second = until_done(connection)
    assert second[-1].type == "response.completed", second[-1]  # not the error a missed end sent first
    whole = sent_to_provider(upstream, since)[1]["body"]
    assert "previous_response_id" not in whole and whole["input"][2:] == follow_up  # the conversation was kept
    assert [(e["status"], e["error"]) for e in server.events("PROJ-58", 2)] == [(200, None), (200, None)]


def test_refusals_are_error_messages_and_the_socket_goes_on(server: ServerProcess, upstream: FakeUpstream) -> None:
    client = server.openai(server.new_key(owner="noa"))
    since = len(upstream.received)
    with client.responses.connect(max_retries=0) as connection:
        connection.response.create(model="gpt-4o-mini", input="hi")  # no work item anywhere
        refused = connection.recv()
        connection.response.create(model="gpt-9", input="hi", metadata={"work_item": "PROJ-53"})
        unknown_model = connection.recv()
        connection.response.create(model="fake-500", input="hi", metadata={"work_item": "PROJ-53"})
        provider_failed = connection.recv()
        connection.response.create(model="gpt-4o-mini", input="hi", metadata={"work_item": "PROJ-53"})
        answered = until_done(connection)[-1]

    assert refused.type == "error" and refused.status == 400 and refused.error.code == "work_item_required"
    assert unknown_model.type == "error" and unknown_model.status == 404 and unknown_model.error.code == "model_not_found"
    assert provider_failed.type == "error" and provider_failed.status == 500 and provider_failed.error.message == "fake provider failure"
    assert answered.type == "response.completed"
    assert len(sent_to_provider(upstream, since)) == 2  # the refused ones never left
    statuses = sorted(e["status"] for e in server.events("PROJ-53", 2))
    assert statuses == [200, 500]


def test_a_continuation_with_a_bad_input_is_refused_and_the_socket_goes_on(server: ServerProcess, upstream: FakeUpstream) -> None:
    """The conversation is expanded before admission checks the message: an `input` of the wrong type
    on a continuation is refused like any other (it closed the socket, or a dict was sent as its keys)."""
    client = server.openai(server.new_key(owner="ivo"))
    since = len(upstream.received)
    with client.responses.connect(max_retries=0) as connection:
        connection.response.create(model="gpt-4o-mini", input="hi", metadata={"work_item": "PROJ-70"})
        first = until_done(connection)[-1]
        refused = []
        for bad in (5, {"role": "user", "content": "hi"}):
            connection.response.create(model="gpt-4o-mini", input=bad, previous_response_id=first.response.id,  # type: ignore[arg-type]
                                       metadata={"work_item": "PROJ-70"})  # fmt: skip
            refused.append(connection.recv())
        connection.response.create(model="gpt-4o-mini", input="and then?", previous_response_id=first.response.id, metadata={"work_item": "PROJ-70"})
        answered = until_done(connection)[-1]
    for error in refused:
        assert error.type == "error" and error.status == 400 and error.error.code == "invalid_request" and "input" in error.error.message, error
    assert answered.type == "response.completed"
    sent = sent_to_provider(upstream, since)
    assert len(sent) == 2 and sent[1]["body"]["input"][-1] == {"role": "user", "content": "and then?"}
    assert len(server.events("PROJ-70", 2)) == 2


def test_a_socket_continues_only_its_persons_responses(server: ServerProcess, upstream: FakeUpstream) -> None:
    """An id the socket did not answer goes to the provider as it is: another person's was continued
    there. Refused as an error message, the socket going on."""
    created = server.openai(server.new_key(owner="ada")).responses.create(model="gpt-4o-mini", input="Plan it.", extra_headers={"X-Work-Item": "PROJ-71"})
    server.events("PROJ-71", 1)  # recorded: an id learnt from a log or a transcript comes later than that
    client = server.openai(server.new_key(owner="bea"))
    since = len(upstream.received)
    with client.responses.connect(max_retries=0) as connection:
        connection.response.create(model="gpt-4o-mini", input="Go on.", previous_response_id=created.id, metadata={"work_item": "PROJ-72"})
        refused = connection.recv()
        connection.response.create(model="gpt-4o-mini", input="hi", metadata={"work_item": "PROJ-72"})
        answered = until_done(connection)[-1]
    assert refused.type == "error" and refused.status == 404 and refused.error.code == "not_found" and created.id in refused.error.message, refused
    assert answered.type == "response.completed"
    assert len(sent_to_provider(upstream, since)) == 1


def test_a_bad_key_is_refused_at_the_upgrade_with_openais_error(server: ServerProcess) -> None:
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers={"Authorization": "Bearer tp-wrong"}, open_timeout=5)
    response = refused.value.response
    assert response.status_code == 401 and json.loads(response.body)["error"]["code"] == "invalid_api_key"


def test_one_key_holds_at_most_its_limit_of_sockets_and_gets_one_back_when_one_closes(server: ServerProcess) -> None:
    """Each open socket may hold a conversation and messages sent ahead: without a limit, ten sockets of
    one key held 600 MiB. The ninth upgrade of a key is refused (limits.max_sockets_per_key, 8); another
    key is not, and a socket closed, or refused, gives its place back."""
    key, other = server.new_key(owner="noa"), server.new_key(owner="ola")
    url = server.url.replace("http://", "ws://") + "/v1/responses"

    def open_socket(bearer: str) -> Any:
        return connect(url, additional_headers={"Authorization": f"Bearer {bearer}", "X-Work-Item": "PROJ-57"}, open_timeout=5)

    with ExitStack() as held:
        sockets = [held.enter_context(open_socket(key)) for _ in range(8)]
        for _ in range(2):  # a refusal takes no place
            with pytest.raises(InvalidStatus) as refused:
                open_socket(key)
            response = refused.value.response
            assert response.status_code == 429 and response.headers["retry-after"] == "5"
            error = json.loads(response.body)["error"]
            assert error["code"] == "rate_limited" and "limits.max_sockets_per_key" in error["message"], error
        with open_socket(other) as socket:  # another key's sockets are its own
            socket.send(json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"}))
            while json.loads(socket.recv(5))["type"] != "response.completed":
                pass
        sockets[0].close()
        wait_until(lambda: _accepted(open_socket, key), bool, 5)  # the server sees the close, then the place is free


def test_an_idle_socket_keeps_nothing_of_a_refused_message(server: ServerProcess) -> None:
    """A socket waiting for its next message holds its conversation, not the last message it was sent:
    three idle sockets each kept a 24 MiB message they had refused (72 MiB) until their next one."""
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    message = json.dumps({"type": "response.create", "model": "no-such-model", "input": "hello world " * 2_000_000})  # 24 MiB
    resident, _ = server.memory_mib()
    with ExitStack() as held:
        for _ in range(3):
            socket = held.enter_context(connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-65"},
                                                open_timeout=5, max_size=None))  # fmt: skip
            socket.send(message)
            refused = json.loads(socket.recv(30))
            assert refused["type"] == "error" and refused["status"] == 404, refused
        deadline = time.monotonic() + 10  # freed memory is handed back at once (these blocks are mapped apart)
        while (after := server.memory_mib()[0]) >= resident + 20 and time.monotonic() < deadline:
            time.sleep(0.25)  # the sockets still open, idle
    assert after < resident + 20, f"{after - resident:.0f} MiB more with three idle sockets"


def _accepted(open_socket: Any, key: str) -> bool:
    try:
        with open_socket(key):
            return True
    except InvalidStatus:
        return False


def test_prewarm_is_answered_without_the_provider_and_its_conversation_kept(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    since = len(upstream.received)
    with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-54"}, open_timeout=5) as socket:
        socket.send(json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "Context first.", "generate": False}))
        created, completed = json.loads(socket.recv(5)), json.loads(socket.recv(5))
        assert (created["type"], completed["type"]) == ("response.created", "response.completed")
        assert not sent_to_provider(upstream, since)
        socket.send(json.dumps({"type": "response.processed", "response_id": completed["response"]["id"]}))  # needs no answer
        socket.send(json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "Now answer.",
                                "previous_response_id": completed["response"]["id"]}))  # fmt: skip
        while json.loads(socket.recv(5))["type"] != "response.completed":
            pass
    [sent] = sent_to_provider(upstream, since)
    assert sent["body"]["input"] == [{"role": "user", "content": "Context first."}, {"role": "user", "content": "Now answer."}]
    assert len(server.events("PROJ-54", 1)) == 1


def test_a_client_leaving_mid_answer_is_recorded_and_ends_the_providers_request(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-55"}, open_timeout=5) as socket:
        socket.send(json.dumps({"type": "response.create", "model": "fake-slow", "input": "take your time"}))
        wait_until(lambda: upstream.fake.active, bool, 5)
    started = time.monotonic()
    wait_until(lambda: upstream.fake.active, lambda active: active == 0, 5)
    assert time.monotonic() - started < 1.5  # the fake waits 2 s: it was cancelled, not finished
    [event] = server.events("PROJ-55", 1)
    assert event["error"] == "client_disconnected" and event["status"] == 499


def test_a_client_closing_with_messages_waiting_behind_a_long_turn_has_its_close_answered(server: ServerProcess, upstream: FakeUpstream) -> None:
    """Messages sent while a turn runs wait for it; the socket is still read meanwhile, so the client's
    close frame is answered at once and ends the turn (uvicorn reads no further while a message it
    received waits for the app: the close went unanswered and the provider streamed on)."""
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-60"}, open_timeout=5, close_timeout=5) as socket:
        socket.send(json.dumps({"type": "response.create", "model": "fake-trickle", "input": "go on"}))
        while json.loads(socket.recv(5))["type"] != "response.output_text.delta":
            pass
        for _ in range(2):
            socket.send(json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "next"}))
        time.sleep(0.2)
        started = time.monotonic()
    assert socket.protocol.close_rcvd is not None and socket.protocol.close_rcvd.code == 1000  # answered, not given up on
    assert time.monotonic() - started < 2
    wait_until(lambda: upstream.fake.active, lambda active: active == 0, 2)
    [event] = server.events("PROJ-60", 1)
    assert event["model"] == "fake-trickle" and event["error"] == "client_disconnected"


def test_a_client_that_sends_far_ahead_of_the_answers_has_its_socket_ended(server: ServerProcess) -> None:
    """Messages sent while a turn runs wait for it, up to a bound: a client that sends faster than the
    turns run cannot make the proxy hold its messages without end. One more ends the socket (1008), and
    the turn it was waiting on is recorded."""
    from taskproxy.routes.responses_socket import MAX_WAITING_MESSAGES

    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-61"}, open_timeout=5, close_timeout=5,
                 max_queue=None) as socket:  # fmt: skip
        socket.send(json.dumps({"type": "response.create", "model": "fake-trickle", "input": "go on"}))
        while json.loads(socket.recv(5))["type"] != "response.output_text.delta":
            pass
        for _ in range(MAX_WAITING_MESSAGES + 1):
            socket.send(json.dumps({"type": "response.processed"}))
        deadline = time.monotonic() + 10  # the trickle streams on: without the bound, nothing would end it
        with pytest.raises(ConnectionClosed) as closed:
            while time.monotonic() < deadline:
                socket.recv(5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008 and "ahead" in closed.value.rcvd.reason
    [event] = server.events("PROJ-61", 1)
    assert event["model"] == "fake-trickle" and event["error"] == "client_disconnected"


def test_messages_sent_ahead_are_bounded_in_bytes_too_and_not_compressed(server: ServerProcess) -> None:
    """Sixteen messages may wait behind a turn, but not sixteen of 32 MiB: beyond the first, those waiting
    take at most limits.max_body_bytes together (three sockets of 16 × 32 MiB took a process to 1.8 GiB).
    Nor does the socket negotiate permessage-deflate, with which each of them was 32 KiB on the wire."""
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-63"}, open_timeout=5, close_timeout=5,
                 max_queue=None) as socket:  # fmt: skip
        assert socket.response.headers.get("Sec-WebSocket-Extensions") is None  # offered by the client, not taken
        socket.send(json.dumps({"type": "response.create", "model": "fake-trickle", "input": "go on"}))
        while json.loads(socket.recv(5))["type"] != "response.output_text.delta":
            pass
        big = json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "x" * (20 << 20)})
        for _ in range(2):  # 40 MiB waiting: more than the 32 MiB of max_body_bytes, in 2 messages of the 16 allowed
            socket.send(big)
        deadline = time.monotonic() + 10  # the trickle streams on: without the bound, nothing would end it
        with pytest.raises(ConnectionClosed) as closed:
            while time.monotonic() < deadline:
                socket.recv(5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008 and "MiB (limits.max_body_bytes)" in closed.value.rcvd.reason
    [event] = server.events("PROJ-63", 1)
    assert event["model"] == "fake-trickle" and event["error"] == "client_disconnected"


def test_a_provider_event_without_end_ends_the_turn_past_its_bound_not_the_process(server: ServerProcess, upstream: FakeUpstream) -> None:
    """Each provider event is one message, so the socket waits for an event's end; a provider that never
    sends one (64 MiB without a blank line) gets its answer ended past MAX_EVENT_BYTES, at once, rather
    than held whole (each chunk copied and searched again with all before it: 99 % of a core, and the
    client got nothing for 20 s and more)."""
    from taskproxy.upstream.sse import MAX_EVENT_BYTES

    upstream.fake.flood_bytes = 4 * MAX_EVENT_BYTES
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    try:
        with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-62"}, open_timeout=5) as socket:
            started = time.monotonic()
            socket.send(json.dumps({"type": "response.create", "model": "fake-unending", "input": "go on"}))
            message = json.loads(socket.recv(15))
            elapsed = time.monotonic() - started
            assert message["type"] == "error" and message["error"]["code"] == "upstream_error" and "MiB" in message["error"]["message"], message
            socket.send(json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "and now?"}))  # the socket serves on
            while (answer := json.loads(socket.recv(5)))["type"] != "response.completed":
                assert answer["type"] != "error", answer
    finally:
        upstream.fake.flood_bytes = 300 * 1024 * 1024
    assert elapsed < 5, elapsed
    events = server.events("PROJ-62", 2)
    assert [(e["model"], e["error"]) for e in sorted(events, key=lambda e: e["ts"])] == [("fake-unending", "upstream_error"), ("gpt-4o-mini", None)]


def test_a_turn_ended_by_the_server_shutting_down_is_recorded_as_such(upstream: FakeUpstream, tmp_path: Path) -> None:
    """SIGTERM while a socket waits for the provider: uvicorn closes the socket (1012) and the turn is
    recorded as ended by the proxy's shutdown, not as the client leaving."""
    config = write_config(tmp_path, upstream.url, models=[{"name": "fake-slow", "base_url": f"{upstream.url}/v1"}])
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
        key = server.new_key(owner="ode")
        url = server.url.replace("http://", "ws://") + "/v1/responses"
        with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-58"}, open_timeout=5) as socket:
            socket.send(json.dumps({"type": "response.create", "model": "fake-slow", "input": "take your time"}))
            wait_until(lambda: upstream.fake.active, bool, 5)
            server.sigterm()
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        server.process.wait(20)
    with closing(sqlite3.connect(tmp_path / "t.db")) as db:
        rows = db.execute("SELECT status, error FROM usage_events WHERE work_item = 'PROJ-58'").fetchall()
    assert rows == [(503, "proxy_shutdown")]


@pytest.mark.parametrize("run", range(3))
def test_a_turn_streaming_when_the_server_shuts_down_is_recorded_as_the_shutdown(upstream: FakeUpstream, tmp_path: Path, run: int) -> None:
    """SIGTERM while events stream to the socket (a send can fail before the 1012 close is seen): the
    turn is still the proxy's shutdown, not the client leaving; three runs, the race being a race."""
    config = write_config(tmp_path, upstream.url, models=[{"name": "fake-trickle", "base_url": f"{upstream.url}/v1"}])
    with running_server(config, tmp_path / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY)) as server:
        key = server.new_key(owner="ode")
        url = server.url.replace("http://", "ws://") + "/v1/responses"
        with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-59"}, open_timeout=5) as socket:
            socket.send(json.dumps({"type": "response.create", "model": "fake-trickle", "input": "go on"}))
            while json.loads(socket.recv(5))["type"] != "response.output_text.delta":
                pass
            time.sleep(0.05 * run)
            server.sigterm()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    socket.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        server.process.wait(20)
    with closing(sqlite3.connect(tmp_path / "t.db")) as db:
        rows = db.execute("SELECT status, error FROM usage_events WHERE work_item = 'PROJ-59'").fetchall()
    assert rows == [(200, "proxy_shutdown")]


def test_an_unknown_message_type_is_refused_by_name(server: ServerProcess) -> None:
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=5) as socket:
        socket.send(json.dumps({"type": "response.steer", "input": "faster"}))
        error = json.loads(socket.recv(5))
        socket.send("not json")
        garbled = json.loads(socket.recv(5))
    assert error["type"] == "error" and error["status"] == 400 and "response.steer" in error["error"]["message"]
    assert garbled["status"] == 400 and garbled["error"]["code"] == "invalid_request"


def test_a_stream_the_provider_cuts_ends_with_an_error_message_not_a_stall(server: ServerProcess) -> None:
    key = server.new_key(owner="noa")
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}", "X-Work-Item": "PROJ-56"}, open_timeout=5) as socket:
        socket.send(json.dumps({"type": "response.create", "model": "fake-cut", "input": "go"}))
        events = []
        while (event := json.loads(socket.recv(5)))["type"] != "error":
            events.append(event["type"])
    assert "response.output_text.delta" in events and event["status"] == 502 and event["error"]["code"] == "upstream_error"
    [recorded] = server.events("PROJ-56", 1)
    assert recorded["error"] == "upstream_error" and recorded["completion_tokens"] > 0  # what was relayed, estimated


def test_an_unexpected_error_on_a_message_is_a_500_on_the_socket_which_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug met while taking a message in (here: admission raising what it never should) answers that
    message with a 500 in the socket's error shape, as an HTTP request gets, and the socket stays open."""
    from conftest import ADMIN_KEY as INPROCESS_ADMIN_KEY
    from conftest import make_settings
    from starlette.testclient import TestClient

    from taskproxy.app import create_app
    from taskproxy.fake_provider import FakeProvider
    from taskproxy.upstream.mock import MockProvider

    app = create_app(make_settings(tmp_path), provider=MockProvider.asgi(FakeProvider().app()))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        admission = type(client.app_state["proxy"].admission)
        admit = admission.admit_message
        calls = 0

        async def broken_once(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            return await admit(self, *args, **kwargs)

        monkeypatch.setattr(admission, "admit_message", broken_once)
        headers = {"authorization": f"Bearer {INPROCESS_ADMIN_KEY}", "x-work-item": "PROJ-90"}
        with client.websocket_connect("/v1/responses", headers=headers) as socket:
            socket.send_json({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"})
            failed = socket.receive_json()
            socket.send_json({"type": "response.create", "model": "gpt-4o-mini", "input": "hi again"})
            events = []
            while not events or events[-1]["type"] not in ("response.completed", "error"):
                events.append(socket.receive_json())
    assert failed["type"] == "error" and failed["status"] == 500 and failed["error"]["code"] == "internal_error", failed
    assert events[-1]["type"] == "response.completed", events[-1]


def test_a_malformed_last_event_from_the_provider_ends_its_turn_not_the_socket(tmp_path: Path) -> None:
    """A `response.completed` whose JSON does not parse (a provider's bug, a cut) is relayed as it came
    and recorded; the socket goes on to the next message. Before, reading it for the conversation
    raised out of the socket's loop and closed the socket with an internal error (found by a review)."""
    from conftest import ADMIN_KEY as INPROCESS_ADMIN_KEY
    from conftest import make_settings
    from starlette.testclient import TestClient

    from taskproxy.app import create_app
    from taskproxy.upstream.mock import MockProvider, MockResponse

    calls: list[int] = []

    def answer(request: Any) -> MockResponse:
        calls.append(1)
        if len(calls) == 1:  # its last event lacks a closing brace
            return MockResponse.sse([b'event: response.created\ndata: {"type":"response.created","response":{"id":"r1","usage":null}}\n\n',
                                     b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r1",'
                                     b'"usage":{"input_tokens":5,"output_tokens":2}}\n\n'])  # fmt: skip
        return MockResponse.sse([b'data: {"type":"response.completed","response":{"id":"r2","output":[],'
                                 b'"usage":{"input_tokens":6,"output_tokens":3}}}\n\n'])  # fmt: skip

    app = create_app(make_settings(tmp_path), provider=MockProvider(answer))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        headers = {"authorization": f"Bearer {INPROCESS_ADMIN_KEY}", "x-work-item": "PROJ-92"}
        with client.websocket_connect("/v1/responses", headers=headers) as socket:
            socket.send_json({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"})
            first = [socket.receive_text(), socket.receive_text()]
            socket.send_json({"type": "response.create", "model": "gpt-4o-mini", "input": "hi again", "previous_response_id": "r1"})
            second = socket.receive_json()
    assert '"r1"' in first[1] and len(calls) == 2
    assert second["type"] == "response.completed" and second["response"]["id"] == "r2", second
