"""Reading usage and completion text out of finished responses, per API format.

These run in the writer thread (via `Exchange.observe`), never on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from taskproxy.metering.usage import Observed, ProviderUsage
from taskproxy.upstream.sse import iter_events

NOT_BILLED = Observed(ProviderUsage())  # e.g. Anthropic's count_tokens: answered, nothing generated


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- OpenAI chat, completions, embeddings -----------------------------------------------------------


def openai_usage(usage: Any) -> ProviderUsage | None:
    """Normalize OpenAI's usage object (chat, completions, embeddings and the Responses API)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    if not isinstance(prompt, int):
        return None
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return ProviderUsage(
        prompt_tokens=prompt,
        completion_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        cached_tokens=_int(prompt_details.get("cached_tokens")),
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")),
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


def openai_body(body: bytes) -> Observed:
    data = _loads(body)
    if not isinstance(data, dict):
        return Observed()
    return Observed(openai_usage(data.get("usage")), "".join(_choices_text(data, delta=False)))


def openai_stream(chunks: Iterable[bytes]) -> Observed:
    usage: ProviderUsage | None = None
    text: list[str] = []
    for _, data in iter_events(b"".join(chunks)):
        event = _loads(data) if data != b"[DONE]" else None
        if isinstance(event, dict):
            usage = openai_usage(event.get("usage")) or usage
            text.extend(_choices_text(event, delta=True))
    return Observed(usage, "".join(text))


# -- OpenAI Responses API ---------------------------------------------------------------------------


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


def responses_body(body: bytes) -> Observed:
    data = _loads(body)
    if not isinstance(data, dict):
        return Observed()
    return Observed(openai_usage(data.get("usage")), _output_text(data))


def responses_stream(chunks: Iterable[bytes]) -> Observed:
    """Usage from `response.completed` (or `.incomplete`/`.failed`); text from the deltas as a fallback."""
    usage: ProviderUsage | None = None
    deltas: list[str] = []
    for _, data in iter_events(b"".join(chunks)):
        event = _loads(data)
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind in {"response.completed", "response.incomplete", "response.failed"} and isinstance(event.get("response"), dict):
            usage = openai_usage(event["response"].get("usage")) or usage
        elif kind in {"response.output_text.delta", "response.function_call_arguments.delta", "response.reasoning_text.delta"}:
            if isinstance(event.get("delta"), str):
                deltas.append(event["delta"])
    return Observed(usage, "".join(deltas))


# -- Anthropic Messages API -------------------------------------------------------------------------


def anthropic_usage(usage: Any) -> ProviderUsage | None:
    """Anthropic's input_tokens exclude cache reads and writes; taskproxy's prompt tokens include both."""
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    cache_read = _int(usage.get("cache_read_input_tokens"))
    return ProviderUsage(
        prompt_tokens=usage["input_tokens"] + cache_read,
        completion_tokens=_int(usage.get("output_tokens")),
        cached_tokens=cache_read,
        cache_creation_tokens=_int(usage.get("cache_creation_input_tokens")),
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


def anthropic_body(body: bytes) -> Observed:
    data = _loads(body)
    if not isinstance(data, dict):
        return Observed()
    return Observed(anthropic_usage(data.get("usage")), "".join(_block_text(b) for b in data.get("content") or ()))


def anthropic_stream(chunks: Iterable[bytes]) -> Observed:
    """Input and cache tokens from `message_start`; output tokens (cumulative) from the last `message_delta`."""
    start: dict = {}
    output: int | None = None
    text: list[str] = []
    for _, data in iter_events(b"".join(chunks)):
        event = _loads(data)
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            start = dict(event["message"].get("usage") or {})
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            delta_usage = event["usage"]
            output = _int(delta_usage.get("output_tokens"))
            start.update({k: v for k, v in delta_usage.items() if k != "output_tokens" and isinstance(v, int)})
        elif kind == "content_block_delta":
            text.append(_block_text(event.get("delta")))
    if output is None:  # the stream ended before message_delta: the provider's count is incomplete
        return Observed(None, "".join(text))
    return Observed(anthropic_usage({**start, "output_tokens": output}), "".join(text))
