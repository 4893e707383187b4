"""The Responses API over a WebSocket on `/v1/responses`: Codex CLI's default transport, and the
openai SDK's `responses.connect()`.

Each `response.create` message is one request, admitted and recorded exactly like a POST: the key and
the work item come from the upgrade request's headers (`X-Work-Item`, `X-Git-Branch`, the key's
binding), and a message's own `metadata.work_item` wins for that message. It is sent to the provider
as a streamed `POST /responses`, so any OpenAI-compatible provider serves it, and each event of the
provider's stream goes back as one text message. `response.processed` (Codex's acknowledgement) needs
no answer; `generate: false` (Codex's prewarm) is answered here without a provider (`_prewarm`). A refused or failed request is answered with an `error` message carrying the HTTP status it
stands for, and the socket stays open for the next one.

A request may continue the previous one by `previous_response_id` and send only the new input items
(Codex does, with `store: false`): the socket keeps the last request's input and its response's
output, and sends the provider the whole conversation, as OpenAI's own WebSocket server does. An id
this socket did not answer goes to the provider as it is (a stored response).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from functools import partial

import orjson
from starlette.datastructures import Headers
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from taskproxy.connections import POLICY_VIOLATION
from taskproxy.error_shapes import error_response, socket_error
from taskproxy.errors import ApiError, InternalError, InvalidRequest, RateLimited, RequestTooLarge, ServiceUnavailable, UpstreamError, UpstreamTimeout
from taskproxy.jsonbytes import has_usage_object
from taskproxy.guard.attribution import body_work_item, strip_work_item
from taskproxy.guard.body import LARGE_BODY_BYTES, Undecodable, decode_json_object
from taskproxy.guard.per_key import PerKey
from taskproxy.metering.attempts import Attempt, Caller
from taskproxy.metering.usage import Rejected
from taskproxy.routes.admission import Admitted
from taskproxy.routes.endpoint import Endpoint
from taskproxy.routes.socket_conversation import TOO_MANY_VALUES, Conversation, decoded
from taskproxy.routes.proxy import RETRIED_STATUSES, ProxyFlow, encode_body
from taskproxy.settings import LimitSettings, ModelSettings
from taskproxy.timeutil import utcnow
from taskproxy.upstream import observe
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.provider import ProviderReply, ProviderRequest, upstream_headers
from taskproxy.upstream.relay import CLIENT_DISCONNECTED, SHUTDOWN
from taskproxy.upstream.sse import MAX_EVENT_BYTES, EventBuffer, iter_events

log = logging.getLogger("taskproxy.proxy")
NOT_FORWARDED = ("type", "stream_id", "generate")  # the socket's envelope, not the request's
# Messages a client may send ahead of the response in progress: at most 16, together at most one body's
# worth (limits.max_body_bytes; a single one may be that large); past either the socket is ended.
MAX_WAITING_MESSAGES = 16


async def responses_socket(websocket: WebSocket, endpoint: Endpoint) -> None:
    flow: ProxyFlow = websocket.state.proxy
    sockets: PerKey = websocket.state.key_sockets
    key_id = None
    try:
        key_id = (await flow.admission.keys.authenticate(websocket.headers)).key_id  # refused at the upgrade, in the HTTP route's shape
        if sockets.take(key_id) is None:
            raise RateLimited(f"This key has {sockets.limit} WebSockets open, its limit (limits.max_sockets_per_key); close one first.", retry_after=5)
    except ApiError as exc:
        flow.admission.writer.submit(Rejected(utcnow(), key_id, exc.code, endpoint.path))
        await websocket.send_denial_response(error_response(exc))
        return
    try:
        await _serve(websocket, flow, endpoint, key_id)
    finally:
        sockets.give_back(key_id)


async def _serve(websocket: WebSocket, flow: ProxyFlow, endpoint: Endpoint, key_id: str) -> None:
    headers = websocket.headers
    await websocket.accept()
    conversation = Conversation()
    # One request at a time, as the API serves a socket, and the socket read all along: uvicorn reads no
    # further frame (a close included) while a message it has received waits for the app, so a message
    # sent during a turn is taken at once and waits here, and the client leaving ends the turn at once.
    waiting: deque[str | bytes] = deque()
    waiting_bytes, most_waiting_bytes = 0, flow.settings.limits.max_body_bytes  # as len() counts them: a text's characters
    turn: asyncio.Task[None] | None = None
    receiving = asyncio.create_task(websocket.receive())
    try:
        while True:
            # No local here refers to a message once it is handed on: an idle socket must hold its
            # conversation, not the last message too (three idle sockets kept 24 MiB each).
            if turn is None and waiting:
                waiting_bytes -= len(waiting[0])
                turn = asyncio.create_task(_message(websocket, flow, endpoint, headers, conversation, waiting.popleft()))
            await asyncio.wait({receiving} if turn is None else {receiving, turn}, return_when=asyncio.FIRST_COMPLETED)
            if receiving.done() and receiving.result()["type"] == "websocket.disconnect":
                if turn is not None:
                    await _end_turn(turn, _ended_by(receiving.result()))
                    turn = None
                break
            if receiving.done():
                payload = _payload(receiving.result())
                receiving = asyncio.create_task(websocket.receive())
                if len(waiting) == MAX_WAITING_MESSAGES or (waiting and waiting_bytes + len(payload) > most_waiting_bytes):
                    # A client that does not wait for its answers: the socket is ended.
                    flow.admission.writer.submit(Rejected(utcnow(), key_id, RateLimited.code, endpoint.path))
                    if turn is not None:
                        await _end_turn(turn, CLIENT_DISCONNECTED)
                        turn = None
                    over = f"{MAX_WAITING_MESSAGES} messages" if len(waiting) == MAX_WAITING_MESSAGES else f"{most_waiting_bytes >> 20} MiB (limits.max_body_bytes)"
                    await websocket.close(POLICY_VIOLATION, f"more than {over} sent ahead of the answers")
                    break
                waiting.append(payload)
                waiting_bytes += len(payload)
                payload = b""
            if turn is not None and turn.done():
                finished, turn = turn, None
                try:
                    finished.result()
                except _SocketClosed as closed:
                    await _record_close(closed, receiving)
                    break
    finally:
        if not receiving.done():
            receiving.cancel()
        if turn is not None:  # this handler was cancelled (the server stopped waiting for it): the turn too, recorded
            await _end_turn(turn, SHUTDOWN)
        if websocket.application_state == WebSocketState.CONNECTED and websocket.client_state == WebSocketState.CONNECTED:
            try:
                await websocket.close()
            except (RuntimeError, OSError):
                pass


def _payload(message: dict) -> str | bytes:
    return message.get("text") or message.get("bytes") or b""


async def _message(websocket: WebSocket, flow: ProxyFlow, endpoint: Endpoint, headers: Headers, conversation: Conversation, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    try:
        if len(raw) > flow.settings.limits.max_body_bytes:
            raise RequestTooLarge(f"The message is larger than {flow.settings.limits.max_body_bytes} bytes (limits.max_body_bytes).")
        if len(raw) > LARGE_BODY_BYTES:  # as a large HTTP body is: a few decoded at a time in the process
            async with flow.admission.body_gate.large():
                message = await decode_json_object(raw, flow.settings.limits.max_json_nodes)
        else:
            message = await decode_json_object(raw, flow.settings.limits.max_json_nodes)
        if isinstance(message, Undecodable):
            raise InvalidRequest(message.reason)
        kind = message.get("type")
        if kind == "response.processed":  # Codex's acknowledgement of a finished response
            return
        if kind != "response.create":
            raise InvalidRequest(f"taskproxy's Responses WebSocket takes 'response.create' messages, not {str(kind)[:60]!r}.", param="type")
        body = {k: v for k, v in message.items() if k not in NOT_FORWARDED}
        added = conversation.expand(body)
        body["stream"] = True
        raw = await encode_body(body, len(raw) + added)
        if len(raw) > flow.settings.limits.max_body_bytes:
            raise RequestTooLarge(f"The conversation is larger than {flow.settings.limits.max_body_bytes} bytes (limits.max_body_bytes).")
        admitted = await flow.admission.admit_message(_for_message(headers, body), raw, body, endpoint)
    except ApiError as exc:
        await _send(websocket, socket_error(exc))
        return
    except Exception:  # a bug: this message gets a 500, as an HTTP request would, and the socket stays open
        log.exception("unexpected error on a Responses WebSocket message")
        await _send(websocket, socket_error(InternalError("The proxy failed unexpectedly; the error is logged.")))
        return
    strip_work_item(admitted.body)
    if message.get("generate") is False:
        await _prewarm(websocket, admitted, conversation)
        return
    await _forward(websocket, flow, endpoint, admitted, conversation)


def _for_message(headers: Headers, body: dict) -> Headers:
    """The upgrade's headers, as this message's: a message naming its own work item (metadata.work_item)
    is billed to it, over the work item the connection was opened with."""
    if body_work_item(body) is None:  # absent or null: the connection's, as a POST with that body would be
        return headers
    return Headers(raw=[(k, v) for k, v in headers.raw if k.lower() not in (b"x-work-item", b"x-git-branch")])


async def _prewarm(websocket: WebSocket, admitted: Admitted, conversation: Conversation) -> None:
    """`generate: false` (Codex's prewarm) asks the server to take the conversation in without generating.
    A provider's HTTP API has no such request: it is answered here, nothing is sent or billed, and the
    conversation is kept so that the request continuing it is sent whole."""
    response = {"id": f"resp_taskproxy_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": admitted.client_model or admitted.model.name, "output": [],
                "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}}  # fmt: skip
    conversation.remember(admitted.body, response, len(admitted.raw))
    await _send(websocket, orjson.dumps({"type": "response.created", "sequence_number": 0, "response": {**response, "status": "in_progress"}}))
    await _send(websocket, orjson.dumps({"type": "response.completed", "sequence_number": 1, "response": response}))


async def _forward(websocket: WebSocket, flow: ProxyFlow, endpoint: Endpoint, admitted: Admitted, conversation: Conversation) -> None:
    """Each model of the chain in turn, as POST /v1/responses does, until one answers."""
    body = admitted.body
    fallbacks = (flow.settings.model(name) for name in admitted.model.fallbacks)
    chain = [admitted.model, *(m for m in fallbacks if m is not None and endpoint.reaches(m))]
    principal, attributed = admitted.principal, admitted.attributed
    caller = Caller(principal.key_id, principal.owner, principal.team, attributed.work_item, attributed.source)
    for number, model in enumerate(chain, start=1):
        attempt = flow.attempts.begin(
            caller, ts=admitted.ts, started=admitted.started, body=body, user_agent=websocket.headers.get("user-agent"),
            route=endpoint.path, usage_of=endpoint.usage_of, model=model, stream=True, number=number,
            weight=len(admitted.raw) if number == 1 else 0,  # a fallback's attempt holds the same body
        )  # fmt: skip
        more = number < len(chain)
        capture, data, first_byte = Capture(), b"", None
        reply: ProviderReply | None = None
        try:
            reply = await _post(flow, websocket.headers, body, len(admitted.raw), model)
            if not reply.is_event_stream:
                if more and reply.status in RETRIED_STATUSES:  # as over HTTP: the next model, this body unread
                    await reply.close()
                    attempt.record_once(status=reply.status)
                    continue
                data, first_byte = await _read_body(attempt, reply, model, capture, flow.settings.limits.max_buffered_response_bytes)
        except ApiError as exc:
            attempt.record_once(status=exc.status, error=exc.code)
            if more and exc.status in RETRIED_STATUSES and reply is None:  # not once the provider answered: its work is done, and billed
                continue
            await _send(websocket, socket_error(exc))
            return
        except asyncio.CancelledError as exc:
            why = _why(exc)
            attempt.record_once(status=499 if why == CLIENT_DISCONNECTED else ServiceUnavailable.default_status, error=why)
            raise
        except Exception:  # a bug: the request may have been forwarded, so it is recorded, as over HTTP
            attempt.record_once(status=500, error="internal_error")
            raise
        if not reply.is_event_stream:
            if 200 <= reply.status < 300:
                await _answered(websocket, attempt, reply, capture, data, first_byte, body, len(admitted.raw), conversation, flow.settings.limits)
            else:
                await _refused(websocket, attempt, reply, data, first_byte)
            return
        await _relay(websocket, attempt, reply, model, body, len(admitted.raw), conversation, flow.settings.limits)
        return


async def _post(flow: ProxyFlow, client_headers: Headers, body: dict, size: int, model: ModelSettings) -> ProviderReply:
    body["model"] = model.target_model
    content = await encode_body(body, size)
    api_key = model.api_key.get_secret_value() if model.api_key else None
    headers = [(name, value) for name, value in upstream_headers(client_headers, api_key) if not name.startswith(b"sec-websocket-")
               and not (name == b"openai-beta" and b"websocket" in value)]  # fmt: skip
    try:  # its status and headers within max_stream_seconds, as on HTTP (routes/proxy.py)
        async with asyncio.timeout(model.max_stream_seconds):
            return await flow.provider.send(ProviderRequest(model, f"{model.base_url}/responses", headers, content, stream=True))
    except TimeoutError:
        raise UpstreamTimeout(f"The provider of '{model.name}' did not answer within {model.max_stream_seconds:.0f} s (max_stream_seconds).") from None


async def _read_body(attempt: Attempt, reply: ProviderReply, model: ModelSettings, capture: Capture, most: int) -> tuple[bytes, float | None]:
    """A reply that is not a stream, read within max_response_seconds of the request's start, as over HTTP,
    and closed however the read ends. A successful answer is read to its end (the capture keeps its ends
    for its usage), at most its first `most` bytes kept; of an error, its first 64 KiB."""
    answer = 200 <= reply.status < 300
    if answer:
        attempt.exchange.answered = True
        attempt.exchange.observe = partial(observe.responses_body, capture)
    keep = most if answer else ERROR_BODY_BYTES
    parts: list[bytes] = []
    first_byte: float | None = None
    try:
        async with asyncio.timeout(max(0.0, attempt.started + model.max_response_seconds - time.perf_counter())):
            async for chunk in reply.chunks:
                first_byte = first_byte or time.perf_counter()
                capture.add(chunk)
                if capture.total - len(chunk) < keep:
                    parts.append(chunk)
                elif not answer:
                    break
    except TimeoutError:
        raise UpstreamTimeout(f"The provider of '{model.name}' did not finish its answer within {model.max_response_seconds:.0f} s "
                              "(max_response_seconds).") from None  # fmt: skip
    finally:
        await reply.close()
    if answer:
        attempt.meter.saw(capture.recent())
    return b"".join(parts), first_byte


ERROR_BODY_BYTES = 64 * 1024  # of a provider's error, what is read for its message


async def _refused(websocket: WebSocket, attempt: Attempt, reply: ProviderReply, data: bytes, first_byte: float | None) -> None:
    """The provider answered with an error (or a status that is not one of success): its error, with its status."""
    status = reply.status if reply.status >= 400 else 502
    attempt.record_once(status=status, error=None if reply.status >= 400 else UpstreamError.code, first_byte=first_byte)
    try:
        error = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        error = {"message": f"The provider answered {reply.status} without a stream.", "type": "upstream_error", "param": None, "code": "upstream_error"}
    await _send(websocket, orjson.dumps({"type": "error", "status": status, "error": error}))


async def _answered(
    websocket: WebSocket, attempt: Attempt, reply: ProviderReply, capture: Capture, data: bytes, first_byte: float | None, body: dict, size: int,
    conversation: Conversation, limits: LimitSettings,
) -> None:  # fmt: skip
    """A provider that answered the streamed request with the whole response (a JSON body, not events):
    billed from its body as over HTTP, and sent as a stream's events would carry it, its last event
    (`response.completed`, `.incomplete`, `.failed`) after `response.created`. A body that is no
    finished response, or too large to relay as events (past the bytes kept, or `limits.max_json_nodes`
    values: decoding 1.4 million empty arrays took 0.7 s and kept them all for the next turn), is billed
    all the same, and answered with an error."""
    too_many = False
    if capture.total > len(data):
        response = None
    else:
        response = await decoded(data, limits.max_json_nodes)
        too_many = response is TOO_MANY_VALUES
    status = response.get("status") if isinstance(response, dict) else None
    if not isinstance(response, dict) or not isinstance(status, str) or status not in observe.FINISHED:
        what = "too large to relay" if capture.total > len(data) or too_many else "not a finished response"
        refused = UpstreamError(f"The provider answered {reply.status} with a body, not an event stream, {what}; it is billed as answered.")
        attempt.record_once(status=refused.status, error=refused.code, first_byte=first_byte)
        await _send(websocket, socket_error(refused))
        return
    attempt.record_once(status=reply.status, first_byte=first_byte)
    created = {**response, "status": "in_progress", "output": [], "usage": None}
    await _send(websocket, orjson.dumps({"type": "response.created", "sequence_number": 0, "response": created}))
    await _send(websocket, orjson.dumps({"type": f"response.{status}", "sequence_number": 1, "response": response}))
    conversation.remember(body, response, size + len(data))


async def _relay(
    websocket: WebSocket, attempt: Attempt, reply: ProviderReply, model: ModelSettings, body: dict, size: int, conversation: Conversation,
    limits: LimitSettings,
) -> None:
    """The provider's events, one message each; usage is metered as it passes and recorded once."""
    capture, exchange, meter = Capture(), attempt.exchange, attempt.meter
    exchange.answered = True
    exchange.observe = partial(observe.responses_stream, capture)
    events, first_byte, error, last, failed = EventBuffer(), None, None, b"", False
    try:
        async with asyncio.timeout(model.max_stream_seconds):
            async for chunk in reply.chunks:
                first_byte = first_byte or time.perf_counter()
                capture.add(chunk)
                if meter.pending or has_usage_object(chunk):
                    meter.saw(capture.around(chunk))
                complete = events.feed(chunk)
                if events.held > MAX_EVENT_BYTES:  # each event is one message: one without end cannot be sent
                    raise UpstreamError(f"The provider sent an event of more than {MAX_EVENT_BYTES >> 20} MiB without its end; the answer was ended.")
                if not complete:
                    continue
                for _, data in iter_events(complete):
                    if data == b"[DONE]":
                        continue
                    if observe.is_terminal(data):
                        last = data
                    # The provider's `error` ends the response, as OpenAI's own socket does: nothing after
                    # it is sent, nor an error of the proxy's, which the client would read as its next answer's.
                    failed = failed or observe.is_error(data)
                    await websocket.send_text(data.decode("utf-8", "replace"))
                    if failed:
                        break
                if failed:
                    break
    except TimeoutError:
        timeout = UpstreamTimeout(f"The answer took longer than {model.max_stream_seconds:.0f} s and was ended (max_stream_seconds).")
        error = timeout.code
        await _send(websocket, socket_error(timeout))
    except ApiError as exc:
        error = exc.code
        await _send(websocket, socket_error(exc))
    except asyncio.CancelledError as exc:
        # Its last event relayed, the answer was whole: a client (or the server) leaving while the
        # provider has yet to close its stream ends nothing the client did not get.
        attempt.record_once(status=200, error=None if last and not failed else _why(exc), first_byte=first_byte)
        await reply.close()
        raise
    except (WebSocketDisconnect, OSError, RuntimeError):
        # The socket closed under a send. Whether the server is shutting down or the client left, only
        # the receive watching the socket learns (its close code), maybe a moment later: the loop that
        # owns it records the turn then.
        await reply.close()
        raise _SocketClosed(partial(attempt.record_once, status=200, first_byte=first_byte)) from None
    await reply.close()
    if not last and not failed and error is None:  # ended without its last event: the client would wait for it forever
        cut = UpstreamError("The provider's stream ended before the response was complete.")
        error = cut.code
        await _send(websocket, socket_error(cut))
    attempt.record_once(status=200, error=error, first_byte=first_byte)
    if last:
        await conversation.remember_last_event(body, last, size, limits)


SERVICE_RESTART = 1012  # the close code uvicorn sends every socket when the server shuts down
CLOSE_WAIT_SECONDS = 2.0  # after a failed send, how long the receive may take to say why the socket closed


async def _end_turn(turn: asyncio.Task[None], reason: str) -> None:
    """The client left (or the server is closing the socket): the turn, if it still runs, is cancelled
    with `reason`, and it is recorded with it whichever way it ends."""
    if not turn.done():
        turn.cancel(reason)
    await asyncio.wait({turn})
    if turn.cancelled():
        return  # it recorded itself (`_why`)
    if isinstance(error := turn.exception(), _SocketClosed):
        error.record(error=reason)
    elif error is not None:
        log.error("a Responses WebSocket turn failed as its socket closed", exc_info=error)


class _SocketClosed(Exception):  # control flow inside this module, never rendered
    """A turn's send found the socket closed; `record(error=...)` records the turn once the reason is known."""

    def __init__(self, record: Callable[..., object]) -> None:
        super().__init__("the socket closed under a send")
        self.record = record


async def _record_close(closed: _SocketClosed, receiving: asyncio.Task[dict]) -> None:
    """Record a turn whose send failed, with what the socket's disconnect says (`_ended_by`): a send can
    fail on a socket the server is closing for its shutdown before the receive sees the 1012 close."""
    reason = CLIENT_DISCONNECTED
    try:
        done, _ = await asyncio.wait({receiving}, timeout=CLOSE_WAIT_SECONDS)
        if done and not receiving.cancelled() and receiving.exception() is None and receiving.result()["type"] == "websocket.disconnect":
            reason = _ended_by(receiving.result())
    except asyncio.CancelledError:
        reason = SHUTDOWN  # the server stopped waiting for this handler
        raise
    finally:
        closed.record(error=reason)


def _ended_by(disconnect: dict) -> str:
    """Why a socket closed while a turn ran: the server shutting down (it closes every socket with 1012
    first), else the client leaving. The turn is cancelled with it, and records it."""
    return SHUTDOWN if disconnect.get("code") == SERVICE_RESTART else CLIENT_DISCONNECTED


def _why(exc: asyncio.CancelledError) -> str:
    """What cancelled a turn: the reason `_ended_by` gave it, else the client is gone."""
    return SHUTDOWN if exc.args and exc.args[0] == SHUTDOWN else CLIENT_DISCONNECTED


async def _send(websocket: WebSocket, data: bytes) -> None:
    try:
        await websocket.send_text(data.decode())
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass
