"""Server-sent events: framing on the request path, usage and text extraction off it.

`SseSplitter` cuts a byte stream into whole events (only used when an event must be withheld from the
client). The `*_observation` functions parse a finished response for the metering thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from taskproxy.metering.usage import Observed, ProviderUsage

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class SseSplitter:
    """Incrementally split bytes into complete SSE events (each returned with its terminator)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events = []
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            events.append(self._buffer[start : match.end()])
            start = match.end()
        self._buffer = self._buffer[start:]
        return events

    def rest(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


def is_usage_only_chunk(event: bytes) -> bool:
    """The extra chunk `stream_options.include_usage` adds: empty `choices` and a usage object."""
    return b'"usage"' in event and _USAGE_ONLY.search(event) is not None


def iter_data(raw: bytes) -> Iterator[bytes]:
    """The `data:` payloads of a complete SSE body, multi-line data joined by newlines."""
    for event in _EVENT_END.split(raw):
        data = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
        if data:
            yield b"\n".join(data)


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def openai_usage(usage: Any) -> ProviderUsage | None:
    """Normalize OpenAI's usage object (chat, completions, embeddings, Responses API)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    if not isinstance(prompt, int):
        return None
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return ProviderUsage(
        prompt_tokens=prompt,
        completion_tokens=completion if isinstance(completion, int) else 0,
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def _choice_text(choice: dict, *, delta: bool) -> Iterable[str]:
    if "text" in choice and isinstance(choice["text"], str):  # legacy completions
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


def openai_body_observation(body: bytes) -> Observed:
    data = _loads(body)
    if not isinstance(data, dict):
        return Observed()
    text = "".join(t for choice in data.get("choices") or () if isinstance(choice, dict) for t in _choice_text(choice, delta=False))
    return Observed(openai_usage(data.get("usage")), text)


def openai_stream_observation(chunks: Iterable[bytes]) -> Observed:
    usage: ProviderUsage | None = None
    text: list[str] = []
    for data in iter_data(b"".join(chunks)):
        if data == b"[DONE]":
            continue
        event = _loads(data)
        if not isinstance(event, dict):
            continue
        usage = openai_usage(event.get("usage")) or usage
        for choice in event.get("choices") or ():
            if isinstance(choice, dict):
                text.extend(_choice_text(choice, delta=True))
    return Observed(usage, "".join(text))
