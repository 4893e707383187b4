"""What the adoption report reads (the definitions are in `adoption.py`'s docstring): the work items the
period touched (used or completed in it, and the items they link to), their spend aggregated per item and
model, their status history and links (`adoption_teams.py`: the team each counts for, and the refusals). Nothing is read for the rest of
the organisation's history: each step reads by index, in batches of ids (storage/idsets.py).

Spend comes from the usage rollups (`storage/rollup.py`): the whole days of the period from the daily
rollup, the whole hours left at its ends from the hourly one, its partial hours from the raw events.
Spend after completion is split the same way: buckets that start after `completed_at` are wholly after
it, the one containing it is read at the next finer level. Nothing is approximated: the figures are
those a scan of usage_events would give.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy import DateTime, String, func, or_, select, true
from sqlalchemy.engine import Connection

from taskproxy.storage import idsets, rollup, spend_after
from taskproxy.storage.rollup import TOKEN_COUNT_ROUTES, within
from taskproxy.storage.rows import rows
from taskproxy.storage.repo import completed_ids
from taskproxy.reports.adoption_item import Item
from taskproxy.workitems import IN_PROGRESS, MERGED_PR, RESOLVED, changed_lines
from taskproxy.storage.models import UsageEvent, WorkItem, WorkItemChange, WorkItemLink, WorkItemSize

_E = UsageEvent.__table__.c
_W = WorkItem.__table__.c
_C = WorkItemChange.__table__.c
_L = WorkItemLink.__table__.c
_S = WorkItemSize.__table__.c



def load(connection: Connection, since: datetime, until: datetime, *, stale_after: timedelta, now: datetime) -> dict[str, Item]:
    """The items the report reads, and only those: the items with usage in the period, the items
    completed in it, and the items their links point to. Each step reads by index what those items
    need, so the work grows with the period's activity, not with the organisation's history."""
    items = _period_spend(connection, since, until)
    for item_id in rows(connection.execute(completed_ids(since, until)).scalars()):
        _item(items, item_id)
    reopened = _reopened_completions(connection, since, until)
    for item_id in reopened:
        _item(items, item_id)
    _load_rows(connection, items, sorted(items))
    _points_at_completion(connection, items, since, until)
    _load_completed(connection, items, since, until)
    _load_redone(connection, items, since, until)
    _load_usage(connection, items, sorted(set(reopened) - {i for i, item in items.items() if item.by_model}))
    for item_id, completion in reopened.items():
        items[item_id].reopened_completion = completion
    targets = _load_links(connection, items)
    linked_ids = {target for linked in targets.values() for target in linked}
    _load_rows(connection, items, sorted(linked_ids - set(items)))
    _load_statuses_at(connection, items, until, wanted={i for i, item in items.items() if item.period_events} | linked_ids)
    _load_started(connection, items)
    _load_judged(connection, items, since, until, stale_after, now, linked_ids)
    merges: dict[str, datetime] = {}  # ticket -> its last merged PR's merge, as of until
    for ticket, linked in targets.items():
        for target in linked:
            item = items.get(target)
            if item is not None and item.status_at_until == "done" and not item.undone_as_of(until) and not _led_nowhere(item, linked, items):
                items[ticket].merged_pr = True
                if (merged := item.completed_at_until) is not None:  # its merge as of until: reopened since, it has none now
                    merges[ticket] = max(merges.get(ticket, merged), merged)
    # A carried ticket's usage up to its carrier's merge is that PR's cost: after it, its spend is read from there
    # (a later merge reverted since leaves the carrier an earlier one; the spend between them is then after it).
    for ticket, merge in carry_tickets(connection, items, since, until).items():
        items[ticket].merged_pr, merges[ticket] = True, merge
    # Only where the figure is read: a ticket with spend in the period, not done as of until, not undone.
    counted = {t: m for t, m in merges.items()
               if items[t].spend and (items[t].status_at_until != "done" or items[t].undone_later) and not items[t].undone_as_of(until)}
    _load_spend_after_merges(connection, items, counted, since, until)
    return items


def _led_nowhere(pull: Item, linked: list[str], items: dict[str, Item]) -> bool:
    """A ticket's merged pull request as of `until` whose merge was undone later (`Item.undone_later`)
    covers none of the ticket's spend, unless another of its pull requests landed the work by the time
    it was judged: that one carries the spend then (`carried_by`), and it would count twice."""
    if not pull.undone_later:
        return False
    landed = (items.get(other) for other in linked if other != pull.id)
    return not any(other is not None and other.merge_holds and other.completed_at is not None and other.completed_at <= pull.judged_at  # type: ignore[operator]
                   for other in landed)  # fmt: skip


def _load_spend_after_merges(connection: Connection, items: dict[str, Item], merges: dict[str, datetime], since: datetime,
                             until: datetime) -> None:  # fmt: skip
    """Each ticket's spend in the period after its last merged PR (`merges`), read as the spend after
    completion is (storage/spend_after.py), against the moments bound as tables (`idsets.tables`)."""
    for _, moments in idsets.tables(connection, "adoption_merges", (("id", String(200)), ("moment", DateTime())), list(merges.items())):
        for ticket, spend in spend_after.cost_after(connection, rollup.Period(since, until), moments, moments.c.moment, true()).items():
            items[ticket].spend_after_merge = spend


def load_completed(connection: Connection, since: datetime, until: datetime) -> dict[str, Item]:
    """The items completed in [since, until), with their rows and all-time usage per model, as `load`
    reads them: what the completed-item figures of any period inside it need."""
    items = {item_id: Item(item_id) for item_id in rows(connection.execute(completed_ids(since, until)).scalars())}
    _load_rows(connection, items, sorted(items))
    _points_at_completion(connection, items, since, until)
    _load_completed(connection, items, since, until)
    _load_redone(connection, items, since, until)
    carry_tickets(connection, items, since, until)
    return items


class Carry(NamedTuple):
    """A merged pull request's part of a ticket it came out of (`carried_by`): the ticket's usage after
    `after`, the merge of the ticket's merged pull request before this one (None: there is none), up to
    `merge`, this one's, included."""

    ticket: str
    pull: str
    after: datetime | None
    merge: datetime


