"""A fake model provider for the demo, the tests and the benchmark: no network, no model.

It speaks OpenAI's chat, completions, embeddings and Responses APIs under /v1, and Anthropic's
Messages API (and count_tokens) at /v1/messages, answering deterministically with usage reported
the way each provider reports it. Model names choose behaviours, so a
real `taskproxy serve` can be driven through faults on loopback:

    fake-500      answers 500 with OpenAI's error shape
    fake-429      answers 429 (rate limited)
    fake-slow     waits `FakeProvider.slow_seconds` before answering
    fake-cut      streams half the reply, then drops the connection
    fake-hang     streams one chunk, then sends nothing more
    fake-trickle  streams a chunk every 0.1 s, forever
    fake-overloaded  (/v1/messages) streams message_start (with cache reads), two deltas, then
                  `event: error` overloaded_error, as Anthropic does when it is overloaded mid-answer
    fake-failed   (/v1/responses) streams response.created, a delta, then response.failed with usage
    fake-tool     asks for a shell tool (`echo taskproxy`: Bash on /v1/messages, Codex's exec_command on
                  /v1/responses) until the conversation's last item is a tool result, then answers three
                  words: an agent's tool loop, two turns
    fake-huge     reports 3,000,000,000 prompt tokens (more than a 32-bit column holds)
    fake-dribble  (chat, not streamed) sends its JSON answer a few bytes every 0.1 s, forever
    fake-flood    (chat) answers `FakeProvider.flood_bytes` of content (300 MiB by default), streamed or not
    anything else answers normally; `max_tokens` sets the number of streamed chunks (default 12)

`FakeProvider.active` counts the requests being answered right now (a request whose client hung up
stops counting at once, fake-slow's too). Every answer carries the header `vary` twice (providers do: `Vary: Origin`, `Vary: Accept-Encoding`),
to show it reaches the client as sent. Every request received is kept in `FakeProvider.received`
(path, query string, headers, body; also served at GET /_fake/requests).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WORDS = "the proxy counted these tokens against a real work item so the spend can be read as value".split()


STORED_RESPONSES = 1000


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def prompt_tokens_of(body: dict) -> int:
    """The fake's own deterministic 'tokenizer': words of every string in the prompt, plus 7."""
    def words(value: Any) -> int:
        if isinstance(value, str):
            return len(value.split())
        if isinstance(value, list):
            return sum(words(v) for v in value)
        if isinstance(value, dict):
            return sum(words(v) for v in value.values())
        return 0

    return 7 + sum(words(body.get(k)) for k in ("messages", "prompt", "input", "system", "instructions"))


