"""The log of refused WebSocket upgrades, bounded.

uvicorn logs every WebSocket upgrade it answers with a refusal (`"WebSocket /v1/responses" 401`, a
bad key), whatever the access log is set to, and websockets adds its own line for the same answer:
one client retrying with a bad key as fast as it could wrote 67-119 KiB of log a second. Each socket's
protocol logs through a `ConnectionLog`, which hands those lines to the server's `RefusedUpgrades`:
the first refusal of each minute is logged, with how many came since the last such line (as refused
webhook deliveries are), and every other line goes on as it is. The refusal itself is counted as
every refused request is (the route submits it to the writer: `taskproxy_rejected_requests_total`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

REFUSALS_LOGGED_EVERY_SECONDS = 60.0
_UVICORNS_LINE = '%s - "WebSocket %s" %d'  # uvicorn's line for an upgrade answered without accepting it
_WEBSOCKETS_LINES = ("connection rejected (%d %s)", "HTTP response sent (%d %s)")


class RefusedUpgrades:
    """One server's refused upgrades since the last line about them."""

    def __init__(self, logger: logging.Logger, every: float = REFUSALS_LOGGED_EVERY_SECONDS) -> None:
        self._logger, self._every = logger, every
        self._count, self._last = 0, -every

    def refused(self, client: Any, path: Any, status: int) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last < self._every:
            return
        count, self._count, self._last = self._count, 0, now
        self._logger.warning('refused %d WebSocket upgrades since the last such line; the latest: %s - "WebSocket %s" %d', count, client, path, status)


class ConnectionLog:
    """A socket's logger (uvicorn's and websockets'): the lines about its upgrade being refused go to
    `refused`, and so does its closing; every other line to `logger` as it is."""

    def __init__(self, logger: logging.Logger, refused: RefusedUpgrades) -> None:
        self._logger, self._refused = logger, refused
        self._rejected = False

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        if msg == _UVICORNS_LINE and len(args) == 3 and isinstance(args[2], int) and args[2] >= 400:
            self._rejected = True
            self._refused.refused(*args)
            return
        if msg in _WEBSOCKETS_LINES and args and isinstance(args[0], int) and args[0] >= 400:
            return
        if self._rejected and msg == "connection closed":
            return
        self._logger.info(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # level, isEnabledFor, debug, warning, error, exception, log
        return getattr(self._logger, name)