def carry_tickets(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> dict[str, datetime]:
    """The tickets that are not done (now) count their usage in the outcomes their work led to: each of
    their merged pull requests whose merge stands now carries the usage since the one before it (a
    `Carry`, `carried_by`), here those completed in the period. Else the ticket's spend up to a merge
    was in no completed item's cost, nor in spend without outcome (the merge covers it): work put on a
    ticket left open, or closed as Won't Do, with a tenth of it on the pull request, made the cost per
    completed item a tenth of what the work cost. Each such ticket's usage is in one outcome's cost: its
    own, once done, or that of the merged pull request it came before. Only since the one before: a
    hand-done pull request naming an old ticket (its branch) carried all its usage again, AI-assisted
    by it, and the earlier one, read again, lost it. Returns {ticket: its last carrier's merge}."""
    carries = carried_by(connection, items, since, until)
    _load_usage(connection, items, sorted({c.ticket for c in carries if not items[c.ticket].by_model}))
    usage = carried_usage(connection, carries)
    merges: dict[str, datetime] = {}
    for carry in carries:
        pull = items[carry.pull]
        pull.absorb(items[carry.ticket].by_model if carry not in usage else usage[carry], carry.merge)
        pull.carries += (carry.ticket,)
        merges[carry.ticket] = max(merges.get(carry.ticket, carry.merge), carry.merge)
    return merges


def carried_by(connection: Connection, items: dict[str, Item], since: datetime, until: datetime | None) -> list[Carry]:
    """The carries of the merged pull requests completed in [since, until) (None: from `since` on): of
    the tickets not done now and never reworked (a completion undone, reopened or reverted, makes its
    spend reworked), each merged pull request still standing carries the ticket's usage since the one
    before it (by merge, then id), still standing too. A later pull request takes nothing from an
    earlier one, so a period's figures do not change with it. The rows of the tickets and their pull
    requests are loaded into `items` (those not there yet).

    Read by the index on the links' pull request (0022), for the pull requests completed in the period
    only; the tickets' other pull requests for those tickets alone."""
    query = (select(_L.work_item).select_from(WorkItemLink.__table__.outerjoin(WorkItem.__table__, _W.id == _L.work_item))
             .where(_L.linked.in_(completed_ids(since, until)), _L.kind == MERGED_PR, or_(_W.status.is_(None), _W.status != "done")))  # fmt: skip
    tickets = set(rows(connection.execute(query).scalars()))  # not done (an id without a row is unverified)
    _load_rows(connection, items, sorted(tickets - items.keys()))
    tickets = {t for t in tickets if _item(items, t).status != "done" and items[t].reworked_at is None}
    pulls = _load_links(connection, {t: items[t] for t in tickets})
    _load_rows(connection, items, sorted({p for linked in pulls.values() for p in linked} - items.keys()))
    carries: list[Carry] = []
    for ticket, linked in sorted(pulls.items()):
        standing = sorted((items[p] for p in set(linked) if p in items and items[p].merge_holds and items[p].completed_at is not None),
                          key=lambda item: (item.completed_at, item.id))  # fmt: skip
        after: datetime | None = None
        for pull in standing:
            if pull.completed_in(since, until or datetime.max):
                carries.append(Carry(ticket, pull.id, after, pull.completed_at))  # type: ignore[arg-type]
            after = pull.completed_at
    return carries


def carried_usage(connection: Connection, carries: list[Carry]) -> dict[Carry, dict[str, tuple[int, int, int | None, int]]]:
    """Per carry whose span holds only part of its ticket's usage: the usage per model in it (none: an
    empty dict); a carry left out carries all of it. Read as it is, not as all time less what came
    outside (a request committed between two reads, or a price known only later, would make that
    wrong), for those tickets alone, by their first and last use (all time): the spans from the
    ticket's first usage by `usage_up_to_merges`, the later ones by `spend_after.usage_between`, each
    one statement."""
    first_used: dict[str, datetime] = {}
    last_used: dict[str, datetime] = {}
    for chunk in idsets.batches(connection, sorted({c.ticket for c in carries if c.after is not None})):
        for work_item, first, last in rollup.grouped(connection, by=("work_item",), period=rollup.LIFETIME, fields=("first_used", "last_used"),
                                                     where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)]):  # fmt: skip
            first_used[work_item], last_used[work_item] = first, last
    found: dict[Carry, dict[str, tuple[int, int, int | None, int]]] = {}
    up_to = usage_up_to_merges(connection, {c.ticket: c.merge for c in carries if c.after is None})  # one such carry per ticket
    for carry in carries:
        if carry.after is None and carry.ticket in up_to:
            found[carry] = up_to[carry.ticket]
    between: dict[tuple[str, datetime], Carry] = {}
    for carry in carries:
        if carry.after is None:
            continue
        first, last = first_used.get(carry.ticket), last_used.get(carry.ticket)
        if first is None or last is None or last <= carry.after or first > carry.merge or carry.after >= carry.merge:
            found[carry] = {}  # nothing in its span
        elif first <= carry.after or last > carry.merge:
            between[(carry.ticket, carry.merge)] = carry
            found[carry] = {}
    spans = [(ticket, carry.after, merge) for (ticket, merge), carry in sorted(between.items())]
    for ticket, merge, model, attempts, answered, cost, tokens in spend_after.usage_between(connection, spans):  # type: ignore[arg-type]
        found[between[(ticket, merge)]][model] = (int(attempts), int(answered or 0), None if cost is None else int(cost), int(tokens or 0))
    return found


