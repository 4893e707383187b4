"""Edges of the gaming signals' per-key figures, found by reviews."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from conftest import BOTH_DATABASES
from test_signals_carry import DAY, HOUR, REQUEST_NANOS, SINCE, World, spaced

from taskproxy import registry
from taskproxy.money import usd
from taskproxy.storage.db import make_engine, upgrade_schema

MINUTE = timedelta(minutes=1)


@BOTH_DATABASES
def test_spend_after_completion_counts_once_a_keys_requests_under_two_teams_on_one_day(database_url: str, tmp_path: Path) -> None:
    """A key's events on one item and day under two teams (a key without a row takes its team from its
    events; a key moved to another team) make two rows of the per-key rollup. One wholly after the
    grace was counted from the rollup, and the span read for the other, which straddles it, read its
    events again: 12 requests after completion reported as 18 (found by a review)."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.ticket("X-1", "open")
    done = SINCE + 3 * DAY + 10 * HOUR
    registry.transition(engine, "X-1", "done", source="jira", at=done)
    world.requests("mover", "X-1", [done + 30 * MINUTE])  # within the hour's grace
    world.requests("mover", "X-1", spaced(done + 2 * HOUR, 6))  # after it, team web
    world.requests("mover", "X-1", spaced(done + 5 * HOUR, 6), team=None)  # after it, no team
    found = world.signals()["spend_after_completion:mover"]["evidence"]
    assert (found["requests"], found["cost_usd"]) == (12, usd(12 * REQUEST_NANOS))


@BOTH_DATABASES
def test_a_completion_that_did_not_stand_shields_no_heavy_spend(database_url: str, tmp_path: Path) -> None:
    """$54 on a pull request merged and reverted the next day, or on a ticket done and reopened: the
    adoption report counts it as reworked spend without outcome, but `spend_without_completion` took
    the merge for completed work and flagged nothing, so merging and reverting hid heavy spend from it
    (found by a review). A ticket reopened and done again is completed work."""
    from taskproxy.trackers.base import Delivery, ItemUpdate
    from taskproxy.workitems import WorkItemIds

    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    done = SINCE + 3 * DAY
    registry.transition(engine, "acme/web#5", "open", source="github", at=SINCE, fields={"team": "web"}, created_at=SINCE)
    for key_id, item in (("reverter", "acme/web#5"), ("reopener", "R-1"), ("redoer", "R-2")):
        if not item.startswith("acme"):
            world.ticket(item, "open")
        world.requests(key_id, item, spaced(SINCE + DAY, 24))  # 24 × $2.25
    ids = WorkItemIds(("[A-Z][A-Z0-9]+-[0-9]+", "[\\w.-]+/[\\w.-]+#[0-9]+"))
    registry.apply_delivery(engine, ids, Delivery("github", "d1", "pull_request.closed",
                                                  [ItemUpdate("acme/web#5", "done", at=done, merged=True, title="Retry refunds")]), done)  # fmt: skip
    revert = ItemUpdate("acme/web#6", "done", at=done + DAY, merged=True, title='Revert "Retry refunds"', reverts="acme/web#5")
    registry.apply_delivery(engine, ids, Delivery("github", "d2", "pull_request.closed", [revert]), done + DAY)
    for ticket in ("R-1", "R-2"):
        registry.transition(engine, ticket, "done", source="jira", at=done)
        registry.transition(engine, ticket, "in_progress", source="jira", at=done + DAY)
    registry.transition(engine, "R-2", "done", source="jira", at=done + 2 * DAY)
    found = world.signals()
    assert {"spend_without_completion:reverter", "spend_without_completion:reopener"} <= found.keys()
    assert "spend_without_completion:redoer" not in found
    assert found["spend_without_completion:reverter"]["evidence"]["completed_items"] == 0
