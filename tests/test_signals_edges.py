"""Edges of the gaming signals' per-key figures, found by reviews."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import BOTH_DATABASES
from test_signals_carry import DAY, HOUR, REQUEST_NANOS, SINCE, UNTIL, World, spaced
from write_path import past_request, write_all

from taskproxy import registry
from taskproxy.metering.pricing import Price
from taskproxy.money import usd
from taskproxy.reports.signals import gaming_signals
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


@BOTH_DATABASES
def test_a_tag_padded_with_prompt_tokens_is_still_a_light_item(database_url: str, tmp_path: Path) -> None:
    """Six tickets open for a day, each tagged two hours before Done with one chat request of 2,000
    prompt tokens and 1 generated token on a cheap model ($0.0003): the tag of a few tokens was a light
    item, the padded one no longer (`trivial_max_tokens` counts all tokens, and prompt tokens cost next
    to nothing to pad), and the AI-assisted share went to 100 % unseen (found by a review). An item whose
    AI use in all is a negligible share of the typical completed item's cost is light too. One real
    question per item (a real answer, a real share of the cost) is not; nor is a cheap question on items
    whose AI use is someone else's: they were AI-assisted without it."""
    from types import SimpleNamespace

    from signals_org import PRICE
    from taskproxy.metering.pricing import Price
    from write_path import past_request

    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.team_items()  # an honest key: six AI-worked tickets at $2.25 or $4.50
    cheap = Price(input=0.15e-6, output=0.6e-6)  # 2,000 prompt tokens and 1 generated: $0.0003006

    def ask(key_id: str, item: str, ts: Any, prompt: int, completion: int, price: Price, model: str) -> None:
        key = SimpleNamespace(id=key_id, owner=f"{key_id}@example.com", team="web")
        n = len(world.exchanges)
        world.exchanges.append(past_request(id=f"q-{n}", ts=ts, key=key, work_item=item, model=model, body={"q": n},
                                            prompt_tokens=prompt, completion_tokens=completion, counter=world.counter, price=price))  # fmt: skip

    for n in range(1, 7):
        done = SINCE + n * DAY + 16 * HOUR
        for key_id, prompt, completion, price, model in (("padder", 2_000, 1, cheap, "cheap-model"), ("asker", 2_000, 400, PRICE, "big-model")):
            ticket = f"{key_id.upper()}-{n}"
            world.ticket(ticket, "open")  # open a day before the period
            ask(key_id, ticket, done - 2 * HOUR, prompt, completion, price, model)
            registry.transition(engine, ticket, "done", source="jira", at=done)
        ask("reviewer", f"W-{n}", SINCE + n * DAY + 14 * HOUR, 2_000, 1, cheap, "cheap-model")  # before W-n is done, at 15:00
    found = world.signals()
    assert "trivial_completions:padder" in found
    evidence = found["trivial_completions:padder"]["evidence"]
    assert (evidence["completed_items"], evidence["trivial_items"], evidence["quick_items"], evidence["light_items"]) == (6, 6, 0, 6)
    assert all(w["tokens"] == 2_001 for w in found["trivial_completions:padder"]["work_items"])
    assert {"trivial_completions:asker", "trivial_completions:reviewer", "trivial_completions:steady"}.isdisjoint(found)


CHEAP = Price(input=0.15e-6, output=0.6e-6)  # 2,000 prompt tokens and 1 generated: $0.0003006


def tag(world: World, key_id: str, item: str, ts: datetime) -> None:
    """One padded request on `item`: 2,000 prompt tokens and 1 generated, on a cheap model."""
    key = SimpleNamespace(id=key_id, owner=f"{key_id}@example.com", team="web")
    n = len(world.exchanges)
    world.exchanges.append(past_request(id=f"t-{n}", ts=ts, key=key, work_item=item, model="cheap-model", body={"t": n},
                                        prompt_tokens=2_000, completion_tokens=1, counter=world.counter, price=CHEAP))  # fmt: skip


def signals_from(world: World, since: datetime) -> dict[str, dict[str, Any]]:
    """The signals of [since, UNTIL), the world's requests written first."""
    write_all(world.engine, world.tmp_path / "spool.jsonl", world.exchanges, len(world.exchanges))
    return {f"{s['kind']}:{s['key_id']}": s for s in gaming_signals(world.engine, since=since, until=UNTIL)["signals"]}


