"""What the records waiting to be built hold of their requests' bodies: in all, and per key.

Each usage record keeps its request's body until the writer builds it (token counting, hashing), and
large bodies are built more slowly than a client can send them: 8 MiB prompts came ~20 a second
against ~11 built, and counted by number alone 300 of them had taken a process to 900 MiB with no
brake. Past `BACKLOG_BYTES` in all, the request path slows down as for a backlog of batches; past
`KEY_BACKLOG_BYTES` of one key's, that key's requests are refused (429), not everyone's slowed.
"""

from __future__ import annotations

import threading

BACKLOG_BYTES = 256 * 1024 * 1024
KEY_BACKLOG_BYTES = 64 * 1024 * 1024


class BodyWeights:
    """Added to as records are queued (the event loop's thread), taken from as they are built (the writer's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._by_key: dict[str | None, int] = {}

    def add(self, key_id: str | None, weight: int) -> None:
        with self._lock:
            self._total += weight
            held = self._by_key.get(key_id, 0) + weight
            if held > 0:
                self._by_key[key_id] = held
            else:
                self._by_key.pop(key_id, None)

    @property
    def over(self) -> bool:
        return self._total > BACKLOG_BYTES

    def holding(self, key_id: str) -> int:
        """This key's bytes, past KEY_BACKLOG_BYTES (else 0)."""
        held = self._by_key.get(key_id, 0)
        return held if held > KEY_BACKLOG_BYTES else 0
