"""Budgets per work item and per team (tokens and USD), checked before anything goes upstream.

Spend is counted in memory: each process counts what the provider reports the moment it passes by
on the request path (metering/meter.py), before the client has the end of the answer, and adds what
only the writer thread learns (an estimate, when the provider reported nothing) as it builds the
record. It re-reads the totals from the database every `budgets.refresh_seconds` (spend through
other replicas), keeping the larger of its own count and the database's. A request is refused once
the spend has reached the limit, so on one process the overshoot is bounded by the requests already
admitted and still in flight when the limit is crossed: a client sending one request after another
is refused on the first request after its budget is spent.
Across replicas add what the others answered within one re-read interval and one commit interval of
their writers (and, when one replica's uncommitted spend and another's new spend meet in a re-read,
the smaller of the two). Team budgets run per calendar month, UTC.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from taskproxy.errors import BudgetExceeded
from taskproxy.guard.items import ItemCache, KnownItem
from taskproxy.money import format_usd, to_nanos, usd
from taskproxy.settings import BudgetSettings
from taskproxy.storage.models import UsageEvent
from taskproxy.storage.writer import Record

log = logging.getLogger("taskproxy.budgets")
_E = UsageEvent.__table__.c
_IDS_PER_QUERY = 5000  # ids bound in one IN (...): PostgreSQL takes at most 65,535 parameters a statement


def _month(ts: datetime) -> str:
    return ts.strftime("%Y-%m")


class Budgets:
    def __init__(self, engine: Engine, settings: BudgetSettings, items: ItemCache) -> None:
        self._engine = engine
        self._settings = settings
        self._items = items
        self._lock = threading.Lock()
        self._item_spent: dict[str, list[int]] = {}  # item → [tokens, nano-USD]
        self._team_spent: dict[tuple[str, str], list[int]] = {}  # (team, "YYYY-MM") → [tokens, nano-USD]

    @property
    def _item_defaults(self) -> bool:
        return self._settings.work_item_tokens is not None or self._settings.work_item_usd is not None

    def load(self, now: datetime) -> None:
        """Re-read spend from the database (blocking; run it in a thread)."""
        item_query = select(_E.work_item, func.sum(_E.total_tokens), func.sum(_E.cost_nanos)).group_by(_E.work_item)
        queries = [item_query]
        if not self._item_defaults:
            wanted = self._items.items_with_budgets()
            queries = [item_query.where(_E.work_item.in_(wanted[i : i + _IDS_PER_QUERY])) for i in range(0, len(wanted), _IDS_PER_QUERY)]
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        teams = list(self._settings.teams)
        with self._engine.connect() as connection:
            items = [row for query in queries for row in connection.execute(query)]
            team_rows = connection.execute(
                select(_E.team, func.sum(_E.total_tokens), func.sum(_E.cost_nanos)).where(_E.team.in_(teams), _E.ts >= month_start).group_by(_E.team)
            ).all() if teams else []  # fmt: skip
        with self._lock:
            # Spend only grows. Counted here but not committed yet, it is missing from the database's totals:
            # keep the larger of the two, so a re-read never forgets this process's latest spend.
            for row in items:
                _raise_to(self._item_spent.setdefault(row[0], [0, 0]), row[1], row[2])
            for row in team_rows:
                _raise_to(self._team_spent.setdefault((row[0], _month(now)), [0, 0]), row[1], row[2])


    def charge(self, item_id: str, team: str | None, ts: datetime, tokens: int, nanos: int) -> None:
        """Count spend the provider just reported (the request path; cheap, no database)."""
        if not tokens and not nanos:
            return
        with self._lock:
            spent = self._item_spent.setdefault(item_id, [0, 0])
            spent[0] += tokens
            spent[1] += nanos
            if team in self._settings.teams:
                team_spent = self._team_spent.setdefault((team, _month(ts)), [0, 0])  # type: ignore[arg-type]
                team_spent[0] += tokens
                team_spent[1] += nanos

    def record(self, record: Record) -> None:
        """Count what an event's record adds to what the request path counted (the writer thread)."""
        if record.kind != "event":
            return
        row = record.row
        self.charge(row["work_item"], row["team"], row["ts"], int(row["total_tokens"] or 0) - record.charged[0],
                    int(row["cost_nanos"] or 0) - record.charged[1])  # fmt: skip

    def check(self, item_id: str, known: KnownItem | None, team: str | None, now: datetime) -> None:
        tokens_limit = known.budget_tokens if known and known.budget_tokens is not None else self._settings.work_item_tokens
        usd_limit = known.budget_usd if known and known.budget_usd is not None else self._settings.work_item_usd
        spent_tokens, spent_nanos = self._item_spent.get(item_id, (0, 0))
        where = f"The work item {item_id}"
        _refuse_if_spent(where, spent_tokens, tokens_limit, spent_nanos, usd_limit)
        team_budget = self._settings.teams.get(team) if team else None
        if team_budget is not None:
            spent_tokens, spent_nanos = self._team_spent.get((team, _month(now)), (0, 0))  # type: ignore[arg-type]
            _refuse_if_spent(f"The team {team} this month", spent_tokens, team_budget.tokens, spent_nanos, team_budget.usd)


def _raise_to(spent: list[int], tokens: object, nanos: object) -> None:
    spent[0] = max(spent[0], int(tokens or 0))  # type: ignore[call-overload]
    spent[1] = max(spent[1], int(nanos or 0))  # type: ignore[call-overload]


def _refuse_if_spent(where: str, tokens: int, tokens_limit: int | None, nanos: int, usd_limit: float | None) -> None:
    if tokens_limit is not None and tokens >= tokens_limit:
        raise BudgetExceeded(f"{where} has used {tokens:,} tokens of its budget of {tokens_limit:,} tokens. Ask an admin to raise it.")
    if usd_limit is not None and nanos >= to_nanos(usd_limit):
        raise BudgetExceeded(f"{where} has spent {format_usd(usd(nanos))} of its budget of {format_usd(usd_limit)}. Ask an admin to raise it.")
