"""Each process's view of the work-item registry, and the policy modes that use it.

The view is a bounded working set, not the registry: the items this process has used lately, at most
`work_items.cache_size` of them (least recently used dropped first), plus ids looked up and not found
(remembered for a refresh interval, bounded too). It starts with the most recently changed items and
is kept fresh from the change feed (storage/changes.py): every `work_items.refresh_seconds` the
process reads which items changed anywhere and re-reads just those it holds. An id not held costs
its request one lookup by primary key in a worker thread (in every mode: the item's own budget
applies from its first request; in open mode a database that does not answer lets it through). Inventing ids therefore costs a bounded amount of memory, however
many are sent, and at most four lookups at a time.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache
from sqlalchemy import bindparam, select
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import SQLAlchemyError

from taskproxy.errors import ServiceUnavailable, WorkItemClosed, WorkItemUnknown
from taskproxy.guard.attribution import Attributed
from taskproxy.guard.lookups import Lookups, LookupTimeout
from taskproxy.money import MAX_BUDGET_TOKENS, MAX_BUDGET_USD
from taskproxy.storage.failures import RETRY_SECONDS
from taskproxy.storage.models import WorkItem
from taskproxy.storage.repo import WARM_ROWS_PER_READ
from taskproxy.workitems import RESOLVED

log = logging.getLogger("taskproxy.items")
_ITEMS = WorkItem.__table__
_IDS_PER_QUERY = 5000  # PostgreSQL binds at most 65,535 parameters a statement
# Built once: the statement is compiled once too (SQLAlchemy caches it by its shape).
_BY_IDS = select(_ITEMS.c.id, _ITEMS.c.status, _ITEMS.c.budget_tokens, _ITEMS.c.budget_usd).where(
    _ITEMS.c.id.in_(bindparam("ids", expanding=True))
)
MISSING_SHARE = 4  # ids remembered as missing: at most a quarter of the cache's size


@dataclass(frozen=True, slots=True)
class KnownItem:
    status: str
    budget_tokens: int | None = None
    budget_usd: float | None = None

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None


class ItemCache:
    def __init__(self, engine: Engine, *, refresh_seconds: float = 5.0, capacity: int = 20_000) -> None:
        self._engine = engine
        self._items: LRUCache[str, KnownItem] = LRUCache(capacity)
        self._without_budget: dict[str, KnownItem] = {}  # one shared object per status (`_known`)
        self._missing: TTLCache[str, bool] = TTLCache(max(1, capacity // MISSING_SHARE), ttl=refresh_seconds)
        self._lock = threading.Lock()  # the cache is used from the event loop and from worker threads
        self._lookups = Lookups("item")  # items not in memory (guard/lookups.py)

    def close(self) -> None:
        self._lookups.close()

    @property
    def capacity(self) -> int:
        return int(self._items.maxsize)

    def __len__(self) -> int:
        return len(self._items) + len(self._missing)

    def _known(self, status: str, budget_tokens: int | None = None, budget_usd: float | None = None) -> KnownItem:
        """The item as held. Items without a budget of their own (nearly all) share one object per
        status, instead of each holding an object and a copy of the status: 20,000 cached items took
        2.9 MiB instead of 5.0 (measured on the seed)."""
        if budget_tokens is None and budget_usd is None:
            return self._without_budget.get(status) or self._without_budget.setdefault(status, KnownItem(sys.intern(status)))
        # A budget stored before the API refused ones this large (money.py) counts as the largest.
        if budget_tokens is not None and budget_tokens > MAX_BUDGET_TOKENS:
            budget_tokens = MAX_BUDGET_TOKENS
        if budget_usd is not None and not budget_usd <= MAX_BUDGET_USD:  # NaN too
            budget_usd = MAX_BUDGET_USD
        return KnownItem(sys.intern(status), budget_tokens, budget_usd)

    def _known_row(self, row: Row) -> KnownItem:
        """`_known` of a work_items row (its status and budgets)."""
        return self._known(row.status, row.budget_tokens, row.budget_usd)

    def warm(self) -> None:
        """Fill the cache with the most recently changed items (blocking; run it in a thread)."""
        query = select(_ITEMS.c.id, _ITEMS.c.status, _ITEMS.c.budget_tokens, _ITEMS.c.budget_usd)
        query = query.order_by(_ITEMS.c.updated_at.desc().nulls_last()).limit(self.capacity)
        with self._engine.connect() as connection:
            rows = connection.execution_options(yield_per=WARM_ROWS_PER_READ).execute(query)
            held = [(row.id, self._known_row(row)) for row in rows]
        with self._lock:
            for item_id, known in reversed(held):  # the most recent used last: dropped last
                self._items[item_id] = known

    def fetch(self, ids: Iterable[str]) -> dict[str, KnownItem]:
        """These items as the database has them now (blocking); an id not registered is absent."""
        wanted = list(ids)
        found: dict[str, KnownItem] = {}
        with self._engine.connect() as connection:
            for start in range(0, len(wanted), _IDS_PER_QUERY):
                rows = connection.execute(_BY_IDS, {"ids": wanted[start : start + _IDS_PER_QUERY]})
                found.update({row.id: self._known_row(row) for row in rows})
        return found

    def held(self, ids: Iterable[str]) -> list[str]:
        """Of `ids`, those this process holds (as items or as missing): the ones a change concerns."""
        with self._lock:
            return [item_id for item_id in ids if item_id in self._items or item_id in self._missing]

    def refresh(self, changed: Iterable[str]) -> int:
        """Re-read the items the change feed names that this process holds (blocking). Returns how many."""
        held = self.held(changed)
        if not held:
            return 0
        current = self.fetch(held)
        with self._lock:
            for item_id in held:
                self._missing.pop(item_id, None)
                if item_id in current:
                    if item_id in self._items:
                        self._items[item_id] = current[item_id]
                else:
                    self._items.pop(item_id, None)
        return len(held)

    def forget_all(self) -> None:
        with self._lock:
            self._items.clear()
            self._missing.clear()

    def cached(self, item_id: str) -> KnownItem | None:
        with self._lock:
            return self._items.get(item_id)

    def cached_ids(self) -> list[str]:
        with self._lock:
            return list(self._items.keys())

    async def lookup(self, item_id: str, *, required: bool = True) -> KnownItem | None:
        """The item from memory, else from the database (remembered as missing for a refresh interval).
        With the database down: 503 if the item is `required` to be known, else None."""
        with self._lock:
            known = self._items.get(item_id)
            if known is not None or item_id in self._missing:
                return known
        try:
            found = await self._lookups.run(self.fetch, (item_id,))
        except (SQLAlchemyError, LookupTimeout):
            if not required:  # not remembered: the lookups fail at once while the database stays silent (guard/lookups.py)
                return None
            raise ServiceUnavailable("The work item could not be checked: the database does not answer. Try again shortly.", retry_after=RETRY_SECONDS) from None
        self._remember(item_id, found.get(item_id))
        return found.get(item_id)

    def _remember(self, item_id: str, known: KnownItem | None) -> None:
        with self._lock:
            if known is None:
                self._missing[item_id] = True
            else:
                self._items[item_id] = known
                self._missing.pop(item_id, None)

    def note(self, item: Row) -> None:
        """An item changed through this process: known at once, without waiting for the change feed."""
        self._remember(item.id, self._known_row(item))

    def note_changes(self, statuses: dict[str, str]) -> None:
        with self._lock:
            for item_id, status in statuses.items():
                current = self._items.get(item_id) or self._known(status)
                self._items[item_id] = self._known(status, current.budget_tokens, current.budget_usd)
                self._missing.pop(item_id, None)


@dataclass(frozen=True)
class Policy:
    """`open` accepts any well-formed id; `known` needs it registered; `active` registered and not done or closed."""

    mode: str
    items: ItemCache

    async def check(self, item_id: str) -> KnownItem | None:
        # In open mode any well-formed id is served, the database down or not (usage is spooled meanwhile).
        item = await self.items.lookup(item_id, required=self.mode != "open")
        if item is None and self.mode == "open":
            return None
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

    async def check_attributed(self, attributed: Attributed, binding: str | None) -> tuple[Attributed, KnownItem | None]:
        """`check` the item a request is attributed to. An item a git branch names that this mode refuses
        (a word in the branch that is no item here, `fix/utf-8-names`; an old branch's closed item) gives
        way to the key's binding, if it has one: the branch was read, the binding chosen. The model
        routes and the check before a run (`GET /api/me/work-item`) decide alike."""
        try:
            return attributed, await self.check(attributed.work_item)
        except (WorkItemUnknown, WorkItemClosed):
            if attributed.source != "branch" or binding is None:
                raise
        return Attributed(binding, "binding"), await self.check(binding)
