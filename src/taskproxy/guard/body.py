"""Reading and decoding request bodies within the configured limit."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from starlette.requests import Request

from taskproxy.errors import InvalidRequest, RequestTooLarge

# Bodies above this are decoded in a worker thread so a huge prompt cannot stall the event loop.
DECODE_IN_THREAD_BYTES = 256 * 1024
# Deeper JSON is refused: no real request needs it, and the proxy must re-encode what it accepts.
MAX_JSON_DEPTH = 100


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than the limit of {limit} bytes (limits.max_body_bytes).")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `limit` (without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class Undecodable:
    """Marks a body that is not a JSON object; the error is raised only after attribution."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decode(raw: bytes) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Undecodable(f"The request body is not valid JSON ({str(exc).splitlines()[0]}).")
    if not isinstance(value, dict):
        return Undecodable("The request body must be a JSON object.")
    if _deeper_than(value, MAX_JSON_DEPTH):
        return Undecodable(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    level: list[Any] = [value]
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, dict | list)]
        if not level:
            return False
    return True


async def decode_json_object(raw: bytes) -> dict | Undecodable:
    if not raw:
        return Undecodable("The request body is empty; a JSON object is expected.")
    if len(raw) > DECODE_IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(_decode, raw)
    return _decode(raw)
