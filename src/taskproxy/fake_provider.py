"""A fake OpenAI-compatible provider for the demo, the tests and the benchmark: no network, no model.

It answers deterministically and reports usage like OpenAI does. Model names choose behaviours, so a
real `taskproxy serve` can be driven through faults on loopback:

    fake-500      answers 500 with OpenAI's error shape
    fake-429      answers 429 (rate limited)
    fake-slow     waits `FakeProvider.slow_seconds` before answering
    fake-cut      streams half the reply, then drops the connection
    fake-hang     streams one chunk, then sends nothing more
    anything else answers normally; `max_tokens` sets the number of streamed chunks (default 12)

Every request received is kept in `FakeProvider.received` (and served at GET /_fake/requests).
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

WORDS = "the proxy counted these tokens against a real work item so the spend can be read as value".split()


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

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/_fake/requests", self.requests, methods=["GET"]),
            ]
        )

    async def _receive(self, request: Request) -> dict:
        body = orjson.loads(await request.body())
        self.received.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        return body

    async def requests(self, request: Request) -> Response:
        return _json(self.received)

    async def _fault(self, model: str) -> Response | None:
        if model == "fake-500":
            return _json({"error": {"message": "fake provider failure", "type": "server_error", "param": None, "code": None}}, 500)
        if model == "fake-429":
            return _json({"error": {"message": "rate limited", "type": "rate_limit_error", "param": None, "code": "rate_limit"}}, 429)
        if model == "fake-slow":
            await asyncio.sleep(self.slow_seconds)
        return None

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        body = await self._receive(request)
        model = str(body.get("model", ""))
        if (fault := await self._fault(model)) is not None:
            return fault
        count = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else 12
        words = [WORDS[i % len(WORDS)] for i in range(max(1, count))]
        prompt = prompt_tokens_of(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words),
                 "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        base = {"id": f"fake-{len(self.received)}", "created": int(time.time()), "model": model}
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
        last = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"}
        yield _sse({**base, "object": kind, "choices": [last], **extra})
        if include_usage:
            yield _sse({**base, "object": kind, "choices": [], "usage": usage})
        yield _sse(b"[DONE]")

    async def embeddings(self, request: Request) -> Response:
        body = await self._receive(request)
        if (fault := await self._fault(str(body.get("model", "")))) is not None:
            return fault
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.125 * (j + 1) for j in range(8)]} for i in range(len(inputs))]
        prompt = prompt_tokens_of(body)
        return _json({"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
