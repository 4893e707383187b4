"""The fake provider's Anthropic Messages API: messages (streamed or not, a tool use, an overload
mid-answer) and count_tokens."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from taskproxy.fake_provider.wire import (
    OVERLOADED_CACHE_READ,
    has_tool_result,
    json_response,
    named_event,
    prompt_tokens_of,
    reply_words,
)


class MessagesApi:
    """Routes of `FakeProvider` (which holds the state they use)."""

    received: list[dict[str, Any]]

    async def count_tokens(self, request: Request) -> Response:
        body = await self._receive(request)  # type: ignore[attr-defined]
        return json_response({"input_tokens": prompt_tokens_of(body)})

    async def messages(self, request: Request) -> Response:
        body = await self._receive(request)  # type: ignore[attr-defined]
        model = str(body.get("model", ""))
        if model == "fake-500":
            return json_response({"type": "error", "error": {"type": "api_error", "message": "fake provider failure"}}, 500)
        if model == "fake-429":
            return json_response({"type": "error", "error": {"type": "rate_limit_error", "message": "rate limited"}}, 429)
        words = reply_words(3 if model == "fake-tool" else body.get("max_tokens"))
        cache_read = OVERLOADED_CACHE_READ if model == "fake-overloaded" else 0
        usage = {"input_tokens": prompt_tokens_of(body), "output_tokens": len(words), "cache_creation_input_tokens": 0, "cache_read_input_tokens": cache_read}
        message = {"id": f"msg_fake_{len(self.received)}", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": " ".join(words)}], "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}  # fmt: skip
        if model == "fake-tool" and not has_tool_result(body.get("messages")):
            tool_use = {"type": "tool_use", "id": f"toolu_fake_{len(self.received)}", "name": "Bash",
                        "input": {"command": "echo taskproxy", "description": "Print a word"}}  # fmt: skip
            message = {**message, "content": [tool_use], "stop_reason": "tool_use", "usage": {**usage, "output_tokens": 20}}
            if body.get("stream") is not True:
                return json_response(message)
            return StreamingResponse(self._tool_use_stream(message), media_type="text/event-stream")
        if body.get("stream") is not True:
            return json_response(message)
        if model == "fake-overloaded-first":
            refused = named_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            return StreamingResponse(iter([refused]), media_type="text/event-stream")
        return StreamingResponse(self._messages_stream(message, words, model), media_type="text/event-stream")

    async def _tool_use_stream(self, message: dict):  # type: ignore[no-untyped-def]
        tool_use, usage = message["content"][0], message["usage"]
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        yield named_event("message_start", {"type": "message_start", "message": start})
        yield named_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {**tool_use, "input": {}}})
        arguments = orjson.dumps(tool_use["input"]).decode()
        for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
            yield named_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}})
        yield named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield named_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                       "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
        yield named_event("message_stop", {"type": "message_stop"})

    async def _messages_stream(self, message: dict, words: list[str], model: str):  # type: ignore[no-untyped-def]
        usage = message["usage"]
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        yield named_event("message_start", {"type": "message_start", "message": start})
        yield named_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield named_event("ping", {"type": "ping"})
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            yield named_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
            if model == "fake-cut" and i == len(words) // 2:
                raise ConnectionResetError("fake provider cut the stream")
            if model == "fake-hang":
                await asyncio.sleep(3600)
            if model == "fake-overloaded" and i == 1:
                yield named_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                return
        yield named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield named_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                       "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
        yield named_event("message_stop", {"type": "message_stop"})
