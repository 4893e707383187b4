"""Each process's view of the work-item registry, and the policy modes that use it.

Statuses and budgets of every registered item are held in memory and reloaded every
`work_items.refresh_seconds`, so the request path does not ask the database. In `known` and `active`
mode an id not in memory (registered a moment ago elsewhere) costs one lookup in a worker thread;
in `open` mode, none.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.errors import ServiceUnavailable, WorkItemClosed, WorkItemUnknown
from taskproxy.storage.models import WorkItem
from taskproxy.workitems import RESOLVED

log = logging.getLogger("taskproxy.items")
_ITEMS = WorkItem.__table__


@dataclass(frozen=True)
class KnownItem:
    status: str
    budget_tokens: int | None = None
    budget_usd: float | None = None


class ItemCache:
    def __init__(self, engine: Engine, *, refresh_seconds: float = 5.0) -> None:
        self._engine = engine
        self._refresh_seconds = refresh_seconds
        self._items: dict[str, KnownItem] = {}
        self._missing: dict[str, float] = {}
        self._lookups = anyio.CapacityLimiter(4)

    def load(self) -> None:
        """Reload every item (blocking; run it in a thread)."""
        with self._engine.connect() as connection:
            rows = connection.execute(select(_ITEMS.c.id, _ITEMS.c.status, _ITEMS.c.budget_tokens, _ITEMS.c.budget_usd)).all()
        items = {row.id: KnownItem(row.status, row.budget_tokens, row.budget_usd) for row in rows}
        if items != self._items:  # unchanged: keep the long-lived copy (see KeyStore.load)
            self._items = items
        self._missing.clear()


    def cached(self, item_id: str) -> KnownItem | None:
        return self._items.get(item_id)

    def items_with_budgets(self) -> list[str]:
        return [item_id for item_id, item in self._items.items() if item.budget_tokens is not None or item.budget_usd is not None]

    async def lookup(self, item_id: str) -> KnownItem | None:
        """The item from memory, else from the database (remembered as missing for a refresh interval)."""
        known = self._items.get(item_id)
        if known is not None or self._missing.get(item_id, 0.0) > time.monotonic():
            return known
        try:
            row = await anyio.to_thread.run_sync(self._fetch, item_id, limiter=self._lookups)
        except SQLAlchemyError:
            raise ServiceUnavailable("The work item could not be checked: the database does not answer. Try again shortly.") from None
        if row is None:
            if len(self._missing) > 10_000:
                self._missing.clear()
            self._missing[item_id] = time.monotonic() + self._refresh_seconds
            return None
        self._items[item_id] = row
        return row

    def _fetch(self, item_id: str) -> KnownItem | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(_ITEMS.c.status, _ITEMS.c.budget_tokens, _ITEMS.c.budget_usd).where(_ITEMS.c.id == item_id)).first()
        return KnownItem(row.status, row.budget_tokens, row.budget_usd) if row else None

    def note(self, item: WorkItem) -> None:
        """An item changed through this process: known at once, without waiting for the next reload."""
        self._items[item.id] = KnownItem(item.status, item.budget_tokens, item.budget_usd)
        self._missing.pop(item.id, None)

    def note_changes(self, statuses: dict[str, str]) -> None:
        for item_id, status in statuses.items():
            current = self._items.get(item_id) or KnownItem(status)
            self._items[item_id] = KnownItem(status, current.budget_tokens, current.budget_usd)
            self._missing.pop(item_id, None)


@dataclass(frozen=True)
class Policy:
    """`open` accepts any well-formed id; `known` needs it registered; `active` registered and not done or closed."""

    mode: str
    items: ItemCache

    async def check(self, item_id: str) -> KnownItem | None:
        if self.mode == "open":
            return self.items.cached(item_id)
        item = await self.items.lookup(item_id)
        if item is None:
            raise WorkItemUnknown(
                f"The work item {item_id} is not registered, and this proxy accepts only registered items (work_items.mode: "
                f"{self.mode}). Register it (taskproxy items add {item_id}) or connect the tracker's webhook."
            )
        if self.mode == "active" and item.status in RESOLVED:
            raise WorkItemClosed(
                f"The work item {item_id} is {item.status}; this proxy refuses spend on completed or closed items "
                "(work_items.mode: active). Reopen it in the tracker, or attach the item you are working on."
            )
        return item
