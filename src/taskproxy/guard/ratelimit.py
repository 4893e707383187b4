"""A per-key request rate limit (`limits.requests_per_minute`), counted in each process's memory.

A sliding window of one minute per key; with several processes each enforces the limit on its own
share, so a key reaches at most (processes × limit) requests a minute. Refused requests get 429
`rate_limited` with the seconds to wait, and are not forwarded.
"""

from __future__ import annotations

import time
from collections import deque

from taskproxy.errors import RateLimited

WINDOW_SECONDS = 60.0


class RateLimiter:
    def __init__(self, requests_per_minute: int | None) -> None:
        self._limit = requests_per_minute
        self._recent: dict[str, deque[float]] = {}

    def check(self, key_id: str, now: float | None = None) -> None:
        if self._limit is None:
            return
        now = time.monotonic() if now is None else now
        recent = self._recent.setdefault(key_id, deque())
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= self._limit:
            wait = max(1, int(recent[0] + WINDOW_SECONDS - now) + 1)
            raise RateLimited(f"This key sent {self._limit} requests in the last minute, its limit. Try again in {wait} s.", retry_after=wait)
        recent.append(now)
        if len(self._recent) > 100_000:  # forget idle keys rather than grow without end
            self._recent = {k: v for k, v in self._recent.items() if v and v[-1] > now - WINDOW_SECONDS}
