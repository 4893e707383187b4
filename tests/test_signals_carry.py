"""The gaming signals count a ticket left open after its pull request merged as the adoption report
does: its usage up to the merge is the merged PR's work (reports/signal_carry.py). Before, the signals
read each item alone: every key that worked on such a ticket looked like heavy spend with nothing
completed, and work put on the ticket instead of the PR escaped the cost comparison."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conftest import BOTH_DATABASES
from signals_org import PRICE
from write_path import past_request, write_all

from taskproxy import registry
from taskproxy.metering.tokens import TokenCounter
from taskproxy.money import usd
from taskproxy.reports.signals import gaming_signals
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.timeutil import utcnow

SINCE, UNTIL = datetime(2026, 3, 2), datetime(2026, 3, 16)
DAY, HOUR = timedelta(days=1), timedelta(hours=1)
REQUEST_NANOS = PRICE.nanos(100_000, 10_000)  # each request below: $2.25


class World:
    def __init__(self, engine: Any, tmp_path: Path) -> None:
        self.engine, self.tmp_path, self.counter, self.exchanges = engine, tmp_path, TokenCounter(), []

    def ticket(self, item: str, status: str = "in_progress", team: str | None = "web") -> None:
        fields = {"team": team} if team else {}
        registry.transition(self.engine, item, status, source="jira", at=SINCE - DAY, fields=fields, created_at=SINCE - DAY)

    def merged_pr(self, pr: str, ticket: str | None, merged: datetime, team: str | None = "web") -> None:
        fields = {"team": team} if team else {}
        registry.transition(self.engine, pr, "open", source="github", at=merged - DAY, fields=fields, created_at=merged - DAY)
        registry.transition(self.engine, pr, "done", source="github", at=merged, merged=True)
        if ticket is not None:
            registry.link(self.engine, ticket, pr, at=merged)

    def requests(self, key_id: str, item: str, times: list[datetime], team: str | None = "web") -> None:
        key = SimpleNamespace(id=key_id, owner=f"{key_id}@example.com", team=team)
        for ts in times:
            n = len(self.exchanges)
            self.exchanges.append(past_request(id=f"r-{n}", ts=ts, key=key, work_item=item, model="big-model", body={"n": n},
                                               prompt_tokens=100_000, completion_tokens=10_000, counter=self.counter, price=PRICE))  # fmt: skip

    def signals(self, item_teams: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        write_all(self.engine, self.tmp_path / "spool.jsonl", self.exchanges, len(self.exchanges))
        report = gaming_signals(self.engine, since=SINCE, until=UNTIL, item_teams=item_teams)
        return {f"{s['kind']}:{s['key_id']}": s for s in report["signals"]}

    def team_items(self) -> None:
        """Six completed items of the team 'web', at $2.25 or $4.50 each."""
        for n in range(1, 7):
            self.ticket(f"W-{n}", "open")
            self.requests("steady", f"W-{n}", spaced(SINCE + n * DAY + 9 * HOUR, 1 + n % 2))
            registry.transition(self.engine, f"W-{n}", "done", source="jira", at=SINCE + n * DAY + 15 * HOUR)

    def adoption_team(self, item: str, item_teams: dict[str, str]) -> str | None:
        """The team the adoption report counts `item` for."""
        from taskproxy.reports import adoption_data, adoption_teams

        with self.engine.connect() as connection:
            items = adoption_data.load(connection, SINCE, UNTIL, stale_after=timedelta(days=14), now=utcnow())
            adoption_teams.assign_teams(connection, items, SINCE, UNTIL, item_teams)
        return items[item].team


def spaced(start: datetime, count: int, step: timedelta = timedelta(minutes=5)) -> list[datetime]:
    return [start + n * step for n in range(count)]


@BOTH_DATABASES
def test_spend_on_a_ticket_up_to_its_merged_pr_is_spend_on_completed_work(database_url: str, tmp_path: Path) -> None:
    """$63 on a ticket left in progress after its PR merged, a fifth of it before the merge: not heavy
    spend without completion. The share before the merge is split at the merge itself, not at its day."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    for ticket in ("T-1", "T-2", "T-3"):
        world.ticket(ticket)
    merged_1, merged_2 = SINCE + 3 * DAY + 13 * HOUR, SINCE + 6 * DAY + 12 * HOUR
    world.merged_pr("acme/web#1", "T-1", merged_1)
    world.merged_pr("acme/web#2", "T-2", merged_2)
    # umbrella: 6 of 28 requests before the merge (a day before, and the hour before it)
    world.requests("umbrella", "T-1", spaced(SINCE + DAY + 10 * HOUR, 4) + spaced(merged_1 - HOUR, 2) + spaced(merged_1 + HOUR, 2)
                   + spaced(SINCE + 5 * DAY + 9 * HOUR, 20))  # fmt: skip
    # late: 2 of 28 before the merge, 4 more after it on the merge's day: under a tenth, unless split by day
    world.requests("late", "T-2", spaced(merged_2 - 30 * timedelta(minutes=1), 2) + spaced(merged_2 + 30 * timedelta(minutes=1), 4)
                   + spaced(SINCE + 9 * DAY + 9 * HOUR, 22))  # fmt: skip
    world.requests("nothing", "T-3", spaced(SINCE + 2 * DAY + 9 * HOUR, 28))  # no pull request
    found = world.signals()
    engine.dispose()
    flagged = {name.split(":", 1)[1] for name in found if name.startswith("spend_without_completion:")}
    assert flagged == {"late", "nothing"}
    late = found["spend_without_completion:late"]["evidence"]
    assert (late["completed_cost_usd"], late["carried_tickets"], late["cost_usd"]) == (usd(2 * REQUEST_NANOS), 1, usd(28 * REQUEST_NANOS))
    assert found["spend_without_completion:nothing"]["evidence"]["carried_tickets"] == 0


