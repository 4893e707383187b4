"""What the gaming signals count of a ticket that a merged pull request carries, as the adoption report
does (`adoption_data.carried_by`): a ticket not done, whose last merged pull request still standing
is completed, led to that outcome with its usage up to the merge. So the signals and the report agree:

- `spend_without_completion`: a key's period spend on such a ticket, up to the merge, is spend on
  completed work (a ticket left open after its PR merged, the usual case when the tracker is not kept
  tidy, flagged every key that worked on it before);
- `cost_outlier`: a merged pull request's cost holds its carried tickets' usage up to the merge, and
  the keys that spent it are among its spenders (work put on a ticket left open, a tenth of it on the
  pull request, hid the cost from the comparison before);
- `trivial_completions`: a key's spend on a carried ticket up to the merge, from before the period
  too, is its spend on the pull request (`on_their_pull_requests`): one tiny request on the ticket made
  a hand-done pull request AI-assisted, and the check, which read the key's requests on the pull
  request alone, saw nothing.

Read for the tickets concerned alone, by index: their per-key days from `usage_key_daily`, and the raw
events of the merge's own day up to the merge.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import DateTime, String, func, or_, select
from sqlalchemy.engine import Connection

from taskproxy.reports import adoption_data, adoption_item
from taskproxy.reports.signal_data import SPEND_FIELDS, Span, Spend, add_spend, events_within, with_spend
from taskproxy.storage import idsets, rollup
from taskproxy.storage.rollup import is_request
from taskproxy.storage.models import WorkItem, WorkItemLink
from taskproxy.storage.rows import rows
from taskproxy.workitems import MERGED_PR

_MICROSECOND = timedelta(microseconds=1)


def carried(connection: Connection, since: datetime) -> tuple[dict[str, str], dict[str, datetime]]:
    """({ticket: the merged pull request carrying it}, {ticket: that merge}), for the pull requests
    completed from `since` on. Those of a period are those merged before its end: which pull request
    carries a ticket does not depend on the period (`adoption_data.carried_by`)."""
    loaded: dict[str, adoption_item.Item] = {}
    by_pull = adoption_data.carried_by(connection, loaded, since, None)
    return by_pull, {ticket: loaded[pull].completed_at for ticket, pull in by_pull.items()}  # type: ignore[misc]


def merges_as_of(connection: Connection, tickets: Iterable[str], until: datetime) -> dict[str, datetime]:
    """{ticket: the last merge before `until` of a pull request linked to it that still held then (not
    reverted before `until`)}: what the adoption report's spend without outcome splits a ticket's spend
    at, whatever became of the ticket. For `unverified_spend`, whose tickets are no tracker's."""
    found: dict[str, datetime] = {}
    pulls = WorkItem.__table__.c
    links = WorkItemLink.__table__.c
    held = or_(pulls.reworked_at.is_(None), pulls.reworked_at >= until, pulls.rework_reason != "reverted")
    for chunk in idsets.batches(connection, sorted(set(tickets))):
        query = (select(links.work_item, func.max(pulls.merged_at)).select_from(WorkItemLink.__table__.join(WorkItem.__table__, pulls.id == links.linked))
                 .where(idsets.among(connection, links.work_item, chunk), links.kind == MERGED_PR, pulls.status == "done",
                        pulls.merged_at < until, pulls.merged_into.is_(None), held).group_by(links.work_item))  # fmt: skip
        for ticket, merge in rows(connection.execute(query)):
            if merge is not None:
                found[ticket] = merge
    return found


