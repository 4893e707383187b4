"""Refused requests, counted per minute, key, reason and route until the writer writes them: a flood of
refusals is a few rows a second, not one a request (storage/writer.py)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime


class Refusals:
    """Refusals counted per (minute, key, reason, route) until they are written."""

    def __init__(self, every: float) -> None:
        self._counts: dict[tuple[datetime, str | None, str, str], int] = {}
        self._every = every
        self._last_flush = time.monotonic()

    def add(self, row: dict) -> None:
        key = (row["ts"].replace(second=0, microsecond=0), row["key_id"], row["reason"], row["route"])
        self._counts[key] = self._counts.get(key, 0) + row.get("count", 1)

    @property
    def waiting(self) -> bool:
        return bool(self._counts)

    def due(self, force: bool) -> bool:
        return bool(self._counts) and (force or time.monotonic() - self._last_flush >= self._every)

    def take(self) -> list[dict]:
        rows = [{"id": uuid.uuid4().hex, "ts": ts, "key_id": key_id, "reason": reason, "route": route, "count": count}
                for (ts, key_id, reason, route), count in self._counts.items()]  # fmt: skip
        self._counts.clear()
        self._last_flush = time.monotonic()
        return rows
