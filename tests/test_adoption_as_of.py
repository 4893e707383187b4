"""The spend without outcome of a past period reads each item as it stood at the period's end: a
completion made or undone after `until` changes nothing about what the period's spend led to
(adoption.py). Found by a review (2026-12-07): the report read the *current* completion time where it
asked about the completion as of `until`, and let a reverted pull request done again by hand count as
done again."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import BOTH_DATABASES
from signals_org import PRICE
from write_path import past_request, write_all

from taskproxy import registry
from taskproxy.metering.tokens import TokenCounter
from taskproxy.money import usd
from taskproxy.reports.adoption import adoption_report, completions_by_period
from taskproxy.settings import DEFAULT_ID_PATTERNS
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.trackers.base import Delivery, ItemUpdate
from taskproxy.workitems import WorkItemIds

SINCE, UNTIL = datetime(2026, 3, 1), datetime(2026, 3, 8)
DAY, HOUR = timedelta(days=1), timedelta(hours=1)
ONE = PRICE.nanos(100_000, 10_000)  # each request below: $2.25
PR = "acme/web#1"


class World:
    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.engine = make_engine(database_url)
        upgrade_schema(self.engine)
        self.tmp_path, self.counter, self.exchanges = tmp_path, TokenCounter(), []

    def status(self, item: str, status: str, at: datetime, **kwargs: Any) -> None:
        registry.transition(self.engine, item, status, source="api", at=at, fields={"team": "web"}, **kwargs)

    def requests(self, item: str, *times: datetime) -> None:
        key = SimpleNamespace(id="k-1", owner="dana@example.com", team="web")
        for ts in times:
            n = len(self.exchanges)
            self.exchanges.append(past_request(id=f"r-{n}", ts=ts, key=key, work_item=item, model="big-model", body={"n": n},
                                               prompt_tokens=100_000, completion_tokens=10_000, counter=self.counter, price=PRICE))  # fmt: skip

    def without_outcome(self, now: datetime | None = None) -> dict[str, Any]:
        write_all(self.engine, self.tmp_path / "spool.jsonl", self.exchanges, len(self.exchanges))
        overall = adoption_report(self.engine, since=SINCE, until=UNTIL, min_group_size=1, now=now)["overall"]
        return {"total": overall["spend_without_outcome_usd"], **{k: v for k, v in overall["spend_without_outcome_breakdown"].items() if v}}


def merged_then(world: World, after_until: list[str]) -> None:
    """A stale open ticket, $2.25 spent on it before its PR merged on day 2 and $4.50 after; the PR's
    status then changes after `until` (`after_until`)."""
    world.status("T-1", "open", SINCE - 30 * DAY, created_at=SINCE - 30 * DAY)
    world.status(PR, "open", SINCE + DAY, created_at=SINCE + DAY)
    world.status(PR, "done", SINCE + 2 * DAY + 10 * HOUR)
    registry.link(world.engine, "T-1", PR, at=SINCE + 2 * DAY + 10 * HOUR)
    for n, status in enumerate(after_until):
        world.status(PR, status, UNTIL + (n + 2) * DAY)
    world.requests("T-1", SINCE + DAY + 9 * HOUR, SINCE + 4 * DAY + 9 * HOUR, SINCE + 5 * DAY + 9 * HOUR)


@BOTH_DATABASES
def test_a_tickets_spend_after_a_merge_reopened_since_until_is_without_outcome(database_url: str, tmp_path: Path) -> None:
    """As of `until` the PR was merged on day 2: the ticket's spend up to it had an outcome, the $4.50
    after it did not (stale open); the report had lost the $4.50 (merged, but no merge time to split
    at). Reopened after `until` and not merged again once the period settled, the merge led nowhere,
    and neither did the $2.25 it covered."""
    world = World(database_url, tmp_path)
    merged_then(world, ["open"])
    assert world.without_outcome() == {"total": usd(3 * ONE), "stale_open": usd(3 * ONE)}


@BOTH_DATABASES
def test_a_merge_redone_after_until_splits_the_tickets_spend_at_the_merge_of_the_period(database_url: str, tmp_path: Path) -> None:
    """Reopened and done again after `until`: its completion now is after `until`, and the ticket's
    spend after the period's merge was read as before it."""
    world = World(database_url, tmp_path)
    merged_then(world, ["open", "done"])
    assert world.without_outcome() == {"total": usd(2 * ONE), "stale_open": usd(2 * ONE)}


