"""Server-sent events framing.

`SseSplitter` passes a byte stream on in whole events on the request path (only where an event must
be withheld from the client); `iter_events` reads the events of a finished stream, off the request path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class SseSplitter:
    """Passes a byte stream on event by event, withholding the usage-only chunk (stream_options)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._pending: list[bytes] = []  # chunks of an event not yet complete, joined once it is

    def without_usage_only(self, chunk: bytes) -> bytes:
        """The complete events so far, minus any usage-only chunk; a partial event waits for the rest.
        Events are not split apart unless a usage-only chunk is among them (once per stream)."""
        if (self._buffer or self._pending) and not _ends_an_event(self._pending[-1] if self._pending else self._buffer, chunk):
            self._pending.append(chunk)  # still inside one event: kept, not copied again with every chunk
            return b""
        data = b"".join((self._buffer, *self._pending, chunk)) if self._pending else (self._buffer + chunk if self._buffer else chunk)
        self._pending = []
        cut = end_of_last_event(data)
        complete, self._buffer = data[:cut], data[cut:]
        match = _USAGE_ONLY.search(complete)
        if match is None:
            return complete
        kept, position = [], 0
        while match is not None:
            start = end_of_last_event(complete, match.start())
            end = _EVENT_END.search(complete, match.end())
            stop = end.end() if end is not None else len(complete)
            if is_usage_only_chunk(complete[start:stop]):
                kept.append(complete[position:start])
                position = stop
            match = _USAGE_ONLY.search(complete, stop)
        kept.append(complete[position:])
        return b"".join(kept)

    def rest(self) -> bytes:
        rest = b"".join((self._buffer, *self._pending))
        self._buffer, self._pending = b"", []
        return rest


_TERMINATORS = (b"\n\n", b"\r\r", b"\r\n\r\n")


def _ends_an_event(before: bytes, chunk: bytes) -> bool:
    """`chunk` completes an event: a blank line in it, or across its start (bytes.find: a regex over
    the chunk costs ~15 times as much, and this runs for every chunk of a stream)."""
    seam = before[-3:] + chunk[:3]
    return any(end in chunk or end in seam for end in _TERMINATORS)


def end_of_last_event(data: bytes, before: int | None = None) -> int:
    """Where the last complete event in `data[:before]` ends (0: none)."""
    limit = len(data) if before is None else before
    ends = [i + len(t) for t in (b"\r\n\r\n", b"\n\n", b"\r\r") if (i := data.rfind(t, 0, limit)) >= 0]
    return max(ends, default=0)


def is_usage_only_chunk(event: bytes) -> bool:
    """The extra chunk `stream_options.include_usage` adds: empty `choices` and a usage object."""
    return b'"usage"' in event and _USAGE_ONLY.search(event) is not None


def iter_events(raw: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(event name, data) pairs of a complete SSE body; the name is b"" where none was given."""
    for block in _EVENT_END.split(raw):
        name, data = b"", []
        for line in block.splitlines():
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        if data:
            yield name, b"\n".join(data)
