"""The fake provider's OpenAI Responses API: create (streamed, background, a tool call), compact,
input_tokens, and stored responses (read, streamed again from an event, cancelled, deleted)."""

from __future__ import annotations

import asyncio

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from taskproxy.fake_provider.wire import (
    STORED_RESPONSES,
    function_call,
    has_tool_result,
    json_response,
    named_event,
    prompt_tokens_of,
    reply_words,
)


class ResponsesApi:
    """Routes of `FakeProvider` (which holds the state they use)."""

    received: list[dict[str, Any]]
    stored: dict[str, dict]
    cancels_lose_race: bool

    async def responses(self, request: Request) -> Response:
        body = await self._receive(request)  # type: ignore[attr-defined]
        model = str(body.get("model", ""))
        if (fault := await self._fault(model, request)) is not None:  # type: ignore[attr-defined]
            return fault
        words = reply_words(3 if model == "fake-tool" else body.get("max_output_tokens"))
        prompt = prompt_tokens_of(body)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + len(words)}  # fmt: skip
        text = " ".join(words)
        message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
        # In OpenAI's order: id, status, background and error first, then the request's instructions repeated, the
        # output, and usage last.
        done = {"id": f"resp_fake_{len(self.received)}", "object": "response", "created_at": int(time.time()), "status": "completed",
                "background": body.get("background") is True, "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "model": model,
                "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}  # fmt: skip
        if model == "fake-tool" and not has_tool_result(body.get("input")):
            call = function_call(body.get("tools"), len(self.received))
            done = {**done, "output": [call], "usage": {**usage, "output_tokens": 20, "total_tokens": prompt + 20}}
            if body.get("stream") is not True:
                return json_response(done)
            return StreamingResponse(self._function_call_stream(done), media_type="text/event-stream")
        self.stored[done["id"]] = {"response": done, "input": body.get("input"), "generating": done["background"]}
        if len(self.stored) > STORED_RESPONSES:  # a benchmark's millions of answers are not all kept
            del self.stored[next(iter(self.stored))]
        if body.get("stream") is not True:
            if done["background"]:  # answered at once, generated "later": finished when first read back
                return json_response({**done, "status": "queued", "output": [], "usage": None})
            return json_response(done)
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
            yield named_event(name, {"type": name, "sequence_number": sequence, **data})

    async def compact(self, request: Request) -> Response:
        body = await self._receive(request)
        prompt = prompt_tokens_of(body)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + 5}  # fmt: skip
        compaction = {"type": "compaction", "id": "cmp_fake", "encrypted_content": "c3VtbWFyeQ=="}
        return json_response({"id": f"resp_compact_{len(self.received)}", "object": "response.compaction", "created_at": int(time.time()),
                      "output": [compaction], "usage": usage})  # fmt: skip

    async def input_tokens(self, request: Request) -> Response:
        body = await self._receive(request)
        return json_response({"object": "response.input_tokens", "input_tokens": prompt_tokens_of(body)})

    async def stored_response(self, request: Request) -> Response:
        self.received.append({"path": request.url.path, "query": request.url.query, "headers": dict(request.headers), "body": None,
                              "method": request.method})  # fmt: skip
        found = self.stored.get(request.path_params["response_id"])
        if found is None:
            return json_response({"error": {"message": "No response found.", "type": "invalid_request_error", "param": None, "code": None}}, 404)
        if (stalled := await self._stalled(found, request)) is not None:
            return stalled
        if request.method == "DELETE":
            del self.stored[request.path_params["response_id"]]
            return json_response({"id": found["response"]["id"], "object": "response.deleted", "deleted": True})
        if request.url.path.endswith("/cancel"):
            if not found["generating"]:
                found["response"] = {**found["response"], "status": "cancelled"}
                return json_response(found["response"])
            cancelled = {**found["response"], "status": "cancelled", "output": [], "usage": None}  # OpenAI says nothing of what was made
            if not self.cancels_lose_race:
                found.update(response=cancelled, generating=False)
            return json_response(cancelled)
        found["generating"] = False
        if request.query_params.get("stream") == "true":  # the response's events, from the first (starting_after: later)
            done = found["response"]
            words = done["output"][0]["content"][0]["text"].split() if done["output"] else []
            after = int(request.query_params.get("starting_after", 0))
            events = self._responses_stream(done, words, done["model"], starting_after=after)
            return StreamingResponse(events, media_type="text/event-stream")
        return json_response(found["response"])

    async def input_items(self, request: Request) -> Response:
        found = self.stored.get(request.path_params["response_id"])
        if found is None:
            return json_response({"error": {"message": "No response found.", "type": "invalid_request_error", "param": None, "code": None}}, 404)
        if (stalled := await self._stalled(found, request)) is not None:
            return stalled
        text = found["input"] if isinstance(found["input"], str) else ""
        item = {"id": "msg_in", "type": "message", "role": "user", "status": "completed", "content": [{"type": "input_text", "text": text}]}
        return json_response({"object": "list", "data": [item], "first_id": "msg_in", "last_id": "msg_in", "has_more": False})

    async def _stalled(self, found: dict, request: Request) -> Response | None:
        """A read of a fake-stalled-read response: nothing is sent until the client hangs up."""
        if found["response"]["model"] != "fake-stalled-read":
            return None
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return Response(status_code=499)

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
            # fake-type-last writes `type` last, as a provider serializing the openai SDK's own event classes does.
            fields = {**data, "sequence_number": sequence, "type": name} if model == "fake-type-last" else {"type": name, "sequence_number": sequence, **data}
            return named_event(name, fields) if sequence > starting_after else b""

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
        while model == "fake-trickle":
            await asyncio.sleep(0.1)
            yield event("response.output_text.delta", {**where, "delta": " more"})
        yield event("response.output_text.done", {**where, "text": message["content"][0]["text"]})
        yield event("response.content_part.done", {**where, "part": message["content"][0]})
        yield event("response.output_item.done", {"output_index": 0, "item": message})
        yield event("response.completed", {"response": done})