@BOTH_DATABASES
def test_an_item_done_again_before_until_and_reopened_after_it_is_judged_once_the_period_settles(database_url: str, tmp_path: Path) -> None:
    """Done, reopened, done again before `until`: as of `until` the completion held, so the spend of
    the reopened days led to it, as a report computed before the next reopening says. Reopened after
    `until` and not done again `stale_after_days` after it, that completion did not hold: its spend is
    reworked. Done again by then, it led somewhere."""
    world = World(database_url, tmp_path)
    world.status("X-1", "in_progress", SINCE + HOUR, created_at=SINCE + HOUR)
    world.status("X-1", "done", SINCE + DAY)
    world.status("X-1", "open", SINCE + 2 * DAY)
    world.status("X-1", "done", SINCE + 3 * DAY)
    world.status("X-1", "open", UNTIL + 2 * DAY)
    world.requests("X-1", SINCE + 2 * DAY + 12 * HOUR)
    assert world.without_outcome(now=UNTIL + DAY) == {"total": usd(0)}
    assert world.without_outcome() == {"total": usd(ONE), "reworked": usd(ONE)}
    world.status("X-1", "done", UNTIL + 5 * DAY)
    assert world.without_outcome() == {"total": usd(0)}


@BOTH_DATABASES
@pytest.mark.parametrize("after", ["open", "closed"], ids=["reopened", "wont-do"])
def test_work_set_done_on_the_periods_last_day_and_undone_after_it_is_reworked_spend(database_url: str, tmp_path: Path, after: str) -> None:
    """Work that led nowhere (a stale ticket), set done two hours before the period's end and reopened,
    or closed as Won't Do, the day after: it was neither a completion nor spend without outcome of any
    period (found by a review). At the period's end it was done; once the period settles, reworked."""
    world = World(database_url, tmp_path)
    world.status("X-1", "in_progress", SINCE - 30 * DAY, created_at=SINCE - 30 * DAY)
    world.requests("X-1", SINCE + DAY, SINCE + 2 * DAY)
    world.status("X-1", "done", UNTIL - 2 * HOUR)
    world.status("X-1", after, UNTIL + DAY)
    assert world.without_outcome(now=UNTIL) == {"total": usd(0)}
    assert world.without_outcome() == {"total": usd(2 * ONE), "reworked": usd(2 * ONE)}


@BOTH_DATABASES
def test_a_reverted_pull_request_done_again_by_hand_is_still_reworked(database_url: str, tmp_path: Path) -> None:
    """A merged PR reverted (by a revert PR within the rework window), then reopened and set done by
    hand: its merge does not hold (the cost figures already said so), and its spend is reworked."""
    world = World(database_url, tmp_path)
    world.status(PR, "open", SINCE + HOUR, created_at=SINCE + HOUR)
    registry.transition(world.engine, PR, "done", source="github", at=SINCE + DAY, merged=True)
    revert = ItemUpdate("acme/web#9", "done", at=SINCE + 2 * DAY, merged=True, title=f'Revert "{PR}"', reverts=PR)
    registry.apply_delivery(world.engine, WorkItemIds(DEFAULT_ID_PATTERNS), Delivery("github", "d-1", "pull_request", [revert]), SINCE + 2 * DAY)
    world.status(PR, "open", SINCE + 3 * DAY)
    world.status(PR, "done", SINCE + 4 * DAY)
    world.requests(PR, SINCE + 3 * DAY + 12 * HOUR)
    assert world.without_outcome() == {"total": usd(ONE), "reworked": usd(ONE)}


