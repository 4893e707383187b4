"""Reading usage, completion text and in-band errors out of what was kept of an answer, per API format.

These run in the writer thread (via `Exchange.to_record`), never on the event loop. Each reads a
`Capture`: the whole answer when it was small, else its head and tail (upstream/capture.py).

Usage the provider reported is kept field by field even when the answer ended early: an Anthropic
stream cut after `message_start` still has its input and cache tokens, and only the output is then
missing (`Observed.missing`) and estimated by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from taskproxy.jsonbytes import last_usage_object
from taskproxy.metering.observed import COMPLETION, Observed, ProviderUsage
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.sse import end_of_first_event, end_of_last_event, iter_events

Observer = Callable[[Capture], Observed]


def parsed(data: bytes) -> Any:
    """`data` as JSON, or None when it is not."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _count(value: Any) -> int | None:
    """A token count as a provider reports it: a whole number, not negative. Anything else (`"50"`,
    `50.0`, `-50`, `1e30`, `true`) is no count: before 2026-12-06 it was read as 0 (or, negative,
    subtracted), and recorded as reported."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _int(value: Any) -> int:
    """A count where one is optional (cache and reasoning details): 0 when absent or not a count."""
    return _count(value) or 0


def _count_or_absent(value: Any) -> bool:
    return value is None or _count(value) is not None


def _text_scale(capture: Capture) -> float:
    kept = capture.total - capture.skipped
    return capture.total / kept if capture.skipped and kept else 1.0


def stream_events(capture: Capture) -> Iterator[dict]:
    """The JSON payloads of the events kept: all of them, or those wholly inside the head and the tail."""
    if capture.complete:
        blocks: Iterable[bytes] = (capture.whole(),)
    else:
        head, tail = capture.head, capture.tail
        first_end = end_of_first_event(tail)
        blocks = (head[: end_of_last_event(head)], tail[first_end:])
    for block in blocks:
        for _, data in iter_events(block):
            if data != b"[DONE]" and isinstance(event := parsed(data), dict):
                yield event


def _body(capture: Capture) -> dict | None:
    """A non-streamed answer's JSON, when it was kept whole."""
    data = parsed(capture.whole()) if capture.complete else None
    return data if isinstance(data, dict) else None


def _error_type(error: Any, keys: tuple[str, ...] = ("type", "code")) -> str:
    if isinstance(error, dict):
        for key in keys:
            if isinstance(error.get(key), str) and error[key]:
                return error[key][:64]
    return "error"


# -- OpenAI chat, completions, embeddings -----------------------------------------------------------


def _served_as(value: Any) -> str | None:
    """How the provider says it served a request, which prices it: a processing tier (`flex`,
    `priority`, `default`…), a speed (`fast`) or a region (`us`), lower-cased; else None."""
    if isinstance(value, str) and 0 < len(value) <= 32 and value.replace("_", "").isalpha():
        return value.lower()
    return None