@BOTH_DATABASES
def test_a_merged_prs_cost_holds_the_tickets_it_carries_in_the_cost_comparison(database_url: str, tmp_path: Path) -> None:
    """$90 put on a ticket left open and $2.25 on its pull request: the PR's cost is $92.25, forty
    times its team's median, and the key that spent on the ticket has most of it."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.team_items()
    world.ticket("T-7", "open")
    merged = SINCE + 8 * DAY + 12 * HOUR
    world.merged_pr("acme/web#7", "T-7", merged)
    world.requests("steady", "acme/web#7", [merged - 2 * HOUR])
    world.requests("hider", "T-7", spaced(SINCE + 7 * DAY + 9 * HOUR, 30) + spaced(merged - 3 * HOUR, 10) + spaced(merged + HOUR, 5))
    world.ticket("T-9", "open")  # the same, its pull request merged after the period: not this period's completed work
    world.merged_pr("acme/web#9", "T-9", UNTIL + DAY)
    world.requests("later", "T-9", spaced(SINCE + 7 * DAY + 9 * HOUR, 40))
    found = world.signals()
    engine.dispose()
    assert [name for name in found if name.startswith("cost_outlier:")] == ["cost_outlier:hider"]
    entry = found["cost_outlier:hider"]["work_items"][0]
    assert (entry["id"], entry["carried_tickets"]) == ("acme/web#7", ["T-7"])
    assert entry["item_cost_usd"] == usd(41 * REQUEST_NANOS) and entry["key_cost_usd"] == usd(40 * REQUEST_NANOS)


@BOTH_DATABASES
def test_a_pr_without_a_team_is_compared_in_the_team_of_the_tickets_it_carries_as_the_report_counts_it(database_url: str, tmp_path: Path) -> None:
    """Neither the PR nor its ticket has a team (set, or by project): the adoption report counts the PR
    for the team that spent on its ticket, and so does the cost comparison; and a ticket with no row
    gives it its project's team (`work_items.teams`), as in the report (found by a review)."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.team_items()
    merged = SINCE + 8 * DAY + 12 * HOUR
    world.ticket("T-7", "open", team=None)
    world.merged_pr("acme/web#7", "T-7", merged, team=None)
    world.requests("hider", "T-7", spaced(SINCE + 7 * DAY + 9 * HOUR, 30) + spaced(merged - 3 * HOUR, 10))
    world.merged_pr("acme/web#8", "PROJ-8", merged + HOUR, team=None)  # PROJ-8 has no row: unverified
    world.requests("unlisted", "PROJ-8", spaced(SINCE + 7 * DAY + 9 * HOUR, 40), team=None)
    teams = {"proj": "web"}
    found = world.signals(teams)
    assert (world.adoption_team("acme/web#7", teams), world.adoption_team("acme/web#8", teams)) == ("web", "web")
    engine.dispose()
    assert [name for name in found if name.startswith("cost_outlier:")] == ["cost_outlier:hider", "cost_outlier:unlisted"]
    assert {w["team"] for name in ("cost_outlier:hider", "cost_outlier:unlisted") for w in found[name]["work_items"]} == {"web"}