def key_spend_up_to(connection: Connection, merges: Mapping[str, datetime], since: datetime | None) -> dict[str, dict[str, Spend]]:
    """Per ticket and key: the key's events on the ticket from `since` (None: all time) up to the
    ticket's merge, itself included. The whole days between from the per-key rollup, the rest (the
    merge's day up to it, and the part of a day `since` starts in) from the raw events; the tickets'
    days in one statement (`idsets.tables`)."""
    found: dict[str, dict[str, Spend]] = defaultdict(dict)
    days: list[tuple[str, datetime, datetime]] = []  # (ticket, first whole day, the merge's day): [low, high)
    spans: list[Span] = []
    for ticket, merge in sorted(merges.items()):
        merge_day = rollup.KEY_DAILY.floor(merge)
        if since is not None and since >= merge_day:  # within the merge's day (or after the merge: none): its raw events alone
            spans.append((ticket, None, since - _MICROSECOND, merge + _MICROSECOND))
            continue
        first_day = datetime.min if since is None else rollup.KEY_DAILY.ceil(since)
        if since is not None and since < first_day:  # the part of a day before the first whole one
            spans.append((ticket, None, since - _MICROSECOND, first_day))
        if first_day < merge_day:
            days.append((ticket, first_day, merge_day))
        spans.append((ticket, None, merge_day - _MICROSECOND, merge + _MICROSECOND))
    for _, ranges in idsets.tables(connection, "carried_days", (("id", String(200)), ("low", DateTime()), ("high", DateTime())), days):
        c = rollup.KEY_DAILY.table.c
        query = (select(c.work_item, c.key_id, *rollup.columns_of(rollup.KEY_DAILY.table, SPEND_FIELDS))
                 .select_from(rollup.KEY_DAILY.table.join(ranges, ranges.c.id == c.work_item))
                 .where(c.bucket >= ranges.c.low, c.bucket < ranges.c.high).group_by(c.work_item, c.key_id))  # fmt: skip
        for ticket, key_id, *figures in rows(connection.execute(query)):
            add_spend(found[ticket].setdefault(key_id, Spend(ticket)), *figures)
    for key_id, ticket, ts, attempt, route, cost, tokens in events_within(connection, spans):
        add_spend(found[ticket].setdefault(key_id, Spend(ticket)), int(is_request(attempt, route)), cost, tokens, ts, ts)
    return found


def completed_spend(connection: Connection, spends: Mapping[str, list[Spend]], merges: Mapping[str, datetime], since: datetime) -> dict[str, dict[str, int]]:
    """Per key of `spends` (its period spend per item, the period starting at `since`): {ticket: its
    spend up to the merge} on the carried tickets (`merges`) it spent on. A key's spend wholly before
    or wholly after a merge is known from its first and last event; the tickets it spent on across one
    are read (`key_spend_up_to`)."""
    found: dict[str, dict[str, int]] = defaultdict(dict)
    across: set[str] = set()
    for key_id, per_item in spends.items():
        for s in per_item:
            merge = merges.get(s.item)
            if merge is None or s.cost <= 0 or s.first is None or s.first > merge:
                continue
            if s.last is not None and s.last <= merge:
                found[key_id][s.item] = s.cost
            else:
                across.add(s.item)
    if across:
        up_to = key_spend_up_to(connection, {ticket: merges[ticket] for ticket in across}, since)
        for key_id, per_item in spends.items():
            for s in per_item:
                if s.item in across and (cost := up_to[s.item].get(key_id, Spend(s.item)).cost) > 0:
                    found[key_id][s.item] = cost
    return found


def carried_costs(connection: Connection, merges: Mapping[str, datetime]) -> dict[str, int | None]:
    """Per carried ticket: the known cost of its usage up to its merge (None: no event with a known price)."""
    up_to = adoption_data.usage_up_to_merges(connection, merges)
    costs: dict[str, int | None] = {}
    for ticket, by_model in up_to.items():
        known = [cost for _, _, cost, _ in by_model.values() if cost is not None]
        costs[ticket] = sum(known) if known else None
    for chunk in idsets.batches(connection, sorted(set(merges) - set(up_to))):  # used only up to the merge: all their usage
        for ticket, cost in rollup.grouped(connection, by=("work_item",), period=rollup.LIFETIME, fields=("cost_nanos",),
                                           where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)]):  # fmt: skip
            costs[ticket] = None if cost is None else int(cost)
    return costs


def on_their_pull_requests(connection: Connection, spend: dict[str, dict[str, Spend]], carriers: Mapping[str, str],
                           merges: Mapping[str, datetime]) -> dict[str, dict[str, Spend]]:  # fmt: skip
    """`spend` (per key and item) with each key's spend on a carried ticket up to its merge, all of it,
    added to the pull request that carries it (`carriers`): the report's view of whose work an
    AI-assisted pull request was. Every ticket of `carriers` is read (those of the pull requests merged
    in the period, by id), not only those some key spent on in the period: a tag sent on a ticket before
    the period made a hand-done pull request merged in it AI-assisted unseen (found by a review)."""
    if not carriers:
        return spend
    on_pulls: dict[str, dict[str, Spend]] = defaultdict(dict)
    for ticket, per_key in key_spend_up_to(connection, {ticket: merges[ticket] for ticket in carriers}, None).items():
        pull = carriers[ticket]
        for key_id, part in per_key.items():
            add_spend(on_pulls[key_id].setdefault(pull, Spend(pull)), part.requests, part.cost, part.tokens, part.first, part.last)
    return with_spend(spend, on_pulls)
