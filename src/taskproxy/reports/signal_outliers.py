"""The cost outlier signal: keys with a large share of a completed item whose cost is an outlier in its
team (see `signals.py` for the definition). An item's cost is as the adoption report counts it: all
its usage, and a merged pull request's with that of the tickets it carries, each since the ticket's
merged pull request before it, up to its merge (`signal_carry.py`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from taskproxy.money import usd
from taskproxy.reports import signal_carry
from taskproxy.reports.adoption_data import Carry
from taskproxy.reports.signal_data import (
    MAD_SCALE,
    MEAN_AD_SCALE,
    SPEND_FIELDS,
    Found,
    ItemRow,
    Spend,
    add_spend,
    item_entry,
    listed,
    load_items,
    rounded,
    span,
)
from taskproxy.settings import SignalSettings
from taskproxy.storage import idsets, rollup
from taskproxy.storage.repo import completed_ids
from taskproxy.timeutil import iso
from taskproxy.workitems import team_of_project

Outlier = tuple[str, str, int, float, float, float, int]  # team, item, cost, z, median, MAD, team items


def cost_outliers(
    connection: Connection, items: dict[str, ItemRow], since: datetime, until: datetime, t: SignalSettings, item_teams: Mapping[str, str],
    carries: list[Carry],
) -> list[Found]:  # fmt: skip
    """Keys with a large share of a completed item whose all-time cost is an outlier in its team. The
    items' costs and their teams' spend come from the per-item totals (`rollup.LIFETIME`, by the
    items' ids), and the carried tickets' in their spans (`carries`: those of the pull requests
    completed in the period; `signal_carry.carried`) from `signal_carry`; only the outliers' spend per
    key is read, from the per-key rollup (all time) and, for a carried ticket, its span's ends' days."""
    found_cost = rollup.grouped(connection, by=("work_item", "team"), period=rollup.LIFETIME, fields=("cost_nanos", "total_tokens"),
                                where=lambda c: [c.work_item.in_(completed_ids(since, until))])  # fmt: skip
    item_cost: dict[str, int] = defaultdict(int)  # item -> its all-time known cost, with the tickets it carries
    team_spend: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)  # item -> team -> (cost, tokens)
    priced: set[str] = set()
    for work_item, team, cost, tokens in found_cost:
        if cost is not None:
            priced.add(work_item)
        item_cost[work_item] += int(cost or 0)
        if team != "":  # '' stands for events without a team: not a team that spent
            team_spend[work_item][team] = (int(cost or 0), int(tokens or 0))
    carried_by_pull: dict[str, list[str]] = defaultdict(list)
    for carry in sorted(carries, key=lambda carry: (carry.ticket, carry.pull)):
        carried_by_pull[carry.pull].append(carry.ticket)
    for carry, cost in signal_carry.carried_costs(connection, carries).items():
        if cost is not None:
            priced.add(carry.pull)
            item_cost[carry.pull] += cost

    costs_by_team: dict[str, dict[str, int]] = defaultdict(dict)
    teamless = {item_id for item_id in priced if items[item_id].team is None}
    for item_id, team in _teams_of_teamless(connection, teamless, items, team_spend, carried_by_pull, item_teams).items():
        costs_by_team[team][item_id] = item_cost[item_id]
    for item_id in priced - teamless:
        costs_by_team[items[item_id].team][item_id] = item_cost[item_id]  # type: ignore[index]
    outliers = _outliers(costs_by_team, t)

    by_item: dict[str, dict[str, Spend]] = defaultdict(dict)  # outlier item -> key -> all-time spend, its carried tickets' included
    all_time = rollup.Period(levels=rollup.KEY_LEVELS)  # every day of the per-key rollup
    for chunk in idsets.batches(connection, sorted({item_id for _, item_id, *_ in outliers})):
        found_spend = rollup.grouped(connection, by=("work_item", "key_id"), period=all_time, fields=SPEND_FIELDS,
                                     where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)])  # fmt: skip
        for work_item, key_id, requests, cost, tokens, first, last in found_spend:  # SPEND_FIELDS, unpacked
            add_spend(by_item[work_item].setdefault(key_id, Spend(work_item)), requests, cost, tokens, first, last)
    outlying = {item_id for _, item_id, *_ in outliers}
    spans = signal_carry.spans_of([carry for carry in carries if carry.pull in outlying], None)
    for carry, per_key in signal_carry.key_spend_within(connection, spans).items():
        for key_id, s in per_key.items():
            add_spend(by_item[carry.pull].setdefault(key_id, Spend(carry.pull)), s.requests, s.cost, s.tokens, s.first, s.last)

    flagged: dict[str, list[tuple[Spend, dict[str, Any]]]] = defaultdict(list)
    for team, item_id, cost, z, median, mad, team_items in outliers:
        for key_id, s in by_item[item_id].items():
            share = s.cost / cost if cost > 0 else 0.0
            if share < t.cost_min_key_share:
                continue
            figures = {
                "completed_at": iso(items[item_id].completed_at),
                "item_cost_usd": usd(cost),
                "team": team,
                "team_items": team_items,
                "team_median_usd": usd(median),
                "team_mad_usd": usd(mad),
                "robust_z": rounded(z, 3),
                "ratio_to_median": rounded(cost / median, 3) if median > 0 else None,
                "key_cost_usd": usd(s.cost),
                "key_share": rounded(share, 6),
                "carried_tickets": sorted(carried_by_pull.get(item_id, ())),
                "first": iso(s.first),
                "last": iso(s.last),
            }
            flagged[key_id].append((s, figures))
    found = []
    for key_id, entries in flagged.items():
        spends = [s for s, _ in entries]
        evidence = {
            "items": len(entries),
            "requests": sum(s.requests for s in spends),
            "cost_usd": usd(sum(s.cost for s in spends)),
            **span(spends),
        }
        found.append((key_id, evidence, listed([item_entry(items, s, **figures) for s, figures in entries])))
    return found


def _teams_of_teamless(connection: Connection, teamless: set[str], items: dict[str, ItemRow], team_spend: dict[str, dict[str, tuple[int, int]]],
                       carried_by_pull: Mapping[str, list[str]], item_teams: Mapping[str, str]) -> dict[str, str]:  # fmt: skip
    """The team of each completed item without one, as the adoption report decides it (adoption_teams.py):
    a pull request carrying tickets takes theirs (their own, else their project's), else the team that
    spent the most on it, its carried tickets' spenders counted as its own (all time)."""
    carriers: dict[str, list[str]] = defaultdict(list)  # ticket -> the teamless pull requests carrying it (a part each)
    for item_id in sorted(teamless):
        for ticket in carried_by_pull.get(item_id, ()):
            carriers[ticket].append(item_id)
    tickets = sorted(carriers)
    rows_of = load_items(connection, tickets, item_teams)
    spent_on: dict[str, dict[str, tuple[int, int]]] = {item_id: dict(team_spend.get(item_id, {})) for item_id in teamless}
    for chunk in idsets.batches(connection, tickets):
        for ticket, team, cost, tokens in rollup.grouped(connection, by=("work_item", "team"), period=rollup.LIFETIME, fields=("cost_nanos", "total_tokens"),
                                                         where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)]):  # fmt: skip
            if team == "":  # events without a team: not a team that spent
                continue
            for pull in carriers[ticket]:
                spent = spent_on[pull]
                known = spent.get(team, (0, 0))
                spent[team] = (known[0] + int(cost or 0), known[1] + int(tokens or 0))
    found = {}
    for item_id in teamless:
        carried = carried_by_pull.get(item_id, ())
        team = next((found_team for ticket in carried if (found_team := rows_of[ticket].team if ticket in rows_of else team_of_project(ticket, item_teams))), None)
        if team is None and spent_on[item_id]:
            team = min(spent_on[item_id].items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[0]
        if team is not None:
            found[item_id] = team
    return found


def _outliers(costs_by_team: dict[str, dict[str, int]], t: SignalSettings) -> list[Outlier]:
    """The items whose cost is far above their team's median: a robust z-score (MAD, or the mean
    absolute deviation when the MAD is 0) and a ratio to the median, both at their thresholds."""
    found: list[Outlier] = []
    for team, costs in costs_by_team.items():
        if len(costs) < t.cost_min_items:
            continue
        values = list(costs.values())
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        mean_ad = statistics.fmean(abs(v - median) for v in values)
        if mad > 0:
            scale = mad / MAD_SCALE
        elif mean_ad > 0:
            scale = MEAN_AD_SCALE * mean_ad
        else:
            continue
        for item_id, cost in costs.items():
            z = (cost - median) / scale
            if z >= t.cost_min_z and cost >= t.cost_min_ratio * median:
                found.append((team, item_id, cost, z, median, mad, len(values)))
    return found