@BOTH_DATABASES
def test_spend_on_items_in_progress_at_until_is_judged_by_what_became_of_them(database_url: str, tmp_path: Path) -> None:
    """Work moved onto fresh clone tickets late in the period, closed as duplicates after it ends (or
    left open), was in progress at `until` and never counted as without outcome, in that period or any
    later one. Found by a review (2026-12-07). Each such item is now judged as it stood when it turned
    stale (created more than `stale_after_days`, 14, before), or as of now when that has not come."""
    world = World(database_url, tmp_path)
    world.status("C-1", "in_progress", SINCE + 5 * DAY, created_at=SINCE + 5 * DAY)  # the clone, closed after the period
    world.status("C-1", "closed", UNTIL + 2 * DAY)
    world.requests("C-1", SINCE + 5 * DAY + HOUR, SINCE + 6 * DAY)
    world.status("C-2", "open", SINCE + 6 * DAY, created_at=SINCE + 6 * DAY)  # left open
    world.requests("C-2", SINCE + 6 * DAY + HOUR)
    world.status("C-3", "in_progress", SINCE + 5 * DAY, created_at=SINCE + 5 * DAY)  # done within its fortnight
    world.status("C-3", "done", UNTIL + 3 * DAY)
    world.requests("C-3", SINCE + 5 * DAY + 2 * HOUR)
    world.status("C-4", "open", SINCE + 4 * DAY, created_at=SINCE + 4 * DAY)  # closed only once stale
    world.status("C-4", "closed", SINCE + 24 * DAY)
    world.requests("C-4", SINCE + 4 * DAY + HOUR)
    assert world.without_outcome(now=UNTIL) == {"total": usd(0)}  # at the period's end: all work in progress
    assert world.without_outcome(now=UNTIL + 3 * DAY) == {"total": usd(2 * ONE), "closed": usd(2 * ONE)}  # C-2 and C-4 still fresh
    assert world.without_outcome() == {"total": usd(4 * ONE), "closed": usd(2 * ONE), "stale_open": usd(2 * ONE)}


@BOTH_DATABASES
def test_a_backlog_ticket_picked_up_late_is_work_in_progress_not_stale(database_url: str, tmp_path: Path) -> None:
    """Staleness ran from `created_at` alone: three days of honest work on a ticket opened two months
    earlier and picked up three days before `until` counted as stale open spend (found by a review).
    It now runs from when work began: the later of its creation and its first request."""
    world = World(database_url, tmp_path)
    world.status("B-1", "open", SINCE - 60 * DAY, created_at=SINCE - 60 * DAY)  # picked up in the period
    world.status("B-1", "in_progress", UNTIL - 3 * DAY)
    world.requests("B-1", UNTIL - 3 * DAY, UNTIL - 2 * DAY)
    world.status("B-2", "open", SINCE - 60 * DAY, created_at=SINCE - 60 * DAY)  # used a month before: stale
    world.requests("B-2", SINCE - 30 * DAY, SINCE + DAY)
    assert world.without_outcome(now=UNTIL) == {"total": usd(ONE), "stale_open": usd(ONE)}  # B-2's request in the period
    # B-1 still open once it turned stale (started + 14 days): its spend is judged then, as any fresh item's.
    assert world.without_outcome(now=UNTIL - 3 * DAY + 15 * DAY) == {"total": usd(3 * ONE), "stale_open": usd(3 * ONE)}