@BOTH_DATABASES
def test_a_keys_spend_on_a_ticket_up_to_its_merge_is_a_scan_of_its_events(database_url: str, tmp_path: Path) -> None:
    """From any `since` (none, a midnight, inside a day, inside the merge's day, after the merge) to the
    merge itself, included: per key, what a scan of the raw events gives."""
    from sqlalchemy import select

    from taskproxy.reports import signal_carry
    from taskproxy.storage.models import UsageEvent
    from taskproxy.storage.rollup import is_request

    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    merges = {"T-1": SINCE + 3 * DAY + 13 * HOUR, "T-2": SINCE + 5 * DAY, "T-3": SINCE + 6 * DAY + 12 * HOUR + timedelta(microseconds=1)}
    for ticket, merge in merges.items():
        for key_id in ("a", "b"):
            times = spaced(SINCE + 7 * HOUR, 30, step=5 * HOUR + timedelta(minutes=7, microseconds=3))
            world.requests(key_id, ticket, [*times, merge, merge - timedelta(microseconds=1), merge + timedelta(microseconds=1)])
    write_all(engine, tmp_path / "spool.jsonl", world.exchanges, len(world.exchanges))
    with engine.connect() as connection:
        events = connection.execute(select(UsageEvent.__table__)).all()
        for since in (None, SINCE, SINCE + DAY + 9 * HOUR, SINCE + 5 * DAY, SINCE + 6 * DAY + 2 * HOUR, SINCE + 9 * DAY):
            found = signal_carry.key_spend_up_to(connection, merges, since)
            got = {(t, k): (s.requests, s.cost, s.tokens, s.first, s.last) for t, per_key in found.items() for k, s in per_key.items()}
            expected: dict[tuple[str, str], tuple] = {}
            for e in events:
                if (since is None or e.ts >= since) and e.ts <= merges[e.work_item]:
                    r, c, tok, first, last = expected.get((e.work_item, e.key_id), (0, 0, 0, e.ts, e.ts))
                    expected[(e.work_item, e.key_id)] = (r + is_request(e.attempt, e.route), c + e.cost_nanos, tok + e.total_tokens,
                                                         min(first, e.ts), max(last, e.ts))  # fmt: skip
            assert got == expected, since
    engine.dispose()



