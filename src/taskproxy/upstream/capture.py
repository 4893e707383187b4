"""What is kept of a provider's answer for usage accounting: the whole of a small answer, and of a
long one its head and its tail, so that a long stream costs the proxy constant memory.

What accounting needs sits at the two ends: Anthropic reports input and cache tokens in
`message_start` (the head), every provider reports the final usage or its error in the last events
(the tail). The middle is counted (`skipped`), not kept; an estimate of the completion scales the
text that was kept by the bytes that were not (metering/usage.py).
"""

from __future__ import annotations

from taskproxy.jsonbytes import MAX_USAGE_OBJECT_BYTES
from taskproxy.upstream.sse import end_of_last_event

# Anthropic's message_start is a few hundred bytes; the usage object sits in the last few hundred. What
# more is kept only helps an estimate of a stream cut short. Measured (bench/streams_memory.py): with
# 64 KiB each, 500 streams in flight took the process to 776 MiB.
HEAD_BYTES = 16 * 1024
TAIL_BYTES = 32 * 1024
# The start of the latest event begun: a Responses API terminal event echoes the request's instructions
# and tools (tens of KiB from Codex) and may not fit in the tail, but says which it is (`type`) and its
# error at its start (OpenAI writes `status` and `error` before the echoed fields).
EVENT_HEAD_BYTES = 2 * 1024


class Capture:
    __slots__ = ("_head", "_tail", "_head_limit", "_tail_limit", "_event_head", "_between_events", "_last3", "skipped", "total")

    def __init__(self, head_limit: int = HEAD_BYTES, tail_limit: int = TAIL_BYTES) -> None:
        self._head = bytearray()
        self._tail = bytearray()
        self._head_limit = head_limit
        self._tail_limit = tail_limit
        self._event_head: bytes | bytearray = b""  # a small chunk that holds a whole event is kept as it is, not copied
        self._between_events = False  # the last chunk ended where its event ended
        self._last3 = b""  # the stream's last three bytes
        self.skipped = 0  # bytes between head and tail that were not kept
        self.total = 0

    def add(self, chunk: bytes) -> None:
        # The usual chunk, one whole event after an event's end (its only blank line last), inline: this
        # runs on the request path for every chunk. The event's start is the chunk's, kept as it is and
        # copied only when asked for (`event_head`). A chunk with a CR may hold an earlier event's end
        # of another kind (`\r\r`, `\n\r\n`; the SSE spec allows them mixed): the general search reads it.
        if self._between_events and chunk.find(b"\n\n") == len(chunk) - 2 > 0 and chunk[0] != 10 and b"\r" not in chunk:  # (10: LF)
            # (a large chunk's first bytes copied: a stream holds at most EVENT_HEAD_BYTES of it)
            self._event_head, self._last3 = chunk if len(chunk) <= EVENT_HEAD_BYTES else chunk[:EVENT_HEAD_BYTES], chunk[-3:]
        else:
            self._note_event(chunk)
        self.total += len(chunk)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
            if not chunk:
                return
        self._tail += chunk
        # Trimmed in steps of at least the tail's size: the copying stays proportional to the bytes added.
        if len(self._tail) >= 2 * self._tail_limit:
            cut = len(self._tail) - self._tail_limit
            del self._tail[:cut]
            self.skipped += cut

    def _note_event(self, chunk: bytes) -> None:
        """Keep the first bytes of the latest event begun. An event's end is found with the three bytes
        before the chunk (a blank line may be split between two chunks)."""
        if not chunk:
            return
        before = self._last3
        window = before + chunk
        self._last3 = window[-3:]
        end = _last_event_end(window, len(window))
        if end <= len(before):  # no event ended in this chunk: it goes on with the one begun
            if self._between_events:
                self._event_head, self._between_events = bytearray(chunk[:EVENT_HEAD_BYTES]), False
            elif len(self._event_head) < EVENT_HEAD_BYTES:
                self._event_head += chunk[: EVENT_HEAD_BYTES - len(self._event_head)]
            return
        if end < len(window):  # the next event began after the last end
            self._event_head, self._between_events = bytearray(window[end : end + EVENT_HEAD_BYTES]), False
            return
        # The chunk ends where an event ends (a provider sending an event a chunk): that event's start,
        # if it began in this chunk.
        body_end = len(window)
        while body_end and window[body_end - 1] in b"\r\n":
            body_end -= 1
        if body_end <= len(before):  # only line ends (a blank line's LF after its CR): no event began
            self._between_events = True
            return
        start = _last_event_end(window, body_end)
        if start > len(before):
            self._event_head = bytearray(window[start : min(body_end, start + EVENT_HEAD_BYTES)])
        elif self._between_events:
            self._event_head = bytearray(chunk[: min(body_end - len(before), EVENT_HEAD_BYTES)])
        elif len(self._event_head) < EVENT_HEAD_BYTES:  # it began in an earlier chunk: this is its end
            self._event_head += chunk[: min(body_end - len(before), EVENT_HEAD_BYTES - len(self._event_head))]
        self._between_events = True

    @property
    def event_head(self) -> bytes:
        """The first EVENT_HEAD_BYTES of the latest event begun (of a stream of events)."""
        return bytes(self._event_head[:EVENT_HEAD_BYTES])  # (with the blank line that ended it, if it is that short)

    @property
    def complete(self) -> bool:
        """Every byte was kept."""
        return self.skipped == 0

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    @property
    def tail(self) -> bytes:
        """The last bytes kept after the head (at least the last `tail_limit` bytes of the answer)."""
        return bytes(self._tail)

    def whole(self) -> bytes:
        """The answer as received; only meaningful when `complete`."""
        return bytes(self._head + self._tail)

    def recent(self, size: int | None = None) -> bytes:
        """The last `size` bytes (at most the tail's size) of what has arrived so far: where a usage
        object just sent is."""
        size = self._tail_limit if size is None else min(size, self._tail_limit)
        return bytes(self._tail[-size:]) if self._tail else bytes(self._head[-size:])

    def around(self, chunk: bytes) -> bytes:
        """The chunk just added, with as much before it as a usage object that began earlier can span:
        what the meter reads as a stream passes (not the whole tail again for every chunk)."""
        return self.recent(len(chunk) + MAX_USAGE_OBJECT_BYTES)


def _last_event_end(window: bytes, before: int) -> int:
    """`end_of_last_event`, with a single search for a stream whose lines end with LF alone (most)."""
    if b"\r" in window:
        return end_of_last_event(window, before)
    found = window.rfind(b"\n\n", 0, before)
    return found + 2 if found >= 0 else 0
