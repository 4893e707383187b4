"""What a Responses WebSocket keeps of its last turn: the request's input and the response's output, so
that a message continuing it by `previous_response_id` (Codex sends only the new items, with
`store: false`) reaches the provider as the whole conversation. A provider's JSON is decoded to keep it
only within `limits.max_json_nodes` values and a continuation's `limits.max_body_bytes`: a provider's 5
million empty arrays held the interpreter for seconds and ~344 MiB per socket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from taskproxy.guard.body import DECODE_IN_THREAD_BYTES, more_json_values_than
from taskproxy.settings import LimitSettings

TOO_MANY_VALUES = object()  # what `decoded` answers for JSON holding more values than a request may


def _as_items(value: object) -> list:
    """A Responses `input` as a list of items (a string is one user message)."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else list(value or [])  # type: ignore[call-overload]


@dataclass
class Conversation:
    """The last request on this socket and what it produced, for a continuation by previous_response_id."""

    response_id: str | None = None
    items: list = field(default_factory=list)  # its whole input, then its output
    size: int = 0  # about how many bytes `items` take as JSON: what an expanded request adds

    def expand(self, body: dict) -> int:
        """Send the provider the whole conversation when `body` continues the last response here; the bytes it adds."""
        previous = body.get("previous_response_id")
        if previous is None or previous != self.response_id:
            return 0
        if not isinstance(body.get("input"), str | list | None):
            return 0  # left as sent: admission refuses its `input` as it would on any message
        body["input"] = [*self.items, *_as_items(body.get("input"))]
        del body["previous_response_id"]
        return self.size

    def remember(self, body: dict, response: dict, size: int) -> None:
        output = response.get("output") if isinstance(response.get("output"), list) else []
        self.response_id = response.get("id") if isinstance(response.get("id"), str) else None
        self.items = [*_as_items(body.get("input")), *output] if self.response_id else []
        self.size = size if self.response_id else 0

    async def remember_last_event(self, body: dict, terminal: bytes, sent: int, limits: LimitSettings) -> None:
        """Keep `body`'s input and the response its stream's last event carries (`sent`: the request's bytes)."""
        event = None if sent + len(terminal) > limits.max_body_bytes else await decoded(terminal, limits.max_json_nodes)  # too large to continue anyway
        if isinstance(event, dict) and isinstance(event.get("response"), dict):
            self.remember(body, event["response"], sent + len(terminal))
        else:
            self.remember(body, {}, 0)


async def decoded(raw: bytes, max_values: int) -> Any:
    """A provider's JSON (a last event, a whole response), in a worker thread when large: None if
    malformed (relayed as it came, nothing to continue from), TOO_MANY_VALUES past `max_values`."""
    return await anyio.to_thread.run_sync(_decoded, raw, max_values) if len(raw) > DECODE_IN_THREAD_BYTES else _decoded(raw, max_values)


def _decoded(raw: bytes, max_values: int) -> Any:
    if more_json_values_than(raw, max_values):
        return TOO_MANY_VALUES
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
