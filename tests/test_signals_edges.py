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
