"""Which team the adoption report counts each item and each refusal for: an item's own team, else its
tracker project's (`work_items.teams`), else (a merged PR carrying tickets) theirs, else the team that
spent the most on it; a refusal, the team of the key refused (none without a key). Read after
`adoption_data.load`, for the items it loaded alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from taskproxy.reports.adoption_item import Item
from taskproxy.storage import idsets, rollup
from taskproxy.storage.models import ApiKey, Rejection
from taskproxy.storage.rollup import within
from taskproxy.workitems import team_of_project

_K = ApiKey.__table__.c
_J = Rejection.__table__.c


def assign_teams(connection: Connection, items: dict[str, Item], since: datetime, until: datetime, item_teams: Mapping[str, str]) -> None:
    """Items without a team take their project's (`item_teams`), else the team that spent the most on
    them (all time; see adoption.py). (Call after `load`: the items concerned are those used, completed
    or reopened in the period.)"""
    for item in items.values():
        if item.team is None:
            item.team = team_of_project(item.id, item_teams)
    for item in items.values():  # a merged PR carrying tickets (carry_tickets) is their work: their team, if they have one
        if item.team is None and item.carries:
            item.team = next((team for t in sorted(item.carries) if (team := items[t].team or team_of_project(t, item_teams))), None)
    teamless = [item for item in items.values() if item.team is None and (item.period_events or item.delivered_in(since, until))]
    spent_on: dict[str, list[str]] = defaultdict(list)  # the tickets it carries: their spenders are its spenders
    for item in teamless:
        for t in item.carries:
            spent_on[t].append(item.id)  # two pull requests of the period may carry one ticket, each its own part
    found: dict[tuple, dict[str, Any]] = {}
    for chunk in idsets.batches(connection, sorted({item.id for item in teamless} | spent_on.keys())):
        found |= rollup.totals(connection, by=("work_item", "team"), period=rollup.LIFETIME, fields=("cost_nanos", "total_tokens"),
                               where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)])  # fmt: skip
    sums: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for (work_item, team), row in found.items():
        if team is None:  # events without a team are not counted
            continue
        for spender_of in {work_item, *spent_on.get(work_item, ())}:
            spent = sums[spender_of][team]
            spent[0] += int(row["cost_nanos"] or 0)
            spent[1] += int(row["total_tokens"] or 0)
    for item_id, by_team in sums.items():
        if item_id in items and items[item_id].team is None:
            items[item_id].team = min((-cost, -tokens, team) for team, (cost, tokens) in by_team.items())[2]  # most cost, then most tokens, then the first name


def rejections(connection: Connection, since: datetime, until: datetime) -> list[tuple[str | None, bool, str, int]]:
    """(the key's team, whether a key was known, reason, count): a refusal without a key is nobody's."""
    keyed = _K.id.is_not(None).label("keyed")
    query = (
        select(_K.team, keyed, _J.reason, func.sum(_J.count).label("n"))
        .select_from(Rejection.__table__.outerjoin(ApiKey.__table__, _K.id == _J.key_id))
        .where(*within(_J.ts, since, until))
        .group_by(_K.team, keyed, _J.reason)
    )
    return [(row.team, bool(row.keyed), row.reason, int(row.n)) for row in connection.execute(query)]
