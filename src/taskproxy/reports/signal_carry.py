"""What the gaming signals count of a ticket that a merged pull request carries, as the adoption report
does (`adoption_data.carried_by`): a ticket not done led to each of its merged pull requests still
standing with its usage since the one before (a `Carry`: its span), up to that merge. So the signals
and the report agree:

- `spend_without_completion`: a key's period spend on such a ticket, up to its last merge, is spend
  on completed work (a ticket left open after its PR merged, the usual case when the tracker is not
  kept tidy, flagged every key that worked on it before);
- `cost_outlier`: a merged pull request's cost holds its carried tickets' usage in its spans, and
  the keys that spent it are among its spenders (work put on a ticket left open, a tenth of it on the
  pull request, hid the cost from the comparison before);
- `trivial_completions`: a key's spend on a carried ticket in the pull request's span, from before
  the period too, is its spend on the pull request (`on_their_pull_requests`): one tiny request on the
  ticket made a hand-done pull request AI-assisted, and the check, which read the key's requests on the
  pull request alone, saw nothing.

Read for the tickets concerned alone, by index: their per-key days from `usage_key_daily`, and the raw
events of the merge's own day up to the merge (and of the part of a day a span starts in).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import DateTime, String, func, or_, select
from sqlalchemy.engine import Connection

from taskproxy.reports import adoption_data
from taskproxy.reports.signal_data import SPEND_FIELDS, Span, Spend, add_spend, events_within, with_spend
from taskproxy.storage import idsets, rollup
from taskproxy.storage.rollup import is_request
from taskproxy.storage.models import WorkItem, WorkItemLink
from taskproxy.storage.rows import rows
from taskproxy.workitems import MERGED_PR

_MICROSECOND = timedelta(microseconds=1)
K = TypeVar("K", bound=Hashable)  # what names a span: a ticket, or a carry


def carried(connection: Connection, since: datetime) -> list[adoption_data.Carry]:
    """The carries of the pull requests completed from `since` on. Those of a period are those merged
    before its end: which part of a ticket a pull request carries does not depend on the period
    (`adoption_data.carried_by`)."""
    return adoption_data.carried_by(connection, {}, since, None)


def last_merges(carries: Iterable[adoption_data.Carry]) -> dict[str, datetime]:
    """{ticket: the merge of the last pull request carrying it}: its usage up to there led to them."""
    found: dict[str, datetime] = {}
    for carry in carries:
        found[carry.ticket] = max(found.get(carry.ticket, carry.merge), carry.merge)
    return found


def spans_of(carries: Iterable[adoption_data.Carry], since: datetime | None) -> dict[adoption_data.Carry, tuple[str, datetime | None, datetime]]:
    """Each carry's span as `key_spend_within` reads it: (ticket, from, its merge), from just after the
    merge before it (and from `since`, unless None); an empty one left out."""
    found: dict[adoption_data.Carry, tuple[str, datetime | None, datetime]] = {}
    for carry in carries:
        start = None if carry.after is None else carry.after + _MICROSECOND  # the previous merge's own moment is its pull request's
        if since is not None and (start is None or since > start):
            start = since
        if start is None or start <= carry.merge:
            found[carry] = (carry.ticket, start, carry.merge)
    return found


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
    ticket's merge, itself included (`key_spend_within`)."""
    return key_spend_within(connection, {ticket: (ticket, since, merge) for ticket, merge in merges.items()})