@BOTH_DATABASES
def test_an_old_completion_reopened_and_done_again_with_no_request_is_not_ai_assisted_again(database_url: str, tmp_path: Path) -> None:
    """Reopening tickets done with AI in an earlier period and setting them done again, with no
    request, counted each as a new AI-assisted completed item (a review's March: the share 0.40 ->
    0.70, the median cost per item down to its cheapest items', no signal). Done again after a
    reopening, an item is AI-assisted only by an answer between that reopening and its completion."""
    world = World(database_url, tmp_path)
    for item, answered_again in (("R-1", False), ("R-2", True)):
        world.status(item, "in_progress", SINCE - 20 * DAY, created_at=SINCE - 20 * DAY)
        world.requests(item, SINCE - 19 * DAY)
        world.status(item, "done", SINCE - 18 * DAY)
        world.status(item, "in_progress", SINCE + DAY)
        if answered_again:
            world.requests(item, SINCE + DAY + HOUR)
        world.status(item, "done", SINCE + 2 * DAY)
    # Done with AI in the period, reopened by QA and done by hand in it: one completed item of the period,
    # AI-assisted by its work (the rule above is for a completion of an earlier period done again).
    world.status("Q-1", "in_progress", SINCE, created_at=SINCE)
    world.requests("Q-1", SINCE + HOUR)
    world.status("Q-1", "done", SINCE + DAY)
    world.status("Q-1", "in_progress", SINCE + 2 * DAY)
    world.status("Q-1", "done", SINCE + 3 * DAY)
    write_all(world.engine, tmp_path / "spool.jsonl", world.exchanges, len(world.exchanges))
    overall = adoption_report(world.engine, since=SINCE, until=UNTIL, min_group_size=1)["overall"]
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (3, 2)
    assert overall["cost_per_completed_item"]["total"] == usd(3 * ONE)  # R-2's and Q-1's, all their spend


@BOTH_DATABASES
def test_an_old_completion_reopened_and_done_twice_in_the_period_is_still_recycled(database_url: str, tmp_path: Path) -> None:
    """Reopened and set done twice in the period with no request: the last reopening undid the period's
    own redo, and the old completion's answers counted again (found by a review). The work that counts
    is what came after the last reopening of an earlier period's completion; the dashboard's weekly
    figures agree."""
    world = World(database_url, tmp_path)
    for item, cycles in (("R-1", 1), ("R-3", 2)):
        world.status(item, "in_progress", SINCE - 20 * DAY, created_at=SINCE - 20 * DAY)
        world.requests(item, SINCE - 19 * DAY)
        world.status(item, "done", SINCE - 18 * DAY)
        for n in range(cycles):
            world.status(item, "in_progress", SINCE + (1 + 2 * n) * DAY)
            world.status(item, "done", SINCE + (2 + 2 * n) * DAY)
    write_all(world.engine, tmp_path / "spool.jsonl", world.exchanges, len(world.exchanges))
    overall = adoption_report(world.engine, since=SINCE, until=UNTIL, min_group_size=1)["overall"]
    [week] = completions_by_period(world.engine, [(SINCE, UNTIL)])
    assert (week["completed_items"], week["ai_assisted_items"]) == (2, 0)
    assert (overall["completed_items"], overall["ai_assisted_items"]) == (2, 0)


def _ticket_with_a_late_merge(world: World, earlier_pr: bool = False) -> None:
    """A stale ticket left open, $4.50 of AI work on it in the period (after a hand-done pull request
    merged at the period's start, if `earlier_pr`), and a pull request of it merged 2 hours before `until`."""
    world.status("T-1", "open", SINCE - 30 * DAY, created_at=SINCE - 30 * DAY)
    if earlier_pr:
        world.status("acme/web#5", "open", SINCE, created_at=SINCE)
        registry.transition(world.engine, "acme/web#5", "done", source="github", at=SINCE + 6 * HOUR, merged=True)
        registry.link(world.engine, "T-1", "acme/web#5", at=SINCE + 6 * HOUR)
    world.requests("T-1", SINCE + DAY, SINCE + 2 * DAY)
    world.status(PR, "open", SINCE + 3 * DAY, created_at=SINCE + 3 * DAY)
    registry.transition(world.engine, PR, "done", source="github", at=UNTIL - 2 * HOUR, merged=True)
    registry.link(world.engine, "T-1", PR, at=UNTIL - 2 * HOUR)


