"""How many of something each key has under way, with a limit: requests about itself in an API lane
(routes/lanes.py), open WebSockets on the Responses API (routes/responses_socket.py).

Read and written on the event loop only. A key with nothing under way has no entry, so the table holds
the keys active now, not every key that ever came.
"""

from __future__ import annotations


class PerKey:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit  # None: no limit
        self._under_way: dict[str, int] = {}

    def take(self, key_id: str) -> int | None:
        """Count one more of `key_id`'s: the count before it, or None (nothing taken) at the limit."""
        count = self._under_way.get(key_id, 0)
        if self.limit is not None and count >= self.limit:
            return None
        self._under_way[key_id] = count + 1
        return count

    def give_back(self, key_id: str) -> None:
        if (left := self._under_way[key_id] - 1) > 0:
            self._under_way[key_id] = left
        else:
            del self._under_way[key_id]