def usage_up_to_merges(connection: Connection, merges: Mapping[str, datetime]) -> dict[str, dict[str, tuple[int, int, int | None, int]]]:
    """Per ticket used after its merge, its usage per model up to it (read as it is, not as all time
    less what came after: a request committed between two reads, or a price known only later, would
    make that wrong), for those tickets alone: the others carry all of theirs (`spend_after.usage_up_to`:
    one statement)."""
    last_used: dict[str, datetime] = {}
    for chunk in idsets.batches(connection, sorted(merges)):
        for work_item, last in rollup.grouped(connection, by=("work_item",), period=rollup.LIFETIME, fields=("last_used",),
                                              where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)]):  # fmt: skip
            last_used[work_item] = last
    used_after = [(ticket, merge) for ticket, merge in sorted(merges.items()) if last_used.get(ticket) is not None and last_used[ticket] > merge]
    found: dict[str, dict[str, tuple[int, int, int | None, int]]] = {ticket: {} for ticket, _ in used_after}
    for ticket, model, attempts, answered, cost, tokens in spend_after.usage_up_to(connection, used_after):
        found[ticket][model] = (int(attempts), int(answered or 0), None if cost is None else int(cost), int(tokens or 0))
    return found


def _item(items: dict[str, Item], item_id: str) -> Item:
    """The item `item_id` of `items`, added if absent. (Not `setdefault`: it would build an Item, and
    its dict, for each of the hundreds of thousands of ids already there.)"""
    item = items.get(item_id)
    if item is None:
        item = items[item_id] = Item(item_id)
    return item


