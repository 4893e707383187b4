"""Server-sent events framing.

`EventBuffer` holds a stream's bytes until the event they belong to ends, in time linear in the stream.
`SseSplitter` passes a byte stream on in whole events on the request path (so an error event can
follow what was passed, and an event can be withheld from the client); `iter_events` reads the events
of a finished stream, off the request path.

A provider decides how long an event is, so neither holds one without bound: the splitter passes on
an event it has held `PASS_ON_BYTES` of as it comes (so large, it cannot be the usage-only chunk it
looks for), and a route that must have whole events (the Responses WebSocket sends one message per
event) ends the answer past `MAX_EVENT_BYTES`. Measured before (2026-12-06): a provider sending 400 MiB
without a blank line took a chat stream's process to 1 GiB and held the event loop for the search,
and on the WebSocket every chunk copied and searched all it held (99 % of a core, other clients at
p50 ~450 ms).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from taskproxy.jsonbytes import has_usage_object

# An event ends at a blank line; a line ends with CRLF, LF or CR (the SSE spec), so a blank line is
# two line ends in a row: LF LF, LF CR, CR CR, each CR taking the LF after it (CRLF). `\r\n\r\n`,
# `\n\r\n`, `\r\n\n`, `\r\r\n` all hold one of the three; a lone CRLF holds none. (`\n\r\n` was not
# read as an end: the events it ended ran together, and their usage was lost.)
_BLANK_LINES = (b"\n\n", b"\n\r", b"\r\r")
_EVENT_END = re.compile(rb"\n\n|\n\r\n?|\r\r\n?")
_EVENT_END_KEPT = re.compile(b"(" + _EVENT_END.pattern + b")")  # split on, the ends kept
_USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')


PASS_ON_BYTES = 1 << 20  # an event the splitter holds this much of is passed on as it comes
MAX_EVENT_BYTES = 16 << 20  # the largest event a route that needs whole events waits for (a `response.completed` carries the whole answer)


class EventBuffer:
    """A stream's bytes, held until the event they are in ends. Each chunk is checked for an event's end
    with the three bytes before it, and what is held is joined once, when its event ends."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self.held = 0  # bytes of an event not yet ended

    def feed(self, chunk: bytes) -> bytes:
        """The complete events the stream holds now (b"" while the event in progress goes on)."""
        if self._pieces and not _ends_an_event(self._last_bytes(), chunk):
            self._pieces.append(chunk)
            self.held += len(chunk)
            return b""
        data = b"".join((*self._pieces, chunk)) if self._pieces else chunk
        # A CR last may be the first half of a blank line's CRLF: the event it ends waits for the next byte.
        cut = end_of_last_event(data, len(data) - 1 if data.endswith(b"\r") else len(data))
        rest = data[cut:]
        self._pieces, self.held = ([rest] if rest else []), len(rest)
        return data[:cut]

    def take(self, keep: int = 0) -> bytes:
        """What is held but its last `keep` bytes, which stay held."""
        data = b"".join(self._pieces)
        kept = data[max(0, len(data) - keep) :] if keep else b""
        self._pieces, self.held = ([kept] if kept else []), len(kept)
        return data[: len(data) - len(kept)]

    def _last_bytes(self) -> bytes:
        tail = b""
        for piece in reversed(self._pieces):
            tail = piece[-3:] + tail
            if len(tail) >= 3:
                break
        return tail[-3:]


class SseSplitter:
    """Passes a byte stream on event by event, withholding the usage-only chunk (stream_options) unless
    `keep_usage_only` (the client asked for it). A stream that fails part-way ends after whole events,
    and the partial one held (never `rest()`) is dropped: an error event sent after half an event was
    read as part of it, and the SDKs raised JSONDecodeError, not the error."""

    def __init__(self, keep_usage_only: bool = False) -> None:
        self._events = EventBuffer()
        self._keep_usage_only = keep_usage_only
        self._passing = False  # inside an event already passed on in part: its end passes as it is

    @property
    def mid_event(self) -> bool:
        """Part of an event was passed on, not its end: no event can follow what was passed."""
        return self._passing

    def without_usage_only(self, chunk: bytes) -> bytes:
        """The complete events so far, minus any usage-only chunk (unless kept); a partial event waits for
        the rest, up to PASS_ON_BYTES. Events are not split apart unless a usage-only chunk is among them (once per stream)."""
        complete = self._events.feed(chunk)
        head = b""
        if self._passing and complete:
            end = end_of_first_event(complete)
            head, complete = complete[:end], complete[end:]
            self._passing = False
        if not self._keep_usage_only:
            complete = _without_usage_only(complete)
        out = head + complete if head else complete
        if self._events.held > PASS_ON_BYTES:  # the last 3 bytes stay: an event's end may begin in them
            out += self._events.take(keep=3)
            self._passing = True
        return out

    def rest(self) -> bytes:
        return self._events.take()


def _without_usage_only(complete: bytes) -> bytes:
    if _USAGE_ONLY.search(complete) is None:
        return complete
    # Split once, in C, into events and their ends: a chunk of many usage-only events is read once.
    # (Each event's start was searched for back to the chunk's beginning: a provider sending them as
    # fast as it could held the event loop, others' p50 ~100 ms.)
    pieces = _EVENT_END_KEPT.split(complete)  # [event, end, event, end, ..., what follows the last end]
    kept = [piece for n in range(0, len(pieces) - 1, 2) if not is_usage_only_chunk(event := pieces[n]) for piece in (event, pieces[n + 1])]
    kept.append(pieces[-1])
    return b"".join(kept)


def _ends_an_event(before: bytes, chunk: bytes) -> bool:
    """`chunk` completes an event: a blank line in it, or across its start (bytes.find: a regex over
    the chunk costs ~15 times as much, and this runs for every chunk of a stream)."""
    # An event held back for the LF its blank line's CR may take: decided now. Only a blank line's CR:
    # a line ending in a bare CR is no event's end, and taken for one, every chunk of a stream of such
    # lines joined and searched all that was held (a 564 KB answer took 6.4 s of the event loop).
    if before.endswith((b"\n\r", b"\r\r")):
        return True
    seam = before[-1:] + chunk[:1]
    return any(end in chunk or end == seam for end in _BLANK_LINES)


def end_of_first_event(data: bytes) -> int:
    """Where the first complete event in `data` ends (len(data): none ends)."""
    end = _EVENT_END.search(data)
    return end.end() if end is not None else len(data)


def end_of_last_event(data: bytes, before: int | None = None) -> int:
    """Where the last complete event in `data[:before]` ends (0: none)."""
    ends = [i + 2 for t in _BLANK_LINES if (i := data.rfind(t, 0, before)) >= 0]
    if not ends:
        return 0
    end = max(ends)
    limit = len(data) if before is None else before
    return end + 1 if end < limit and data[end - 1 : end + 1] == b"\r\n" else end  # a blank line's CR takes its LF


def is_usage_only_chunk(event: bytes) -> bool:
    """The extra chunk `stream_options.include_usage` adds: empty `choices` and a usage object (not
    `"usage": null`: Azure's first chunk, its prompt's content-filter results, has empty choices too)."""
    return has_usage_object(event) and _USAGE_ONLY.search(event) is not None


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
