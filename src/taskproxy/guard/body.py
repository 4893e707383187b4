"""Reading and decoding request bodies within what one request may cost.

The size limit alone does not bound the work: 29 MiB of `[[],[],...]` (ten million empty arrays, well
inside 32 MiB and the depth limit) took 1.08 GiB and 9 s of CPU to decode, and four at once stalled
everyone else. So a body is also held to a number of JSON values (`limits.max_json_nodes`), counted
before it is decoded, and large bodies are read and decoded a few at a time (`BodyGate`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import orjson
from starlette.requests import Request

from taskproxy.errors import InvalidRequest, RequestTooLarge

# Bodies above this are decoded in a worker thread so a huge prompt cannot stall the event loop, and
# are read and decoded at most `limits.max_concurrent_large_bodies` at a time.
DECODE_IN_THREAD_BYTES = 256 * 1024
LARGE_BODY_BYTES = 1024 * 1024
# Deeper JSON is refused: no real request needs it, and the proxy must re-encode what it accepts.
MAX_JSON_DEPTH = 100
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _too_large(limit: int, which: str) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than the limit of {limit} bytes ({which}).")


class BodyGate:
    """Large bodies are read and decoded a few at a time: memory and CPU for them stay bounded."""

    def __init__(self, concurrent: int) -> None:
        self._limiter = anyio.Semaphore(concurrent)

    @asynccontextmanager
    async def large(self) -> AsyncIterator[None]:
        async with self._limiter:
            yield

    @asynccontextmanager
    async def reading(self, request: Request, limit: int, which: str = "limits.max_body_bytes") -> AsyncIterator[bytes]:
        """The body (`read_body`), read under the gate when it is large: said so (Content-Length), or
        once it passes LARGE_BODY_BYTES (sent chunked); held until the block ends, its decoding included."""
        async with AsyncExitStack() as held:
            take = lambda: held.enter_async_context(self.large())
            if declared_large(request):
                await take()
            yield await read_body(request, limit, which, on_large=take)


def declared_large(request: Request) -> bool:
    """The client announced a body large enough to be read and decoded under the `BodyGate`."""
    declared = request.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > LARGE_BODY_BYTES


async def read_body(request: Request, limit: int, which: str = "limits.max_body_bytes",
                    on_large: Callable[[], Awaitable[object]] | None = None) -> bytes:  # fmt: skip
    """The whole body, refused as soon as it is known to exceed `limit` (without reading the rest).
    A large one is joined in a worker thread: copying megabytes would hold up the event loop.
    `on_large` is awaited once a body that declared no length (chunked) passes LARGE_BODY_BYTES: a
    body that did not say it was large takes the gate there, before the rest is read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise _too_large(limit, which)
    chunks: list[bytes] = []
    size = 0
    large = on_large is None or declared is not None
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, which)
        chunks.append(chunk)
        if not large and size > LARGE_BODY_BYTES:
            large = True
            await on_large()  # type: ignore[misc]
    if size > DECODE_IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(b"".join, chunks)
    return b"".join(chunks)


class Undecodable:
    """Marks a body that is not a JSON object; the error is raised only after attribution."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


SLICE = 1024 * 1024  # bytes counted per C call: short, so the event loop's thread gets the interpreter in between


def _structural(raw: bytes, start: int, end: int, stop_above: int) -> int:
    """Values after the first in raw[start:end]: commas, and openings of containers that are not empty
    (`[]` and `{}` hold none), counted a slice at a time; stops once over `stop_above`."""
    count = 0
    for low in range(start, end, SLICE):
        high = min(low + SLICE, end)
        count += raw.count(b",", low, high) + raw.count(b"[", low, high) + raw.count(b"{", low, high)
        count -= raw.count(b"[]", low, high) + raw.count(b"{}", low, high)
        if count > stop_above:
            break
    return count


def _next_string(raw: bytes, position: int) -> re.Match[bytes] | None:
    """The next string from `position`, its opening quote found a slice at a time."""
    while position < len(raw):
        quote = raw.find(b'"', position, position + SLICE)
        if quote >= 0:
            return _STRING.match(raw, quote)
        position += SLICE
    return None


def more_json_values_than(raw: bytes, limit: int) -> bool:
    """True if `raw` holds more than `limit` JSON values: every value but the first follows a comma or
    opens a container (compact JSON counts exactly; `[ ]` counts one more). First an upper bound
    (brackets and commas inside strings counted too), which
    settles it for nearly every body; only a body over it is counted again outside its strings. Runs
    in a worker thread, a slice or a string at a time, so the event loop gets the interpreter back in
    between, and stops as soon as the limit is passed."""
    if _structural(raw, 0, len(raw), limit) + 1 <= limit:
        return False
    count, position = 1, 0
    while count <= limit:
        string = _next_string(raw, position)
        end = string.start() if string else len(raw)
        count += _structural(raw, position, end, limit - count)
        if string is None:
            break
        position = string.end()
    return count > limit


def _decode(raw: bytes, max_values: int) -> Any:
    if more_json_values_than(raw, max_values):
        raise RequestTooLarge(f"The request body holds more than {max_values:,} JSON values (limits.max_json_nodes).")
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


async def decode_json_object(raw: bytes, max_values: int) -> dict | Undecodable:
    """The body as a JSON object, or `Undecodable` saying why not; RequestTooLarge past `max_values`."""
    if not raw:
        return Undecodable("The request body is empty; a JSON object is expected.")
    if len(raw) <= DECODE_IN_THREAD_BYTES:
        return _decode(raw, max_values)
    return await anyio.to_thread.run_sync(_decode, raw, max_values)