def _load_rows(connection: Connection, items: dict[str, Item], ids: list[str]) -> None:
    """Fill in the registered items among `ids`; an id without a row stays `unverified`."""
    for chunk in idsets.batches(connection, ids):
        query = select(_W.id, _W.team, _W.status, _W.created_at, _W.completed_at, _W.lines_added, _W.lines_deleted, _W.points,
                       _W.reworked_at, _W.rework_reason).where(idsets.among(connection, _W.id, chunk))  # fmt: skip
        # Unpacked, not read by name: a row's attribute costs about a microsecond, eleven of them a
        # second per 100,000 items.
        for item_id, team, status, created_at, completed_at, added, deleted, points, reworked_at, rework_reason in rows(connection.execute(query)):
            item = _item(items, item_id)
            item.team, item.status, item.created_at, item.completed_at, item.status_at_until = team, status, created_at, completed_at, status
            item.completed_at_until = completed_at
            item.lines = changed_lines(added, deleted)
            item.points, item.reworked_at, item.rework_reason = points, reworked_at, rework_reason


def _points_at_completion(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    """The story points (estimate) of the items completed in the period as they stood when each was
    completed: points set or raised afterwards (a ticket re-pointed once done moves into a bigger band,
    and its cost per size looks smaller) do not count, and an item pointed only afterwards is unsized.
    Lines need no such care: a pull request's are final once it is merged. Read only for the items with
    a change of points after their completion (by the index on `completed_at`), then their history."""
    changed_later = (
        select(_S.work_item)
        .select_from(WorkItemSize.__table__.join(WorkItem.__table__, _W.id == _S.work_item))
        .where(*within(_W.completed_at, since, until), _S.points.is_not(None), _S.ts > _W.completed_at)
        .distinct()
    )
    ids = sorted(item_id for item_id in connection.execute(changed_later).scalars() if item_id in items)
    for chunk in idsets.batches(connection, ids):
        at_completion: dict[str, float] = {}
        query = select(_S.work_item, _S.ts, _S.points).where(idsets.among(connection, _S.work_item, chunk), _S.points.is_not(None)).order_by(_S.ts)
        for item_id, ts, points in connection.execute(query):
            completed_at = items[item_id].completed_at
            if completed_at is not None and ts <= completed_at:
                at_completion[item_id] = points
        for item_id in chunk:
            items[item_id].points = at_completion.get(item_id)


def _reopened_completions(connection: Connection, since: datetime, until: datetime) -> dict[str, datetime]:
    """The items reopened after a completion in the period: {item: that completion} (the last change
    to done before the reopening). The candidates are the items with a change to done in the period
    (by the index on `work_item_changes.ts`) that were reopened at or after it: the period's own
    completions, however long ago it was."""
    done_in_period = (
        select(_W.id, _W.reworked_at)
        .select_from(WorkItemChange.__table__.join(WorkItem.__table__, _W.id == _C.work_item))
        .where(_C.to_status == "done", *within(_C.ts, since, until), _W.rework_reason == "reopened", _W.reworked_at >= _C.ts)
        .distinct()
    )
    reopened_at = {row.id: row.reworked_at for row in connection.execute(done_in_period)}
    found: dict[str, datetime] = {}
    for chunk in idsets.batches(connection, reopened_at):
        query = (select(_C.work_item, _C.ts).where(idsets.among(connection, _C.work_item, chunk), _C.to_status == "done")
                 .order_by(_C.work_item, _C.ts))  # fmt: skip
        for row in connection.execute(query):
            if row.ts <= reopened_at[row.work_item]:
                found[row.work_item] = row.ts
    return {item_id: ts for item_id, ts in found.items() if since <= ts < until}


def _load_completed(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    """All-time usage per model of the items completed in the period (from the per-item totals alone)."""
    _fill_usage(connection, items, lambda c: [c.work_item.in_(completed_ids(since, until))])


def _load_redone(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    """Set `reopenings` and `last_answer_since_reopened` of the items completed in the period after a
    reopening. Only an item whose first rework came before its completion can have one (`reworked_at`
    marks the first), so the history is read for those alone; the answers after the first reopening,
    up to the completion, from the raw events, by the (work_item, ts) index. A range in a raw partition
    that `recording.retention_months` dropped finds no answer."""
    candidates = [item for item in items.values() if item.completed_in(since, until) and item.reworked_at is not None
                  and item.completed_at is not None and item.reworked_at < item.completed_at]  # fmt: skip
    for chunk in idsets.batches(connection, [item.id for item in candidates]):
        query = select(_C.work_item, _C.ts, _C.from_status, _C.to_status).where(idsets.among(connection, _C.work_item, chunk)).order_by(_C.work_item, _C.ts)
        done_at: dict[str, datetime] = {}  # each item's last change to done so far
        for work_item, ts, origin, target in rows(connection.execute(query)):
            item = items[work_item]
            if ts >= item.completed_at:  # type: ignore[operator]
                continue
            if origin == "done" and target != "done":
                item.reopenings += ((ts, done_at.get(work_item)),)
            if target == "done":
                done_at[work_item] = ts
    spans = [(item.id, item.reopenings[0][0], item.completed_at) for item in candidates if item.reopenings]
    columns = (("id", String(200)), ("after", DateTime()), ("upto", DateTime()))
    for chunk, spans_table in idsets.tables(connection, "adoption_redone", columns, spans):
        # The outer bounds as values too: the months (partitions) no span reaches are left out, unlocked.
        bounds = (_E.ts > min(after for _, after, _ in chunk), _E.ts <= max(upto for _, _, upto in chunk))
        answered = (select(_E.work_item, func.max(_E.ts)).select_from(spans_table.join(UsageEvent.__table__, _E.work_item == spans_table.c.id))
                    .where(_E.ts > spans_table.c.after, _E.ts <= spans_table.c.upto, *bounds, _E.status < 400, _E.route.not_in(TOKEN_COUNT_ROUTES))
                    .group_by(_E.work_item))  # fmt: skip
        for work_item, last in rows(connection.execute(answered)):
            items[work_item].last_answer_since_reopened = last


def _load_usage(connection: Connection, items: dict[str, Item], ids: list[str]) -> None:
    """All-time usage per model of the items `ids`."""
    for chunk in idsets.batches(connection, ids):
        _fill_usage(connection, items, lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)])


def _fill_usage(connection: Connection, items: dict[str, Item], where: Any) -> None:
    found = rollup.grouped(connection, by=("work_item", "model"), period=rollup.LIFETIME,
                           fields=("attempts", "answered", "cost_nanos", "total_tokens", "first_used", "first_answered"), where=where)  # fmt: skip
    for work_item, model, attempts, answered, cost, tokens, first_used, first_answered in found:
        item = items.get(work_item)
        if item is not None:
            item.add_usage(model, int(attempts), int(answered or 0), None if cost is None else int(cost), int(tokens or 0), first_used, first_answered)


def _period_spend(connection: Connection, since: datetime, until: datetime) -> dict[str, Item]:
    """The items with usage in the period (registered or not, as yet unfilled), with their spend."""
    period = rollup.Period(since, until)
    items: dict[str, Item] = {}
    for work_item, attempts, cost in rollup.grouped(connection, by=("work_item",), period=period, fields=("attempts", "cost_nanos")):
        items[work_item] = Item(work_item, period_events=int(attempts), spend=int(cost or 0))
    resolved = _W.status.in_(RESOLVED)
    for work_item, spend in spend_after.cost_after(connection, period, WorkItem.__table__, _W.completed_at, resolved).items():
        items[work_item].spend_after_completion = spend
    return items


def _load_links(connection: Connection, items: dict[str, Item]) -> dict[str, list[str]]:
    """The links of the items: {item: [the items it links to]}."""
    targets: dict[str, list[str]] = defaultdict(list)
    for chunk in idsets.batches(connection, items):
        query = select(_L.work_item, _L.linked).where(idsets.among(connection, _L.work_item, chunk), _L.kind == MERGED_PR)
        for ticket, linked in rows(connection.execute(query)):
            targets[ticket].append(linked)
    return targets


def _load_statuses_at(connection: Connection, items: dict[str, Item], until: datetime, wanted: set[str]) -> None:
    """Set `status_at_until` and `completed_at_until` of the `wanted` items (`statuses_at`)."""
    for item_id, (status, completed_at) in statuses_at(connection, items, dict.fromkeys(wanted & items.keys(), until)).items():
        items[item_id].status_at_until, items[item_id].completed_at_until = status, completed_at


def _load_started(connection: Connection, items: dict[str, Item]) -> None:
    """Set `started_at` of the items in progress at `until` with spend in the period: the later of
    `created_at` and their first request of all time (the per-item totals, by index)."""
    wanted = {item_id: item for item_id, item in items.items() if item.spend and item.status_at_until in IN_PROGRESS and item.created_at is not None}
    for item in wanted.values():
        item.started_at = item.created_at
    for chunk in idsets.batches(connection, wanted):
        found = rollup.grouped(connection, by=("work_item",), period=rollup.LIFETIME, fields=("first_used",),
                               where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)])  # fmt: skip
        for work_item, first_used in found:
            item = wanted[work_item]
            if first_used is not None and first_used > item.started_at:  # type: ignore[operator]
                item.started_at = first_used