@BOTH_DATABASES
def test_spend_on_an_unconfirmed_ticket_up_to_its_merged_pr_is_not_unverified_spend(database_url: str, tmp_path: Path) -> None:
    """A ticket no tracker confirmed, whose branch led to a merged pull request: the adoption report
    counts its usage up to the merge in the pull request's cost, but `unverified_spend` flagged every
    key that worked on it before the merge. Spend after the merge still counts."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    merged = SINCE + 4 * DAY + 12 * HOUR
    world.merged_pr("acme/web#5", "X-1", merged)
    world.requests("before", "X-1", spaced(SINCE + 3 * DAY + 9 * HOUR, 8))  # $18, all before the merge
    world.requests("after", "X-1", spaced(merged + HOUR, 8))  # $18, all after it
    world.requests("across", "X-1", spaced(merged - HOUR, 2) + spaced(merged + 2 * HOUR, 6))  # $4.50 before, $13.50 after
    # A pull request merged after the period: as of its end the ticket's spend had led to nothing (and the
    # adoption report counts it without outcome).
    world.merged_pr("acme/web#6", "X-3", UNTIL + 2 * DAY)
    world.requests("later", "X-3", spaced(SINCE + 5 * DAY + 9 * HOUR, 8))
    # $9 on X-1 before its merge and $22.50 on another unconfirmed item: flagged for the other item alone,
    # which the evidence names (it listed X-1 too, whose spend it had left out).
    world.requests("mixed", "X-1", spaced(merged - 2 * HOUR, 4))
    world.requests("mixed", "X-4", spaced(SINCE + 6 * DAY + 9 * HOUR, 10))
    found = world.signals()
    engine.dispose()
    assert {name.split(":", 1)[1] for name in found if name.startswith("unverified_spend:")} == {"after", "across", "later", "mixed"}
    mixed = found["unverified_spend:mixed"]
    assert [item["id"] for item in mixed["work_items"]] == ["X-4"] and (mixed["evidence"]["items"], mixed["evidence"]["requests"]) == (1, 10)
    across = found["unverified_spend:across"]["evidence"]
    assert (across["unverified_cost_usd"], across["carried_cost_usd"], across["share"]) == (usd(6 * REQUEST_NANOS), usd(2 * REQUEST_NANOS), 0.75)


@BOTH_DATABASES
def test_a_tag_on_the_ticket_a_hand_done_pull_request_carries_is_a_trivial_completion(database_url: str, tmp_path: Path) -> None:
    """Six hand-done pull requests, each out of a ticket left in progress with one tiny request on it
    two hours before the merge: the report counts the ticket's usage up to the merge as the pull
    request's, so each was AI-assisted (the share went from 0.5 to 1.0, the median cost per completed
    item down by two thirds), and `trivial_completions`, which read the key's requests on the pull
    request alone, flagged nothing; the same tag on the pull request itself was flagged (found by a review)."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.team_items()  # an honest key: six AI-worked tickets
    tagger = SimpleNamespace(id="tagger", owner="tagger@example.com", team="web")
    for n in range(1, 7):
        ticket, pull = f"G-{n}", f"acme/web#{100 + n}"
        world.ticket(ticket, "in_progress")
        merged = SINCE + n * DAY + 16 * HOUR
        world.exchanges.append(past_request(id=f"tag-{n}", ts=merged - 2 * HOUR, key=tagger, work_item=ticket, model="big-model", body={"n": n},
                                            prompt_tokens=20, completion_tokens=5, counter=world.counter, price=PRICE))  # fmt: skip
        registry.transition(engine, pull, "open", source="github", at=merged - DAY, fields={"team": "web", "lines_added": 30, "lines_deleted": 10},
                            created_at=merged - DAY)  # fmt: skip
        registry.transition(engine, pull, "done", source="github", at=merged, merged=True)
        registry.link(engine, ticket, pull, at=merged)
    found = world.signals()
    assert "trivial_completions:tagger" in found and "trivial_completions:steady" not in found
    evidence = found["trivial_completions:tagger"]["evidence"]
    assert (evidence["trivial_items"], evidence["light_items"]) == (6, 6)
    assert sorted(entry["id"] for entry in found["trivial_completions:tagger"]["work_items"]) == [f"acme/web#{100 + n}" for n in range(1, 7)]