@BOTH_DATABASES
@pytest.mark.parametrize("earlier_pr", [False, True], ids=["alone", "after-an-earlier-pr"])
@pytest.mark.parametrize("undone", ["reopened", "reverted"])
def test_a_tickets_spend_before_a_merge_undone_after_until_is_without_outcome(database_url: str, tmp_path: Path, undone: str, earlier_pr: bool) -> None:
    """The merge that covered a ticket's spend, reopened or reverted the day after the period and not
    merged again: that spend led nowhere, and the ticket (stale, open) says so. Before, it counted
    nowhere, unless another pull request of the ticket happened to stand (found by a review)."""
    world = World(database_url, tmp_path)
    _ticket_with_a_late_merge(world, earlier_pr)
    if undone == "reopened":
        world.status(PR, "open", UNTIL + DAY)
    else:
        revert = ItemUpdate("acme/web#9", "done", at=UNTIL + DAY, merged=True, title=f'Revert "{PR}"', reverts=PR)
        registry.apply_delivery(world.engine, WorkItemIds(DEFAULT_ID_PATTERNS), Delivery("github", "d-1", "pull_request", [revert]), UNTIL + DAY)
    assert world.without_outcome(now=UNTIL) == {"total": usd(0)}  # at the period's end, the merge covered it
    assert world.without_outcome() == {"total": usd(2 * ONE), "stale_open": usd(2 * ONE)}


@BOTH_DATABASES
@pytest.mark.parametrize("undone", ["reopened", "reverted"])
def test_a_merge_undone_after_until_and_landed_again_by_another_pull_request_counts_the_spend_once(database_url: str, tmp_path: Path,
                                                                                                     undone: str) -> None:  # fmt: skip
    """The ticket's work landed again by a second pull request two days after the period, before it
    settles: that one carries the ticket's spend (in the next period's cost), so this period does not
    count it as stale too (found by a review of the rule above)."""
    world = World(database_url, tmp_path)
    _ticket_with_a_late_merge(world)
    if undone == "reopened":
        world.status(PR, "open", UNTIL + DAY)
    else:
        revert = ItemUpdate("acme/web#9", "done", at=UNTIL + DAY, merged=True, title=f'Revert "{PR}"', reverts=PR)
        registry.apply_delivery(world.engine, WorkItemIds(DEFAULT_ID_PATTERNS), Delivery("github", "d-1", "pull_request", [revert]), UNTIL + DAY)
    world.status("acme/web#2", "open", UNTIL + DAY, created_at=UNTIL + DAY)
    registry.transition(world.engine, "acme/web#2", "done", source="github", at=UNTIL + 2 * DAY, merged=True)
    registry.link(world.engine, "T-1", "acme/web#2", at=UNTIL + 2 * DAY)
    assert world.without_outcome() == {"total": usd(0)}
    following = adoption_report(world.engine, since=UNTIL, until=UNTIL + 7 * DAY, min_group_size=1)["overall"]
    assert (following["completed_items"], following["cost_per_completed_item"]["total"]) == (1, usd(2 * ONE))


@BOTH_DATABASES
def test_a_ticket_done_at_until_and_reopened_after_it_counts_its_spend_after_its_merge_as_reworked(database_url: str, tmp_path: Path) -> None:
    """A ticket done two hours before `until` and reopened after it, its pull request merged on day 2
    and standing: the $2.25 before the merge led to it, the $4.50 after is reworked once the period
    settles. It was $0: only the spend after the merges of tickets not done at `until` was read."""
    world = World(database_url, tmp_path)
    world.status("T-1", "in_progress", SINCE - 30 * DAY, created_at=SINCE - 30 * DAY)
    world.status(PR, "open", SINCE + DAY, created_at=SINCE + DAY)
    registry.transition(world.engine, PR, "done", source="github", at=SINCE + 2 * DAY, merged=True)
    registry.link(world.engine, "T-1", PR, at=SINCE + 2 * DAY)
    world.requests("T-1", SINCE + DAY + 9 * HOUR, SINCE + 4 * DAY, SINCE + 5 * DAY)
    world.status("T-1", "done", UNTIL - 2 * HOUR)
    world.status("T-1", "open", UNTIL + DAY)
    assert world.without_outcome(now=UNTIL) == {"total": usd(0)}
    assert world.without_outcome() == {"total": usd(2 * ONE), "reworked": usd(2 * ONE)}