def _load_judged(connection: Connection, items: dict[str, Item], since: datetime, until: datetime, stale_after: timedelta, now: datetime,
                 linked: set[str]) -> None:  # fmt: skip
    """Set `status_judged` and `judged_at` of the items with spend in the period that were work in
    progress at `until` (open or in progress, started less than `stale_after` before it): their status
    as of the moment they turned stale (`started_at + stale_after`), or as of now if that has not come.
    At `until` what that spend led to was not known yet; a clone closed as a duplicate after the period,
    or left open, is then known to have led to nothing (adoption.py, spend without outcome).
    Likewise the items done at `until`, by a completion in the period that no longer stands as it did
    (reopened, closed or reverted since), with spend in the period or `linked` from a ticket (a pull
    request whose merge covers its tickets' spend): as of `stale_after` after `until`, or now until
    then. Else work that led nowhere, set done on the period's last day and reopened the day after, was
    neither a completion nor spend without outcome of any period, nor was a ticket's spend before such
    a merge (`Item.undone_later`)."""
    fresh = [item for item in items.values() if item.started_at is not None and item.started_at >= until - stale_after]
    # Stale once started more than `stale_after` before: at `started_at + stale_after` it is not yet.
    moments = {item.id: item.started_at + stale_after if now > item.started_at + stale_after else now for item in fresh}  # type: ignore[operator]
    settled = until + stale_after if now > until + stale_after else now
    moments |= {item.id: settled for item in items.values() if (item.spend or item.id in linked) and _done_then_undone(item, since, until)}
    for item_id, (status, _) in statuses_at(connection, items, moments).items():
        item = items[item_id]
        item.status_judged, item.judged_at, item.judged_stale = status, moments[item_id], now > moments[item_id]