@BOTH_DATABASES
def test_each_pull_request_of_a_ticket_is_compared_at_its_own_part_of_the_tickets_cost(database_url: str, tmp_path: Path) -> None:
    """$90 on a ticket left open before its first pull request merged, $2.25 more before a second one
    of the period named it: the first is the outlier, at $90, and the second is compared at $2.25. The
    last merge carried all the ticket's usage: the second pull request was the outlier, at $92.25, and
    the first had no cost at all (as the adoption report counted them; found by a review)."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    world.team_items()
    world.ticket("T-7", "open")
    first, second = SINCE + 4 * DAY + 12 * HOUR, SINCE + 9 * DAY
    world.merged_pr("acme/web#7", "T-7", first)
    world.merged_pr("acme/web#8", "T-7", second)
    world.requests("hider", "T-7", spaced(SINCE + 3 * DAY + 9 * HOUR, 30) + spaced(first - 3 * HOUR, 10))
    world.requests("late", "T-7", [first + HOUR])
    found = world.signals()
    engine.dispose()
    assert [name for name in found if name.startswith("cost_outlier:")] == ["cost_outlier:hider"]
    [entry] = found["cost_outlier:hider"]["work_items"]
    assert (entry["id"], entry["carried_tickets"], entry["item_cost_usd"], entry["key_cost_usd"]) == ("acme/web#7", ["T-7"], usd(40 * REQUEST_NANOS),
                                                                                                     usd(40 * REQUEST_NANOS))  # fmt: skip


@BOTH_DATABASES
def test_a_keys_spend_on_a_ticket_in_each_of_its_spans_is_a_scan_of_its_events(database_url: str, tmp_path: Path) -> None:
    """A ticket's spans (`signal_carry.key_spend_within`: from a start, included, to an end, included),
    two of them adjacent and starting a microsecond after the merge before, or inside a day, at a
    midnight, in the end's day: per span and key, what a scan of the raw events gives."""
    from sqlalchemy import select

    from taskproxy.reports import signal_carry
    from taskproxy.storage.models import UsageEvent
    from taskproxy.storage.rollup import is_request

    engine = make_engine(database_url)
    upgrade_schema(engine)
    world = World(engine, tmp_path)
    microsecond = timedelta(microseconds=1)
    first, second = SINCE + 3 * DAY + 13 * HOUR, SINCE + 6 * DAY + 12 * HOUR
    spans = {
        "T-1 first": ("T-1", None, first), "T-1 second": ("T-1", first + microsecond, second),
        "T-2 first": ("T-2", SINCE + DAY + 9 * HOUR, SINCE + 4 * DAY), "T-2 second": ("T-2", SINCE + 4 * DAY + microsecond, SINCE + 4 * DAY + 5 * HOUR),
        "T-3": ("T-3", SINCE + 5 * DAY, SINCE + 8 * DAY + 2 * HOUR),
    }  # fmt: skip
    for ticket in ("T-1", "T-2", "T-3"):
        for key_id in ("a", "b"):
            times = spaced(SINCE + 7 * HOUR, 30, step=5 * HOUR + timedelta(minutes=7, microseconds=3))
            ends = [end for name, (t, start, end) in spans.items() if t == ticket]
            world.requests(key_id, ticket, [*times, *(end + s * microsecond for end in ends for s in (-1, 0, 1))])
    write_all(engine, tmp_path / "spool.jsonl", world.exchanges, len(world.exchanges))
    with engine.connect() as connection:
        events = connection.execute(select(UsageEvent.__table__)).all()
        found = signal_carry.key_spend_within(connection, spans)
    engine.dispose()
    got = {(name, k): (s.requests, s.cost, s.tokens, s.first, s.last) for name, per_key in found.items() for k, s in per_key.items()}
    expected: dict[tuple[str, str], tuple] = {}
    for name, (ticket, start, end) in spans.items():
        for e in events:
            if e.work_item == ticket and (start is None or e.ts >= start) and e.ts <= end:
                r, c, tok, first_ts, last_ts = expected.get((name, e.key_id), (0, 0, 0, e.ts, e.ts))
                expected[(name, e.key_id)] = (r + is_request(e.attempt, e.route), c + e.cost_nanos, tok + e.total_tokens, min(first_ts, e.ts),
                                              max(last_ts, e.ts))  # fmt: skip
    assert got == expected