@dataclass
class FakeProvider:
    slow_seconds: float = 2.0
    received: list[dict[str, Any]] = field(default_factory=list)
    failing: bool = False  # while set, every model behaves like fake-500 (a provider outage)
    flood_bytes: int = 300 * 1024 * 1024
    flood_piece_bytes: int = 256 * 1024
    flood_delay: float = 0.0  # seconds between the pieces of a flood (0: as fast as the reader takes them)
    active: int = 0
    stored: dict[str, dict] = field(default_factory=dict)  # Responses by id; a background one finishes when first read
    # A cancel that comes while a background response is generating says `cancelled` with no usage; when
    # set, the generation wins the race (as seen on Azure OpenAI) and later reads show it completed.
    cancels_lose_race: bool = False

    def app(self) -> ASGIApp:
        return _Instrumented(self, Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/responses/compact", self.compact, methods=["POST"]),
                Route("/v1/responses/input_tokens", self.input_tokens, methods=["POST"]),
                Route("/v1/responses/{response_id}", self.stored_response, methods=["GET", "DELETE"]),
                Route("/v1/responses/{response_id}/cancel", self.stored_response, methods=["POST"]),
                Route("/v1/responses/{response_id}/input_items", self.input_items, methods=["GET"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route("/_fake/requests", self.requests, methods=["GET"]),
            ]
        ))

    async def _receive(self, request: Request) -> dict:
        body = orjson.loads(await request.body())
        self.received.append({"path": request.url.path, "query": request.url.query, "headers": dict(request.headers), "body": body})
        return body

    async def requests(self, request: Request) -> Response:
        return _json(self.received)

    async def _fault(self, model: str, request: Request) -> Response | None:
        if model == "fake-500" or self.failing:
            return _json({"error": {"message": "fake provider failure", "type": "server_error", "param": None, "code": None}}, 500)
        if model == "fake-429":
            return _json({"error": {"message": "rate limited", "type": "rate_limit_error", "param": None, "code": "rate_limit"}}, 429)
        if model == "fake-slow":
            deadline = time.monotonic() + self.slow_seconds
            while time.monotonic() < deadline:  # a real provider stops generating when its client leaves
                if await request.is_disconnected():
                    return Response(status_code=499)
                await asyncio.sleep(0.05)
        return None

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        body = await self._receive(request)
        model = str(body.get("model", ""))
        if (fault := await self._fault(model, request)) is not None:
            return fault
        words = _reply_words(body.get("max_tokens"))
        prompt = HUGE_PROMPT if model == "fake-huge" else prompt_tokens_of(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words),
                 "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        base = {"id": f"fake-{len(self.received)}", "created": int(time.time()), "model": model}
        if model == "fake-dribble" and body.get("stream") is not True:
            return StreamingResponse(self._dribble(), media_type="application/json")
        if model == "fake-flood":
            flood = self._flood(request, base, usage, body.get("stream") is True)
            return StreamingResponse(flood, media_type="text/event-stream" if body.get("stream") else "application/json")
        if body.get("stream") is not True:
            text = " ".join(words)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                return _json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return _json({**base, "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage})
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        return StreamingResponse(self._stream(base, words, usage, chat, include_usage, model), media_type="text/event-stream")

    async def _stream(self, base: dict, words: list[str], usage: dict, chat: bool, include_usage: bool, model: str):  # type: ignore[no-untyped-def]
        kind = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat else {"index": 0, "text": piece, "finish_reason": None}
            yield _sse({**base, "object": kind, "choices": [choice], **extra})
            if model == "fake-cut" and i == len(words) // 2:
                raise ConnectionResetError("fake provider cut the stream")
            if model == "fake-hang":
                await asyncio.sleep(3600)
        while model == "fake-trickle":
            await asyncio.sleep(0.1)
            yield _sse({**base, "object": kind, "choices": [{"index": 0, "delta": {"content": " more"}, "finish_reason": None}], **extra})
        last = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"}
        yield _sse({**base, "object": kind, "choices": [last], **extra})
        if include_usage:
            yield _sse({**base, "object": kind, "choices": [], "usage": usage})
        yield _sse(b"[DONE]")

    async def _dribble(self):  # type: ignore[no-untyped-def]
        yield b'{"id": "dribble", "choices": ['
        while True:
            await asyncio.sleep(0.1)
            yield b" "

    async def _flood(self, request: Request, base: dict, usage: dict, stream: bool):  # type: ignore[no-untyped-def]
        piece = "x" * self.flood_piece_bytes  # made once: the fake should cost little next to the proxy it floods
        pieces = self.flood_bytes // len(piece)
        if stream:
            chunk = _sse({**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            for n in range(pieces):
                if n % 16 == 0 and await request.is_disconnected():
                    return  # the proxy hung up: stop generating, as a provider does
                if self.flood_delay:
                    await asyncio.sleep(self.flood_delay)
                yield chunk
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            yield _sse(b"[DONE]")
            return
        yield orjson.dumps({**base, "object": "chat.completion"})[:-1] + b', "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "'
        chunk = piece.encode()
        for n in range(pieces):
            if n % 16 == 0 and await request.is_disconnected():
                return
            yield chunk
        yield b'"}}], "usage": ' + orjson.dumps(usage) + b"}"

    async def embeddings(self, request: Request) -> Response:
        body = await self._receive(request)
        if (fault := await self._fault(str(body.get("model", "")), request)) is not None:
            return fault
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.125 * (j + 1) for j in range(8)]} for i in range(len(inputs))]
        prompt = prompt_tokens_of(body)
        return _json({"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})

    # -- OpenAI Responses API -------------------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        body = await self._receive(request)
        model = str(body.get("model", ""))
        if (fault := await self._fault(model, request)) is not None:
            return fault
        words = _reply_words(3 if model == "fake-tool" else body.get("max_output_tokens"))
        prompt = prompt_tokens_of(body)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + len(words)}  # fmt: skip
        text = " ".join(words)
        message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
        # In OpenAI's order: id, status and background first, then the request's instructions repeated, the
        # output, and usage last.
        done = {"id": f"resp_fake_{len(self.received)}", "object": "response", "created_at": int(time.time()), "status": "completed",
                "background": body.get("background") is True, "instructions": body.get("instructions"), "model": model,
                "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}  # fmt: skip
        if model == "fake-tool" and not _has_tool_result(body.get("input")):
            call = _function_call(body.get("tools"), len(self.received))
            done = {**done, "output": [call], "usage": {**usage, "output_tokens": 20, "total_tokens": prompt + 20}}
            if body.get("stream") is not True:
                return _json(done)
            return StreamingResponse(self._function_call_stream(done), media_type="text/event-stream")
        self.stored[done["id"]] = {"response": done, "input": body.get("input"), "generating": done["background"]}
        if len(self.stored) > STORED_RESPONSES:  # a benchmark's millions of answers are not all kept
            del self.stored[next(iter(self.stored))]
        if body.get("stream") is not True:
            if done["background"]:  # answered at once, generated "later": finished when first read back
                return _json({**done, "status": "queued", "output": [], "usage": None})
            return _json(done)
        return StreamingResponse(self._responses_stream(done, words, model), media_type="text/event-stream")

    async def _function_call_stream(self, done: dict):  # type: ignore[no-untyped-def]
        call = done["output"][0]
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        events = [
            ("response.created", {"response": started}),
            ("response.output_item.added", {"output_index": 0, "item": {**call, "status": "in_progress", "arguments": ""}}),
            ("response.function_call_arguments.delta", {"output_index": 0, "item_id": call["id"], "delta": call["arguments"]}),
            ("response.function_call_arguments.done", {"output_index": 0, "item_id": call["id"], "arguments": call["arguments"]}),
            ("response.output_item.done", {"output_index": 0, "item": call}),
            ("response.completed", {"response": done}),
        ]
        for sequence, (name, data) in enumerate(events, start=1):
            yield _named(name, {"type": name, "sequence_number": sequence, **data})

    async def compact(self, request: Request) -> Response:
        body = await self._receive(request)
        prompt = prompt_tokens_of(body)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + 5}  # fmt: skip
        compaction = {"type": "compaction", "id": "cmp_fake", "encrypted_content": "c3VtbWFyeQ=="}
        return _json({"id": f"resp_compact_{len(self.received)}", "object": "response.compaction", "created_at": int(time.time()),
                      "output": [compaction], "usage": usage})  # fmt: skip

    async def input_tokens(self, request: Request) -> Response:
        body = await self._receive(request)
        return _json({"object": "response.input_tokens", "input_tokens": prompt_tokens_of(body)})

    async def stored_response(self, request: Request) -> Response:
        self.received.append({"path": request.url.path, "query": request.url.query, "headers": dict(request.headers), "body": None})
        found = self.stored.get(request.path_params["response_id"])
        if found is None:
            return _json({"error": {"message": "No response found.", "type": "invalid_request_error", "param": None, "code": None}}, 404)
        if request.method == "DELETE":
            del self.stored[request.path_params["response_id"]]
            return _json({"id": found["response"]["id"], "object": "response.deleted", "deleted": True})
        if request.url.path.endswith("/cancel"):
            if not found["generating"]:
                found["response"] = {**found["response"], "status": "cancelled"}
                return _json(found["response"])
            cancelled = {**found["response"], "status": "cancelled", "output": [], "usage": None}  # OpenAI says nothing of what was made
            if not self.cancels_lose_race:
                found.update(response=cancelled, generating=False)
            return _json(cancelled)
        found["generating"] = False
        if request.query_params.get("stream") == "true":  # the response's events, from the first (starting_after: later)
            done = found["response"]
            words = done["output"][0]["content"][0]["text"].split() if done["output"] else []
            after = int(request.query_params.get("starting_after", 0))
            events = self._responses_stream(done, words, done["model"], starting_after=after)
            return StreamingResponse(events, media_type="text/event-stream")
        return _json(found["response"])

    async def input_items(self, request: Request) -> Response:
        found = self.stored.get(request.path_params["response_id"])
        if found is None:
            return _json({"error": {"message": "No response found.", "type": "invalid_request_error", "param": None, "code": None}}, 404)
        text = found["input"] if isinstance(found["input"], str) else ""
        item = {"id": "msg_in", "type": "message", "role": "user", "status": "completed", "content": [{"type": "input_text", "text": text}]}
        return _json({"object": "list", "data": [item], "first_id": "msg_in", "last_id": "msg_in", "has_more": False})

    async def _responses_stream(self, done: dict, words: list[str], model: str, starting_after: int = 0):  # type: ignore[no-untyped-def]
        """The whole event sequence OpenAI sends (Codex CLI needs the item and part events around the deltas);
        the events numbered up to `starting_after` are left out (a stored response's stream, resumed)."""
        message = done["output"][0]
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        sequence = 0

        def event(name: str, data: dict) -> bytes:
            nonlocal sequence
            sequence += 1
            return _named(name, {"type": name, "sequence_number": sequence, **data}) if sequence > starting_after else b""

        yield event("response.created", {"response": started})
        yield event("response.in_progress", {"response": started})
        yield event("response.output_item.added", {"output_index": 0, "item": {**message, "status": "in_progress", "content": []}})
        yield event("response.content_part.added", {**where, "part": {"type": "output_text", "text": "", "annotations": []}})
        for i, word in enumerate(words):
            yield event("response.output_text.delta", {**where, "delta": word if i == 0 else " " + word})
            if model == "fake-cut" and i == len(words) // 2:
                raise ConnectionResetError("fake provider cut the stream")
            if model == "fake-failed" and i == 1:
                error = {"code": "server_error", "message": "The model failed."}
                yield event("response.failed", {"response": {**done, "status": "failed", "error": error, "output": []}})
                return
        yield event("response.output_text.done", {**where, "text": message["content"][0]["text"]})
        yield event("response.content_part.done", {**where, "part": message["content"][0]})
        yield event("response.output_item.done", {"output_index": 0, "item": message})
        yield event("response.completed", {"response": done})

    # -- Anthropic Messages API ----------------------------------------------------------------------

    async def count_tokens(self, request: Request) -> Response:
        body = await self._receive(request)
        return _json({"input_tokens": prompt_tokens_of(body)})

    async def messages(self, request: Request) -> Response:
        body = await self._receive(request)
        model = str(body.get("model", ""))
        if model == "fake-500":
            return _json({"type": "error", "error": {"type": "api_error", "message": "fake provider failure"}}, 500)
        if model == "fake-429":
            return _json({"type": "error", "error": {"type": "rate_limit_error", "message": "rate limited"}}, 429)
        words = _reply_words(3 if model == "fake-tool" else body.get("max_tokens"))
        cache_read = OVERLOADED_CACHE_READ if model == "fake-overloaded" else 0
        usage = {"input_tokens": prompt_tokens_of(body), "output_tokens": len(words), "cache_creation_input_tokens": 0, "cache_read_input_tokens": cache_read}
        message = {"id": f"msg_fake_{len(self.received)}", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": " ".join(words)}], "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}  # fmt: skip
        if model == "fake-tool" and not _has_tool_result(body.get("messages")):
            tool_use = {"type": "tool_use", "id": f"toolu_fake_{len(self.received)}", "name": "Bash",
                        "input": {"command": "echo taskproxy", "description": "Print a word"}}  # fmt: skip
            message = {**message, "content": [tool_use], "stop_reason": "tool_use", "usage": {**usage, "output_tokens": 20}}
            if body.get("stream") is not True:
                return _json(message)
            return StreamingResponse(self._tool_use_stream(message), media_type="text/event-stream")
        if body.get("stream") is not True:
            return _json(message)
        return StreamingResponse(self._messages_stream(message, words, model), media_type="text/event-stream")

    async def _tool_use_stream(self, message: dict):  # type: ignore[no-untyped-def]
        tool_use, usage = message["content"][0], message["usage"]
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        yield _named("message_start", {"type": "message_start", "message": start})
        yield _named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {**tool_use, "input": {}}})
        arguments = orjson.dumps(tool_use["input"]).decode()
        for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
            yield _named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}})
        yield _named("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                       "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
        yield _named("message_stop", {"type": "message_stop"})

    async def _messages_stream(self, message: dict, words: list[str], model: str):  # type: ignore[no-untyped-def]
        usage = message["usage"]
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        yield _named("message_start", {"type": "message_start", "message": start})
        yield _named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield _named("ping", {"type": "ping"})
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            yield _named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
            if model == "fake-cut" and i == len(words) // 2:
                raise ConnectionResetError("fake provider cut the stream")
            if model == "fake-hang":
                await asyncio.sleep(3600)
            if model == "fake-overloaded" and i == 1:
                yield _named("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                return
        yield _named("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                       "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
        yield _named("message_stop", {"type": "message_stop"})


HUGE_PROMPT = 3_000_000_000
OVERLOADED_CACHE_READ = 20_143


class _Instrumented:
    """Counts the requests being answered, and adds `vary: Origin` and `vary: Accept-Encoding` to every
    answer as two headers."""

    def __init__(self, fake: FakeProvider, app: ASGIApp) -> None:
        self.fake, self.app = fake, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_vary(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"vary", b"Origin"), (b"vary", b"Accept-Encoding")]}
            await send(message)

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.fake.active += 1
        try:
            await self.app(scope, receive, send_with_vary)
        finally:
            self.fake.active -= 1


def _function_call(tools: object, number: int) -> dict:
    """A call of the agent's shell tool (Codex's `exec_command`, else `shell`, else the first function)."""
    names = [t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"] if isinstance(tools, list) else []
    if "exec_command" in names:
        name, arguments = "exec_command", {"cmd": "echo taskproxy"}
    elif "shell" in names or not names:
        name, arguments = "shell", {"command": ["echo", "taskproxy"]}
    else:
        name, arguments = names[0], {}
    return {"type": "function_call", "id": f"fc_fake_{number}", "call_id": f"call_fake_{number}", "name": name,
            "arguments": orjson.dumps(arguments).decode(), "status": "completed"}  # fmt: skip


def _has_tool_result(messages: object) -> bool:
    """The conversation's last message answers a tool call (Anthropic's tool_result, OpenAI's function_call_output)."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return False
    last = messages[-1]
    content = last.get("content")
    return last.get("type") == "function_call_output" or (
        isinstance(content, list) and any(isinstance(block, dict) and block.get("type") == "tool_result" for block in content))


def _reply_words(count: object) -> list[str]:
    n = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 12
    return [WORDS[i % len(WORDS)] for i in range(n)]


def _named(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\n" + _sse(data)