def _done_then_undone(item: Item, since: datetime, until: datetime) -> bool:
    """Done at `until` by a completion in the period that does not stand now as it stood then."""
    done_then = item.status_at_until == "done" and item.completed_at_until is not None and since <= item.completed_at_until < until
    stands = item.status == "done" and item.completed_at == item.completed_at_until and item.rework_reason != "reverted"
    return done_then and not stands


def statuses_at(connection: Connection, items: Mapping[str, Item], moments: Mapping[str, datetime]) -> dict[str, tuple[str, datetime | None]]:
    """Each item's status as of its moment (`moments`), and its completion then (done or closed), else
    None: the current ones (as `_load_rows` set them) unless a change was recorded at or after the
    moment; then, from its history, the status the last change before the moment left (and, if that
    was a completion, its time), else the one the first change after it found (a completion before any
    recorded change is not dated), or `unverified` if that change created it (a pull request opened
    after `until` was no merged PR then). Only the items changed since the earliest moment are read (by the
    index on `ts`): for a period that ends now, next to none."""
    found: dict[str, tuple[str, datetime | None]] = {}
    for item_id, moment in moments.items():
        item = items[item_id]
        found[item_id] = (item.status, item.completed_at if item.status in RESOLVED else None)
    if not moments:
        return found
    changed_since = set(connection.execute(select(_C.work_item).where(_C.ts >= min(moments.values())).distinct()).scalars())
    before: dict[str, tuple[str, datetime]] = {}
    first_after: dict[str, str | None] = {}
    for chunk in idsets.batches(connection, moments.keys() & changed_since):
        query = (select(_C.work_item, _C.ts, _C.from_status, _C.to_status).where(idsets.among(connection, _C.work_item, chunk))
                 .order_by(_C.work_item, _C.ts))  # fmt: skip
        for row in connection.execute(query):
            if row.ts < moments[row.work_item]:
                before[row.work_item] = (row.to_status, row.ts)
            elif row.work_item not in first_after:
                first_after[row.work_item] = row.from_status
    for item_id in first_after.keys() | before.keys():
        if item_id in before:
            status, at = before[item_id]
            found[item_id] = (status, at if status in RESOLVED else None)
        else:  # its first change came after the moment: the status it found, or none yet (created since)
            found[item_id] = (first_after[item_id] or "unverified", None)
    return found