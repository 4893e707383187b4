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
    fake-trickle  streams a chunk (a Responses delta) every 0.1 s, forever
    fake-overloaded  (/v1/messages) streams message_start (with cache reads), two deltas, then
                  `event: error` overloaded_error, as Anthropic does when it is overloaded mid-answer
    fake-overloaded-first  (/v1/messages, streamed) answers 200 and an event stream whose only event is
                  `event: error` overloaded_error: refused in-band, before anything was generated
    fake-failed   (/v1/responses) streams response.created, a delta, then response.failed with usage
    fake-type-last (/v1/responses) streams its events with `type` last, after the response (the field order
                  of the openai SDK's own event classes, which some providers serialize)
    fake-tool     asks for a shell tool (`echo taskproxy`: Bash on /v1/messages, Codex's exec_command on
                  /v1/responses) until the conversation's last item is a tool result, then answers three
                  words: an agent's tool loop, two turns
    fake-huge     reports 3,000,000,000 prompt tokens (more than a 32-bit column holds)
    fake-dribble  (chat, not streamed) sends its JSON answer a few bytes every 0.1 s, forever
    fake-stalled-read (Responses) is created at once; each read of it back (GET, cancel, input_items,
                  DELETE) sends no status or headers until its client hangs up (to the proxy's deadline,
                  the same as headers sent a byte at a time, each within the read timeout)
    fake-flood    (chat) answers `FakeProvider.flood_bytes` of content (300 MiB by default), streamed or not
    fake-unending (chat, Responses; streamed) sends one event of `FakeProvider.flood_bytes` that never ends
                  (no blank line), then closes the stream
    fake-gzip     answers its JSON gzip-compressed (`Content-Encoding: gzip`), though none was asked for
    fake-html     answers 200 with an HTML page (a load balancer's, say)
    fake-usage-junk  (chat, streamed) sends `FakeProvider.flood_bytes` of events, each with a `"usage": {`
                  that never ends (not JSON), then its real usage: a provider's bug the meter must not choke on
    fake-usage-flood (chat, streamed) sends `FakeProvider.flood_bytes` of usage-only chunks (`"choices": []`,
                  its usage), as a provider sending usage with every chunk might, whether or not it was asked
    anything else answers normally; `max_tokens` sets the number of streamed chunks (default 12)

`FakeProvider.active` counts the requests being answered right now (a request whose client hung up
stops counting at once, fake-slow's too). Every answer carries the header `vary` twice (providers do: `Vary: Origin`, `Vary: Accept-Encoding`),
to show it reaches the client as sent. Every request received is kept in `FakeProvider.received`
(path, query string, headers, body; also served at GET /_fake/requests).

This module holds the provider's state and OpenAI's chat, completions and embeddings;
`responses_api.py` the Responses API, `messages_api.py` Anthropic's, `wire.py` what they share.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskproxy.fake_provider.messages_api import MessagesApi
from taskproxy.fake_provider.responses_api import ResponsesApi
from taskproxy.fake_provider.wire import HUGE_PROMPT, OVERLOADED_CACHE_READ, json_response, prompt_tokens_of, reply_words, sse

__all__ = ["HUGE_PROMPT", "OVERLOADED_CACHE_READ", "FakeProvider", "prompt_tokens_of"]


@dataclass
class FakeProvider(ResponsesApi, MessagesApi):
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
        return json_response(self.received)

    async def _fault(self, model: str, request: Request) -> Response | None:
        if model == "fake-500" or self.failing:
            return json_response({"error": {"message": "fake provider failure", "type": "server_error", "param": None, "code": None}}, 500)
        if model == "fake-429":
            return json_response({"error": {"message": "rate limited", "type": "rate_limit_error", "param": None, "code": "rate_limit"}}, 429)
        if model == "fake-gzip":
            body = gzip.compress(orjson.dumps({"id": "gz", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 1}}))
            return Response(body, media_type="application/json", headers={"content-encoding": "gzip"})
        if model == "fake-html":
            return Response(b"<html><body><h1>Welcome to nginx!</h1></body></html>", media_type="text/html")
        if model == "fake-unending":
            return StreamingResponse(self._unending(request), media_type="text/event-stream")
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
        words = reply_words(body.get("max_tokens"))
        prompt = HUGE_PROMPT if model == "fake-huge" else prompt_tokens_of(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words),
                 "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        base = {"id": f"fake-{len(self.received)}", "created": int(time.time()), "model": model}
        if model == "fake-dribble" and body.get("stream") is not True:
            return StreamingResponse(self._dribble(), media_type="application/json")
        if model in ("fake-usage-junk", "fake-usage-flood"):
            return StreamingResponse(self._usage_flood(request, base, usage, junk=model == "fake-usage-junk"), media_type="text/event-stream")
        if model == "fake-flood":
            flood = self._flood(request, base, usage, body.get("stream") is True)
            return StreamingResponse(flood, media_type="text/event-stream" if body.get("stream") else "application/json")
        if body.get("stream") is not True:
            text = " ".join(words)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                return json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return json_response({**base, "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage})
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        return StreamingResponse(self._stream(base, words, usage, chat, include_usage, model), media_type="text/event-stream")

    async def _stream(self, base: dict, words: list[str], usage: dict, chat: bool, include_usage: bool, model: str):  # type: ignore[no-untyped-def]
        kind = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat else {"index": 0, "text": piece, "finish_reason": None}
            yield sse({**base, "object": kind, "choices": [choice], **extra})
            if model == "fake-cut" and i == len(words) // 2:
                raise ConnectionResetError("fake provider cut the stream")
            if model == "fake-hang":
                await asyncio.sleep(3600)
        while model == "fake-trickle":
            await asyncio.sleep(0.1)
            yield sse({**base, "object": kind, "choices": [{"index": 0, "delta": {"content": " more"}, "finish_reason": None}], **extra})
        last = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"}
        yield sse({**base, "object": kind, "choices": [last], **extra})
        if include_usage:
            yield sse({**base, "object": kind, "choices": [], "usage": usage})
        yield sse(b"[DONE]")

    async def _dribble(self):  # type: ignore[no-untyped-def]
        yield b'{"id": "dribble", "choices": ['
        while True:
            await asyncio.sleep(0.1)
            yield b" "

    async def _flood(self, request: Request, base: dict, usage: dict, stream: bool):  # type: ignore[no-untyped-def]
        piece = "x" * self.flood_piece_bytes  # made once: the fake should cost little next to the proxy it floods
        pieces = self.flood_bytes // len(piece)
        if stream:
            chunk = sse({**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            for n in range(pieces):
                if n % 16 == 0 and await request.is_disconnected():
                    return  # the proxy hung up: stop generating, as a provider does
                if self.flood_delay:
                    await asyncio.sleep(self.flood_delay)
                yield chunk
            yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            yield sse(b"[DONE]")
            return
        yield orjson.dumps({**base, "object": "chat.completion"})[:-1] + b', "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "'
        chunk = piece.encode()
        for n in range(pieces):
            if n % 16 == 0 and await request.is_disconnected():
                return
            yield chunk
        yield b'"}}], "usage": ' + orjson.dumps(usage) + b"}"

    async def _usage_flood(self, request: Request, base: dict, usage: dict, junk: bool):  # type: ignore[no-untyped-def]
        if junk:
            head = orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
            event = b"data: " + head[:-1] + b', "usage": {"note": "' + b"u" * 160 + b"\n\n"
        else:
            event = sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        block = event * 256  # made once: the fake should cost little next to the proxy it floods
        for n in range(self.flood_bytes // len(block)):
            if n % 16 == 0 and await request.is_disconnected():
                return
            yield block
        yield sse({**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
        yield sse(b"[DONE]")

    async def _unending(self, request: Request):  # type: ignore[no-untyped-def]
        yield b'data: {"type": "response.output_text.delta", "choices": [{"index": 0, "delta": {"content": "'
        piece = b"x" * self.flood_piece_bytes
        for n in range(self.flood_bytes // len(piece)):
            if n % 16 == 0 and await request.is_disconnected():
                return
            if self.flood_delay:
                await asyncio.sleep(self.flood_delay)
            yield piece

    async def embeddings(self, request: Request) -> Response:
        body = await self._receive(request)
        if (fault := await self._fault(str(body.get("model", "")), request)) is not None:
            return fault
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.125 * (j + 1) for j in range(8)]} for i in range(len(inputs))]
        prompt = prompt_tokens_of(body)
        return json_response({"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})


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