def openai_usage(usage: Any, tier: Any = None) -> ProviderUsage | None:
    """Normalize OpenAI's usage object (chat, completions, embeddings and the Responses API), with the
    processing tier the answer names beside it."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    if prompt is None or not _count_or_absent(usage.get("completion_tokens", usage.get("output_tokens"))):
        return None  # not believed: the answer is estimated, as one without usage
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return ProviderUsage(
        prompt_tokens=prompt,
        completion_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        cached_tokens=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0,
        service_tier=_served_as(tier),
    )


def _choice_text(choice: dict, *, delta: bool) -> Iterable[str]:
    if isinstance(choice.get("text"), str):  # legacy completions
        yield choice["text"]
    message = choice.get("delta" if delta else "message")
    if not isinstance(message, dict):
        return
    for key in ("content", "reasoning_content", "refusal"):
        if isinstance(message.get(key), str):
            yield message[key]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield from (function[k] for k in ("name", "arguments") if isinstance(function.get(k), str))


def _choices_text(data: dict, *, delta: bool) -> Iterable[str]:
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            yield from _choice_text(choice, delta=delta)


def openai_body(capture: Capture) -> Observed:
    data = _body(capture)
    if data is None:
        # Its tier is not read from the bytes kept: past the usage come the request's own `metadata`,
        # which could name any tier, and a Responses body's tier sits before its echoed tools, beyond
        # the tail. The tier the request asked for prices it (metering/usage.py).
        return Observed(openai_usage(last_usage_object(capture.tail or capture.head)))
    return Observed(openai_usage(data.get("usage"), data.get("service_tier")), "".join(_choices_text(data, delta=False)))


def openai_stream(capture: Capture) -> Observed:
    usage: ProviderUsage | None = None
    error: str | None = None
    text: list[str] = []
    for event in stream_events(capture):
        usage = openai_usage(event.get("usage"), event.get("service_tier")) or usage
        if "error" in event:
            error = _error_type(event["error"])
        text.extend(_choices_text(event, delta=True))
    return Observed(usage, "".join(text), _text_scale(capture), error)


# -- OpenAI Responses API ---------------------------------------------------------------------------

UNFINISHED = frozenset({"queued", "in_progress"})
# A response's final statuses: it never changes again. (`cancelled` may: a cancel can lose the race
# with the generation, and a later read show the response completed.)
FINISHED = frozenset({"completed", "incomplete", "failed"})
_TERMINAL = {f"response.{status}" for status in FINISHED}
# Its `type`: OpenAI writes it first, a provider serializing the SDK's own event classes last (after
# the whole response). Escaped inside a string (`\"type\"`), it does not match.
_TERMINAL_TYPE = re.compile(rb'"type"\s*:\s*"response\.(completed|failed|incomplete)"')
# A failed response's error, read from the start of its event (the code, or failing that the type):
# `{"code": "server_error", "message": ...}`.
_ERROR_CODE = re.compile(rb'"error"\s*:\s*\{[^{}]*?"(?:code|type)"\s*:\s*"([^"\\]{1,64})"')


EVENT_START_BYTES = 200  # where a terminal event's `type` is when written first (after `event: ...` and `data: `)
EVENT_END_BYTES = 512  # where it is when written last


def is_terminal(event: bytes) -> bool:
    """A Responses event's JSON that ends the response (`response.completed`, `.incomplete`, `.failed`).
    Its `type` is read at either end (first, as OpenAI writes it, or last), not across the whole event:
    this runs on the request path for every event, and a terminal one repeats the whole response."""
    return _TERMINAL_TYPE.search(event, 0, EVENT_START_BYTES) is not None or _TERMINAL_TYPE.search(event, max(0, len(event) - EVENT_END_BYTES)) is not None


# An `error` event (`{"type": "error", "code": ..., "message": ...}`) ends a Responses stream too: its
# `type` first, as OpenAI writes it, or last (the SDK's classes); never a nested object's, nor escaped.
_ERROR_FIRST = re.compile(rb'\s*\{\s*"type"\s*:\s*"error"\s*[,}]')
_ERROR_LAST = re.compile(rb'[{,]\s*"type"\s*:\s*"error"\s*\}\s*$')


def is_error(event: bytes) -> bool:
    """A Responses event's JSON that is the stream's `error` event: the response ends with it."""
    return _ERROR_FIRST.match(event) is not None or _ERROR_LAST.search(event, max(0, len(event) - EVENT_START_BYTES)) is not None


_DELTAS = {"response.output_text.delta", "response.function_call_arguments.delta", "response.reasoning_text.delta", "response.refusal.delta"}


def _output_text(response: dict) -> str:
    parts = []
    for item in response.get("output") or ():
        if not isinstance(item, dict):
            continue
        for content in item.get("content") or ():
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                parts.append(content["text"])
        if item.get("type") == "function_call" and isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
    return "".join(parts)


def _response_id(response: Any) -> str | None:
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 200 else None


# A response too large to keep whole (it echoes the request's instructions and tools) is read from its
# head: OpenAI writes `id`, `status` and `background` before the echoed fields.
_HEAD_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([^"\\]{1,200})"')
_HEAD_UNFINISHED = re.compile(rb'"status"\s*:\s*"(?:queued|in_progress)"')
_HEAD_BACKGROUND = re.compile(rb'"background"\s*:\s*true')


def still_generating(capture: Capture) -> bool:
    """A background response's body, too large to keep whole, whose head says it is queued or in
    progress: whatever usage object it carries is not its usage yet."""
    head = capture.head
    return bool(_HEAD_UNFINISHED.search(head) and _HEAD_BACKGROUND.search(head))


def _large_response(capture: Capture) -> Observed:
    found = _HEAD_ID.match(capture.head)
    response_id = found.group(1).decode() if found else None
    if still_generating(capture):
        return Observed(ProviderUsage(), response_id=response_id, deferred=True)
    return Observed(openai_usage(last_usage_object(capture.tail or capture.head)), response_id=response_id)  # its tier: openai_body


def responses_body(capture: Capture) -> Observed:
    data = _body(capture)
    if data is None:
        return _large_response(capture)
    if data.get("background") is True and data.get("status") in UNFINISHED:
        return Observed(ProviderUsage(), response_id=_response_id(data), deferred=True)
    return Observed(openai_usage(data.get("usage"), data.get("service_tier")), _output_text(data), response_id=_response_id(data))


def responses_stream(capture: Capture) -> Observed:
    """Usage from `response.completed` (or `.incomplete`/`.failed`); `response.created` and
    `.in_progress` carry none. Text from the deltas, for an estimate when the usage never came.
    The terminal event repeats the request's instructions and tools and the whole output, so it may
    not fit in the tail kept; its `usage` comes near its end, and is read from there."""
    usage: ProviderUsage | None = None
    error: str | None = None
    response_id: str | None = None
    background = False
    deltas: list[str] = []
    ended = False
    for event in stream_events(capture):
        kind = event.get("type")
        response_id = response_id or _response_id(event.get("response"))
        background = background or (isinstance(event.get("response"), dict) and event["response"].get("background") is True)
        if kind in _TERMINAL and isinstance(event.get("response"), dict):
            ended = True
            usage = openai_usage(event["response"].get("usage"), event["response"].get("service_tier")) or usage
            if kind == "response.failed":
                error = _error_type(event["response"].get("error"))
        elif kind == "error":
            # `{"type": "error", "code": "server_error", ...}`: its type names the event, its code the error
            error = _error_type(event["error"]) if isinstance(event.get("error"), dict) else _error_type(event, ("code",))
        elif kind in _DELTAS and isinstance(event.get("delta"), str):
            deltas.append(event["delta"])
    if not ended and not capture.complete:  # its last event too large for the tail: read from its start and end
        usage = usage or openai_usage(last_usage_object(capture.tail))  # its tier: as openai_body says
        error = error or _failed_error(capture)
    if background and usage is None and not ended and response_id is not None:
        # A background response's stream cut before its end: the provider goes on generating, and the
        # read that sees it finished bills the whole of it (routes/stored.py, background.py), not
        # the part relayed so far.
        return Observed(ProviderUsage(), response_id=response_id, deferred=True)
    return Observed(usage, "".join(deltas), _text_scale(capture), error, response_id=response_id)


def _failed_error(capture: Capture) -> str | None:
    """The error of a `response.failed` event that was not kept whole: its type is at its start (or, as
    a provider serializing the SDK's classes writes it, at its end), its error near its start."""
    head = capture.event_head
    kind = _TERMINAL_TYPE.search(head) or _TERMINAL_TYPE.search(capture.recent(EVENT_END_BYTES))
    if kind is None or kind.group(1) != b"failed":
        return None
    code = _ERROR_CODE.search(head)
    return code.group(1).decode("utf-8", "replace") if code else "error"


# -- Anthropic Messages API -------------------------------------------------------------------------


def anthropic_usage(usage: Any) -> ProviderUsage | None:
    """Anthropic's input_tokens exclude cache reads and writes; taskproxy's prompt tokens include both."""
    if not isinstance(usage, dict) or _count(usage.get("input_tokens")) is None or not _count_or_absent(usage.get("output_tokens")):
        return None  # not believed: the answer is estimated, as one without usage
    cache_read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    by_ttl = usage.get("cache_creation")  # {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}
    for_an_hour = _int(by_ttl.get("ephemeral_1h_input_tokens")) if isinstance(by_ttl, dict) else 0
    return ProviderUsage(
        prompt_tokens=usage["input_tokens"] + cache_read + written,
        completion_tokens=_int(usage.get("output_tokens")),
        cached_tokens=cache_read,
        cache_creation_tokens=written,
        cache_creation_1h_tokens=min(for_an_hour, written),
        service_tier=_served_as(usage.get("service_tier")),
        speed=_served_as(usage.get("speed")),
        inference_geo=_served_as(usage.get("inference_geo")),
    )


def _block_text(block: Any) -> str:
    if not isinstance(block, dict):
        return ""
    for key in ("text", "thinking", "partial_json"):
        if isinstance(block.get(key), str):
            return block[key]
    if block.get("type") == "tool_use" and "input" in block:
        return orjson.dumps(block["input"]).decode()
    return ""


def anthropic_body(capture: Capture) -> Observed:
    data = _body(capture)
    if data is None:
        return Observed(anthropic_usage(last_usage_object(capture.tail or capture.head)))
    return Observed(anthropic_usage(data.get("usage")), "".join(_block_text(b) for b in data.get("content") or ()))


_SERVED_AS = ("service_tier", "speed", "inference_geo")


def anthropic_stream(capture: Capture) -> Observed:
    """Input and cache tokens from `message_start`; output tokens (cumulative) from the last
    `message_delta`. A stream that ended before any `message_delta` keeps what `message_start`
    reported and misses only the output; an `error` event is the provider's failure."""
    reported: dict = {}
    output: int | None = None
    error: str | None = None
    text: list[str] = []
    for event in stream_events(capture):
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            reported = dict(event["message"].get("usage") or {})
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            delta_usage = event["usage"]
            output = _count(delta_usage.get("output_tokens"))  # not a count: missing, and estimated
            reported.update({k: v for k, v in delta_usage.items() if k != "output_tokens" and _count(v) is not None})
            # What the request was served as (they price it), wherever the provider says it.
            reported.update({k: delta_usage[k] for k in _SERVED_AS if isinstance(delta_usage.get(k), str) and delta_usage[k]})
        elif kind == "content_block_delta":
            text.append(_block_text(event.get("delta")))
        elif kind == "error":
            error = _error_type(event.get("error"))
    missing = frozenset() if output is not None else frozenset({COMPLETION})
    usage = anthropic_usage({**reported, "output_tokens": output or 0})
    return Observed(usage, "".join(text), _text_scale(capture), error, missing if usage is not None else frozenset())