def backlog_ticket(world: World, ticket: str) -> None:
    registry.transition(world.engine, ticket, "open", source="jira", at=SINCE - 40 * DAY, fields={"team": "web"}, created_at=SINCE - 40 * DAY)


def _team_world(database_url: str, tmp_path: Path) -> World:
    """A database with the team's honest work: six AI-worked tickets at $2.25 or $4.50."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.team_items()
    return world


def _flagged_light(found: dict, key: str) -> dict:
    """The key's trivial_completions signal, six of six items light with one request each."""
    signal = found[f"trivial_completions:{key}"]
    evidence = signal["evidence"]
    assert (evidence["completed_items"], evidence["trivial_items"], evidence["light_items"], evidence["requests"]) == (6, 6, 6, 6)
    return signal


AHEAD = pytest.mark.parametrize(("start", "ahead"), [(SINCE, 20 * DAY), (SINCE, 3 * HOUR), (SINCE + 12 * HOUR, 3 * HOUR)],
                                ids=["20-days-before", "3-hours-before", "3-hours-before-a-noon-start"])  # fmt: skip


@BOTH_DATABASES
@AHEAD
def test_a_tag_sent_before_the_period_on_an_item_done_in_it_is_a_light_item(database_url: str, tmp_path: Path, start: datetime,
                                                                            ahead: timedelta) -> None:  # fmt: skip
    """Six backlog tickets, each tagged with one padded request ($0.0003) days or hours before the
    period, then done by hand in it: the adoption report counts them AI-assisted, and
    `trivial_completions`, which read each key's events in the period alone, saw no request of the key on
    them (found by a review). A key's events on an item completed in the period count from before it too."""
    world = _team_world(database_url, tmp_path)
    engine = world.engine
    for n in range(1, 7):
        backlog_ticket(world, f"T-{n}")
        tag(world, "gamer", f"T-{n}", start - ahead + n * MINUTE)
        registry.transition(engine, f"T-{n}", "done", source="jira", at=SINCE + n * DAY + 16 * HOUR)
    found = signals_from(world, start)
    assert "trivial_completions:steady" not in found
    signal = _flagged_light(found, "gamer")
    assert all(w["tokens"] == 2_001 and w["item_cost_usd"] == usd(CHEAP.nanos(2_000, 1)) for w in signal["work_items"])


@BOTH_DATABASES
@pytest.mark.parametrize("start", [SINCE, SINCE + 12 * HOUR], ids=["midnight-start", "noon-start"])
def test_real_work_across_the_periods_start_is_not_a_light_item(database_url: str, tmp_path: Path, start: datetime) -> None:
    """Six tickets worked on with AI in the hours before the period ($4.50 each), then one cheap last
    question in it before each was done: read from the period alone, each item cost $0.0003 and the key
    was flagged; its work on them before the period counts now."""
    world = _team_world(database_url, tmp_path)
    engine = world.engine
    for n in range(1, 7):
        backlog_ticket(world, f"S-{n}")
        world.requests("spanner", f"S-{n}", spaced(start - 5 * HOUR + n * MINUTE, 2))
        done = SINCE + n * DAY + 16 * HOUR
        tag(world, "spanner", f"S-{n}", done - 2 * HOUR)
        registry.transition(engine, f"S-{n}", "done", source="jira", at=done)
    found = signals_from(world, start)
    assert not [kind for kind in found if kind.endswith(":spanner")]


@BOTH_DATABASES
@AHEAD
def test_a_tag_sent_before_the_period_on_a_ticket_a_pull_request_carries_counts_on_the_pull_request(
    database_url: str, tmp_path: Path, start: datetime, ahead: timedelta
) -> None:
    """The same tags on six backlog tickets, each left in progress and carried by a pull request done by
    hand and merged in the period: the adoption report counts the ticket's usage up to the merge, all
    of it, as the pull request's, and the check read a key's events on the ticket from the period's start."""
    world = _team_world(database_url, tmp_path)
    for n in range(1, 7):
        backlog_ticket(world, f"T-{n}")
        tag(world, "gamer", f"T-{n}", start - ahead + n * MINUTE)
        world.merged_pr(f"acme/web#{n}", f"T-{n}", SINCE + n * DAY + 16 * HOUR)
    found = signals_from(world, start)
    assert "trivial_completions:steady" not in found
    signal = _flagged_light(found, "gamer")
    assert [w["id"] for w in signal["work_items"]] == [f"acme/web#{n}" for n in range(1, 7)]