def key_spend_within(connection: Connection, spans: Mapping[K, tuple[str, datetime | None, datetime]]) -> dict[K, dict[str, Spend]]:
    """Per span and key: the key's events on the span's ticket from its start (None: all time) up to
    its end, itself included (`spans`: {name: (ticket, start, end)}; a ticket's spans do not overlap).
    The whole days between from the per-key rollup, the rest (the end's day up to it, and the part of a
    day the start falls in) from the raw events; the spans' days in one statement (`idsets.tables`)."""
    found: dict[K, dict[str, Spend]] = defaultdict(dict)
    days: list[tuple[str, datetime, datetime]] = []  # (ticket, first whole day, the end's day): [low, high)
    named: dict[tuple[str, datetime, datetime], K] = {}  # those days -> their span
    raw: list[Span] = []
    raw_of: dict[str, list[tuple[datetime, datetime, K]]] = defaultdict(list)  # ticket -> (after, before, its span)

    def from_raw(name: K, ticket: str, after: datetime, before: datetime) -> None:
        raw.append((ticket, None, after, before))
        raw_of[ticket].append((after, before, name))

    for name, (ticket, since, merge) in spans.items():
        merge_day = rollup.KEY_DAILY.floor(merge)
        if since is not None and since >= merge_day:  # within the merge's day (or after the merge: none): its raw events alone
            from_raw(name, ticket, since - _MICROSECOND, merge + _MICROSECOND)
            continue
        first_day = datetime.min if since is None else rollup.KEY_DAILY.ceil(since)
        if since is not None and since < first_day:  # the part of a day before the first whole one
            from_raw(name, ticket, since - _MICROSECOND, first_day)
        if first_day < merge_day:
            days.append((ticket, first_day, merge_day))
            named[(ticket, first_day, merge_day)] = name
        from_raw(name, ticket, merge_day - _MICROSECOND, merge + _MICROSECOND)
    for _, ranges in idsets.tables(connection, "carried_days", (("id", String(200)), ("low", DateTime()), ("high", DateTime())), days):
        c = rollup.KEY_DAILY.table.c
        query = (select(c.work_item, ranges.c.low, ranges.c.high, c.key_id, *rollup.columns_of(rollup.KEY_DAILY.table, SPEND_FIELDS))
                 .select_from(rollup.KEY_DAILY.table.join(ranges, ranges.c.id == c.work_item))
                 .where(c.bucket >= ranges.c.low, c.bucket < ranges.c.high).group_by(c.work_item, ranges.c.low, ranges.c.high, c.key_id))  # fmt: skip
        for ticket, low, high, key_id, *figures in rows(connection.execute(query)):
            name = named[(ticket, low, high)]
            add_spend(found[name].setdefault(key_id, Spend(ticket)), *figures)
    for key_id, ticket, ts, attempt, route, cost, tokens in events_within(connection, raw):
        name = next(name for after, before, name in raw_of[ticket] if after < ts < before)
        add_spend(found[name].setdefault(key_id, Spend(ticket)), int(is_request(attempt, route)), cost, tokens, ts, ts)
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


def carried_costs(connection: Connection, carries: list[adoption_data.Carry]) -> dict[adoption_data.Carry, int | None]:
    """Per carry: the known cost of its ticket's usage in its span (None: no event with a known price)."""
    usage = adoption_data.carried_usage(connection, carries)
    costs: dict[adoption_data.Carry, int | None] = {}
    for carry, by_model in usage.items():
        known = [cost for _, _, cost, _ in by_model.values() if cost is not None]
        costs[carry] = sum(known) if known else None
    whole = [carry for carry in carries if carry not in usage]  # their span holds all their ticket's usage
    lifetime: dict[str, int | None] = {}
    for chunk in idsets.batches(connection, sorted({carry.ticket for carry in whole})):
        for ticket, cost in rollup.grouped(connection, by=("work_item",), period=rollup.LIFETIME, fields=("cost_nanos",),
                                           where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)]):  # fmt: skip
            lifetime[ticket] = None if cost is None else int(cost)
    for carry in whole:
        if carry.ticket in lifetime:
            costs[carry] = lifetime[carry.ticket]
    return costs


def on_their_pull_requests(connection: Connection, spend: dict[str, dict[str, Spend]], carries: list[adoption_data.Carry]) -> dict[str, dict[str, Spend]]:
    """`spend` (per key and item) with each key's spend on a carried ticket in the span of the pull
    request that carries it, all of it (from before the period too), added to that pull request: the
    report's view of whose work an AI-assisted pull request was. Every carry is read (those of the pull
    requests merged in the period, by id), not only the tickets some key spent on in the period: a tag
    sent on a ticket before the period made a hand-done pull request merged in it AI-assisted unseen."""
    if not carries:
        return spend
    on_pulls: dict[str, dict[str, Spend]] = defaultdict(dict)
    for carry, per_key in key_spend_within(connection, spans_of(carries, None)).items():
        for key_id, part in per_key.items():
            add_spend(on_pulls[key_id].setdefault(carry.pull, Spend(carry.pull)), part.requests, part.cost, part.tokens, part.first, part.last)
    return with_spend(spend, on_pulls)
