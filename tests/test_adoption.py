"""The adoption report (DESIGN §8) on a generated organisation.

The organisation (tests/org_generator.py) is written through the real paths — keys by `issue_key`,
lifecycles by `registry.transition`, usage and rejections by the `BatchWriter` — and kept as plain
records too. Every expected figure here is computed from those records in plain Python (`Expected`),
never with the report module's helpers or SQL, and compared with what the report answers.
"""

from __future__ import annotations

import contextlib
import random
import re

import csv
import io
import statistics
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote
from typing import Any

import httpx
import orjson
import pytest

from conftest import ADMIN_KEY, BOTH_DATABASES, in_process, make_settings
from org_generator import END, MIN_GROUP, SINCE, STALE_DAYS, T0, UNTIL, Event, Item, Org, generate
from signals_org import PRICE
from write_path import past_request, write_all
from taskproxy import registry
from taskproxy.app import create_app
from taskproxy.guard.auth import ensure_bootstrap_admin, issue_key
from taskproxy.metering.pricing import Price
from taskproxy.metering.tokens import TokenCounter
from taskproxy.money import usd
from conftest import postgres_schema
from taskproxy.dashboard.data import week_windows
from taskproxy.reports.adoption import adoption_report, completions_by_period, quantile
from taskproxy.reports.snapshots import for_team
from taskproxy.reports.adoption_export import CSV_COLUMNS, adoption_csv, adoption_text
from taskproxy.reports.items import item_detail
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.settings import SizeBands
from taskproxy.timeutil import iso, parse_time, utcnow

SECOND = timedelta(seconds=1)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Org, Path]]:
    """The generated organisation, written to SQLite and (a second time) to PostgreSQL."""
    folder = tmp_path_factory.mktemp("org")
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(postgres_schema())
        else:
            url = f"sqlite:///{folder / 'taskproxy.db'}"
        engine = make_engine(url)
        upgrade_schema(engine)
        ensure_bootstrap_admin(engine, ADMIN_KEY)  # there from the start, as in any proxy that served: a person without a team
        org = generate(engine, folder / "spool.jsonl")
        yield engine, org, folder
        engine.dispose()


# -- the expected report, from the generator's records ----------------------------------------------


class Expected:
    """The report's definitions, applied to the generator's records with plain loops."""

    def __init__(
        self, org: Org, since: datetime, until: datetime, *, min_group: int = MIN_GROUP, stale_days: float = STALE_DAYS, size_bands: SizeBands | None = None,
        now: datetime | None = None,
    ) -> None:
        self.org, self.since, self.until, self.min_group, self.size_bands = org, since, until, min_group, size_bands
        self.now = now or utcnow()  # the report's computation: what became of the items in progress at until is known up to it
        self.stale_before = until - timedelta(days=stale_days)
        self.stale_days = stale_days

    def in_period(self, moment: datetime | None) -> bool:
        return moment is not None and self.since <= moment < self.until

    def events(self, item: Item) -> list[Event]:
        return self.org.events_by_item.get(item.id, [])

    def exists(self, item: Item) -> bool:
        """In the database: registered by a transition, or by the writer / used at all."""
        return item.registered == "transition" or bool(self.events(item))

    def team_of(self, item: Item) -> str | None:
        if item.team is not None:
            return item.team
        carried = self.carried(item)  # a merged PR: the tickets it carries, their team
        if teams := [t.team for t in carried if t.team is not None]:
            return teams[0]
        spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for event in [*self.events(item), *(e for t in carried for e in self.events(t))]:
            if event.key.team is not None:
                spent[event.key.team][0] += event.cost or 0.0
                spent[event.key.team][1] += event.total
        if not spent:
            return None
        return sorted(spent, key=lambda team: (-spent[team][0], -spent[team][1], team))[0]

    def status_at_until(self, item: Item) -> str:
        return self.status_at(item, self.until)

    def status_at(self, item: Item, moment: datetime) -> str:
        if item.registered != "transition" and not item.changes:
            return "unverified"
        earlier = [c for c in item.changes if c.at < moment]
        if earlier:
            return earlier[-1].after
        if item.changes:  # the status its first change found; none yet if that change created it
            return item.changes[0].before or "unverified"
        return item.status

    def completed(self, item: Item) -> bool:
        return item.status == "done" and self.in_period(item.completed_at)

    # -- size and rework, from the records

    @staticmethod
    def rework(item: Item) -> tuple[datetime, str] | None:
        """The first rework: a revert within REWORK_DAYS, or the first reopening after done."""
        marks = [(item.reverted_at, "reverted")] if item.reverted_at else []
        marks += [(c.at, "reopened") for c in item.changes if c.before == "done" and c.after not in ("done", "closed")][:1]
        return min(marks) if marks else None

    def undone_by_reopening(self, item: Item) -> bool:
        """Its reopening undid a completion in the period (the last `done` before it)."""
        mark = self.rework(item)
        return mark is not None and mark[1] == "reopened" and self.in_period([c.at for c in item.changes if c.after == "done" and c.at <= mark[0]][-1])

    def delivered(self, item: Item) -> bool:
        """Completed in the period, or completed in it and reopened since."""
        return self.completed(item) or self.undone_by_reopening(item)

    def reworked_in_period(self, item: Item) -> bool:
        mark = self.rework(item)
        return mark is not None and (mark[1] == "reverted" or self.undone_by_reopening(item))

    def completion_at_until(self, item: Item) -> datetime | None:
        """Its completion as it stood at until: the last change before it, if to done or closed."""
        if not any(c.at >= self.until for c in item.changes):
            return item.completed_at
        earlier = [c for c in item.changes if c.at < self.until]
        return earlier[-1].at if earlier and earlier[-1].after in ("done", "closed") else None

    def undone_at_until(self, item: Item) -> bool:
        """Reworked before until, and not done again after the rework as of until (a reverted PR never is)."""
        mark = self.rework(item)
        if mark is None or mark[0] >= self.until:
            return False
        if mark[1] == "reverted":
            return True
        done_at = self.completion_at_until(item)
        return not (self.status_at_until(item) == "done" and done_at is not None and done_at > mark[0])

    @staticmethod
    def size(item: Item) -> tuple[str, float] | None:
        """("lines", added + deleted) when a report said lines, else ("points", points), from the latest of each field."""
        latest: dict[str, Any] = {}
        for size in item.sizes:
            latest |= {k: v for k, v in vars(size).items() if v is not None}
        if "lines_added" in latest or "lines_deleted" in latest:
            return "lines", latest.get("lines_added", 0) + latest.get("lines_deleted", 0)
        if "points" in latest:
            return "points", latest["points"]
        return None

    def merge_holds(self, pull: Item) -> bool:
        """Merged, and the merge stands now: not reverted, nor reopened and not done since."""
        mark = self.rework(pull)
        return pull.status == "done" and (mark is None or (mark[1] != "reverted" and pull.completed_at > mark[0]))  # type: ignore[operator]

    def standing(self, ticket: Item) -> list[Item]:
        """A ticket's merged PRs whose merge stands now, by merge (then id)."""
        pulls = [pull for pull in map(self.org.items.__getitem__, ticket.linked) if self.merge_holds(pull)]
        return sorted(pulls, key=lambda pull: (pull.completed_at, pull.id))  # type: ignore[arg-type, return-value]

    def span(self, ticket: Item, pull: Item) -> tuple[datetime | None, datetime] | None:
        """(after, merge]: the part of a ticket's usage a merged PR completed in the period counts, the
        ticket not done now and never reworked, the PR one of its merged PRs standing now: since the one
        before it (None: from the start) up to its own merge."""
        if ticket.status == "done" or self.rework(ticket) is not None or not self.completed(pull):
            return None
        after = None
        for other in self.standing(ticket):
            if other is pull:
                return after, pull.completed_at  # type: ignore[return-value]
            after = other.completed_at
        return None

    def carried(self, item: Item) -> list[Item]:
        return sorted((t for t in self.org.items.values() if item.id in t.linked and self.span(t, item) is not None), key=lambda t: t.id)

    def outcome_events(self, item: Item) -> list[Event]:
        """A completed item's events, and those of each ticket it carries in its span: that work led to it."""
        found = list(self.events(item))
        for ticket in self.carried(item):
            after, merge = self.span(ticket, item)  # type: ignore[misc]
            found += [e for e in self.events(ticket) if (after is None or e.ts > after) and e.ts <= merge]
        return found

    @staticmethod
    def redone_after(item: Item) -> datetime | None:
        """Done again after a reopening: the last change away from done before its completion."""
        if item.status != "done":
            return None
        return max((c.at for c in item.changes if c.before == "done" and c.after != "done" and c.at < item.completed_at), default=None)  # type: ignore[operator]

    def recycled_after(self, item: Item) -> datetime | None:
        """The last reopening before its completion that undid a completion before the period (or one not dated)."""
        if item.status != "done":
            return None
        found = None
        for c in item.changes:
            if c.before == "done" and c.after != "done" and c.at < item.completed_at:  # type: ignore[operator]
                undid = max((d.at for d in item.changes if d.after == "done" and d.at < c.at), default=None)
                if undid is None or undid < self.since:
                    found = c.at
        return found

    def assisted(self, item: Item) -> bool:
        """Answered once at least, and used before the completion that counts (not only after it); done
        again after a reopening that undid an earlier period's completion, answered between that
        reopening and its completion."""
        if (reopened := self.recycled_after(item)) is not None:  # a completion of an earlier period done again: the work since counts
            return any(e.status < 400 and reopened < e.ts <= item.completed_at for e in self.events(item))  # type: ignore[operator]
        events = self.outcome_events(item)
        mark = self.rework(item)
        if item.status == "done":
            done = item.completed_at
        elif mark is not None and mark[1] == "reopened":
            done = [c.at for c in item.changes if c.after == "done" and c.at <= mark[0]][-1]
        else:
            done = None
        answers = [e.ts for e in events if e.status < 400]  # (this organisation counts no tokens)
        return bool(answers) and (done is None or min(answers) <= done)

    def without_outcome(self, item: Item) -> tuple[str | None, datetime | None]:
        """Which spend without outcome the item's period spend is, and the moment (its last merged PR's
        merge) after which alone it counts, if any."""
        if self.undone_at_until(item):
            return "reworked", None
        merges = [self.completion_at_until(pr) for pr_id in item.linked
                  if self.status_at_until(pr := self.org.items[pr_id]) == "done" and not self.undone_at_until(pr) and not self.led_nowhere(pr, item)]  # fmt: skip
        after = max(merges) if merges else None  # type: ignore[type-var]
        carried = [pull.completed_at for pull in self.standing(item) if self.span(item, pull) is not None]
        if carried:  # carried in the period: its spend after the last of those merges (a later one, reverted since, none)
            after = max(carried)  # type: ignore[type-var]
        status = self.status_at_until(item)
        if status in ("closed", "unverified"):
            return status, after
        # Work on it began when it was created, or at its first request (all time) if that came later.
        started = max(item.created_at, min((e.ts for e in self.events(item)), default=item.created_at))
        if status in ("open", "in_progress") and started < self.stale_before:
            return "stale_open", after
        if status in ("open", "in_progress"):  # work in progress at until: judged once it turned stale (or now)
            turned_stale = started + timedelta(days=self.stale_days)
            judged_at = turned_stale if self.now > turned_stale else self.now
            later, mark = self.status_at(item, judged_at), self.rework(item)
            if later == "closed":
                return "closed", after
            if later in ("open", "in_progress") and self.now > turned_stale:
                return "stale_open", after
            if later == "done" and mark is not None and mark[1] == "reverted" and mark[0] <= judged_at:
                return "reworked", after
        if self.undone_later(item):
            return "reworked", after
        return None, None

    def led_nowhere(self, pull: Item, ticket: Item) -> bool:
        """A merge undone later covers none of the ticket's spend, unless another pull request of the ticket standing now landed by then."""
        if not self.undone_later(pull):
            return False
        settled = self.until + timedelta(days=self.stale_days)
        judged_at = settled if self.now > settled else self.now
        return not any(self.merge_holds(other) and other.completed_at <= judged_at  # type: ignore[operator]
                       for other in map(self.org.items.__getitem__, ticket.linked) if other is not pull)

    def undone_later(self, item: Item) -> bool:
        """Done at until by a completion in the period, and not done (or reverted) once the period settled (or now)."""
        if self.status_at_until(item) != "done" or not self.in_period(self.completion_at_until(item)):
            return False
        settled = self.until + timedelta(days=self.stale_days)
        judged_at = settled if self.now > settled else self.now
        mark = self.rework(item)
        return self.status_at(item, judged_at) != "done" or (mark is not None and mark[1] == "reverted" and mark[0] <= judged_at)

    def relevant(self) -> list[Item]:
        return [
            i for i in self.org.items.values()
            if self.exists(i) and (self.delivered(i) or any(self.in_period(e.ts) for e in self.events(i)))
        ]  # fmt: skip

    def people(self) -> dict[str, int]:
        owners: dict[str, set[str]] = defaultdict(set)
        for key in self.org.keys:
            if not key.revoked and key.team is not None:
                owners[key.team].add(key.owner)
        return {team: len(names) for team, names in owners.items()}

    def figures(self, items: list[Item], team: str | None) -> dict[str, Any]:
        completed = [i for i in items if self.completed(i)]
        assisted = [i for i in completed if self.assisted(i)]
        others = [i for i in completed if not self.assisted(i)]
        costs, tokens, unpriced = [], [], 0
        cost_by_model: dict[str, float | None] = {}
        tokens_by_model: Counter[str] = Counter()
        for item in assisted:
            known = [e.cost for e in self.outcome_events(item) if e.cost is not None]
            if known:
                costs.append(sum(known))
            else:
                unpriced += 1
            tokens.append(sum(e.total for e in self.outcome_events(item)))
            for event in self.outcome_events(item):
                tokens_by_model[event.model] += event.total
                if event.cost is None:
                    cost_by_model.setdefault(event.model, None)
                else:
                    cost_by_model[event.model] = (cost_by_model.get(event.model) or 0.0) + event.cost
        without = {"closed": 0.0, "unverified": 0.0, "stale_open": 0.0, "reworked": 0.0}
        after = spent = 0.0
        for item in items:
            kind, after_merge = self.without_outcome(item)
            for event in self.events(item):
                if not self.in_period(event.ts) or event.cost is None:
                    continue
                spent += event.cost
                if kind is not None and (after_merge is None or event.ts > after_merge):
                    without[kind] += event.cost
                if item.status in ("done", "closed") and event.ts > item.completed_at:  # type: ignore[operator]
                    after += event.cost
        rejected = Counter(
            r.reason for r in self.org.rejections
            if self.in_period(r.ts) and (team is None or (r.key is not None and r.key.team == team))
        )  # fmt: skip

        def cycle(group: list[Item]) -> float | None:
            hours = [(i.completed_at - i.created_at).total_seconds() / 3600 for i in group]  # type: ignore[operator]
            return statistics.median(hours) if hours else None

        return {
            "completed_items": len(completed),
            "ai_assisted_items": len(assisted),
            "ai_assisted_share": len(assisted) / len(completed) if completed else None,
            "cost_per_completed_item": {**spread(costs), "total": sum(costs), "by_model": cost_by_model, "unpriced_items": unpriced,
                                        "excluding_reworked": self.excluding_reworked(assisted)},
            "cost_by_size": self.by_size(assisted),
            "cost_per_100_changed_lines": self.per_100_lines(assisted),
            "rework": self.rework_figures([i for i in items if self.delivered(i)]),
            "tokens_per_completed_item": {**spread(tokens), "total": sum(tokens), "by_model": dict(tokens_by_model)},
            "spend_usd": spent,
            "spend_without_outcome_usd": sum(without.values()),
            "spend_without_outcome_breakdown": without,
            "spend_after_completion_usd": after,
            "cycle_time_hours": {"ai_assisted": cycle(assisted), "other": cycle(others)},
            "rejected_requests": dict(rejected),
        }

    def cost(self, item: Item) -> float | None:
        known = [e.cost for e in self.outcome_events(item) if e.cost is not None]
        return sum(known) if known else None

    def excluding_reworked(self, assisted: list[Item]) -> dict[str, Any]:
        costs = [c for i in assisted if not self.reworked_in_period(i) and (c := self.cost(i)) is not None]
        return {**spread(costs), "total": sum(costs), "items": len(costs)}

    def bands(self) -> list[tuple[str, str, float | None, float | None]]:
        if self.size_bands is None:  # the defaults, spelled out
            return [("lines", "lines <=50", None, 50), ("lines", "lines 51-200", 50, 200), ("lines", "lines 201-1000", 200, 1000),
                    ("lines", "lines >1000", 1000, None), ("points", "points <=1", None, 1), ("points", "points >1-3", 1, 3),
                    ("points", "points >3-8", 3, 8), ("points", "points >8", 8, None), ("unsized", "unsized", None, None)]  # fmt: skip
        found: list[tuple[str, str, float | None, float | None]] = []
        for basis, bounds in (("lines", self.size_bands.lines), ("points", self.size_bands.points)):
            if not bounds:
                found.append((basis, f"{basis}: all", None, None))
                continue
            found.append((basis, f"{basis} <={bounds[0]:g}", None, bounds[0]))
            for low, high in zip(bounds, bounds[1:]):
                found.append((basis, f"lines {low + 1:g}-{high:g}" if basis == "lines" else f"points >{low:g}-{high:g}", low, high))
            found.append((basis, f"{basis} >{bounds[-1]:g}", bounds[-1], None))
        return found + [("unsized", "unsized", None, None)]

    def by_size(self, assisted: list[Item]) -> list[dict[str, Any]]:
        bands = self.bands()
        found = []
        for basis, label, above, up_to in bands:
            members = []
            for item in assisted:
                size = self.size(item)
                if basis == "unsized":
                    if size is None:
                        members.append(item)
                elif size is not None and size[0] == basis and (above is None or size[1] > above) and (up_to is None or size[1] <= up_to):
                    members.append(item)
            costs = [c for c in map(self.cost, members) if c is not None]
            found.append({"basis": basis, "label": label, "above": above, "up_to": up_to, "items": len(members), **spread(costs),
                          "total": sum(costs), "unpriced_items": len(members) - len(costs)})  # fmt: skip
        return found

    def per_100_lines(self, assisted: list[Item]) -> dict[str, Any]:
        cost = lines = items = 0
        for item in assisted:
            size, item_cost = self.size(item), self.cost(item)
            if size is not None and size[0] == "lines" and size[1] > 0 and item_cost is not None:
                cost, lines, items = cost + item_cost, lines + size[1], items + 1
        return {"usd": 100 * cost / lines if lines else None, "items": items, "lines": lines}

    def rework_figures(self, delivered: list[Item]) -> dict[str, Any]:
        def rate(group: list[Item]) -> dict[str, Any]:
            reworked = len([i for i in group if self.reworked_in_period(i)])
            return {"items": len(group), "reworked": reworked, "rate": reworked / len(group) if group else None}

        reasons = Counter(mark[1] for i in delivered if (mark := self.rework(i)) and self.reworked_in_period(i))
        return {"ai_assisted": rate([i for i in delivered if self.assisted(i)]), "other": rate([i for i in delivered if not self.assisted(i)]),
                "by_reason": {"reverted": reasons["reverted"], "reopened": reasons["reopened"]}}  # fmt: skip

    def withheld_with_the_small(self, items: list[Item], people: dict[str, int]) -> list[str | None]:
        """The teams the report withholds although they are not small: the fewest that, with the groups
        under the floor that have figures in it, make a group at the floor, smallest first, so that the
        overall figures less the teams shown are never a small group's."""
        without_team = {k.owner for k in self.org.keys if not k.revoked and k.team is None} | {"admin"}  # the proxy's own admin key
        sizes: dict[str | None, int] = {**people, None: len(without_team)}
        groups = {self.team_of(i) for i in items
                  if self.team_of(i) is not None or any(self.in_period(e.ts) for e in self.events(i)) or (self.completed(i) and self.outcome_events(i))}  # fmt: skip
        groups |= {r.key.team for r in self.org.rejections if r.key is not None and self.in_period(r.ts)}
        small = [g for g in groups if sizes.get(g, 0) < self.min_group]
        shown = sorted((g for g in groups if g not in small), key=lambda g: (sizes[g], g or ""))
        if not small:
            return []
        for n in range(len(shown) + 1):
            if sum(sizes.get(g, 0) for g in small + shown[:n]) >= self.min_group:
                return shown[:n]
        return shown

    def report(self, team: str | None = None) -> dict[str, Any]:
        items = self.relevant()
        people = self.people()
        withheld = {"withheld": True, "reason": f"fewer than {self.min_group} people"}
        also = self.withheld_with_the_small(items, people)

        def entry(name: str) -> dict[str, Any]:
            if name in also:
                return {"team": name, "withheld": True, "reason": f"withheld with the teams of fewer than {self.min_group} people, which a total would reveal"}
            if people.get(name, 0) < self.min_group:
                return {"team": name, **withheld}
            return {"team": name, **self.figures([i for i in items if self.team_of(i) == name], name)}

        if team is not None:
            only = entry(team)
            overall = {k: v for k, v in only.items() if k != "team"}
            teams = [only]
        else:
            overall = self.figures(items, None)
            names = set(people) | {t for t in map(self.team_of, items) if t is not None}
            teams = [entry(name) for name in sorted(names)]
        return {
            "since": iso(self.since),
            "until": iso(self.until),
            "team": team,
            "min_group_size": self.min_group,
            "stale_after_days": self.stale_days,
            "overall": overall,
            "teams": teams,
        }


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None}
    if len(values) == 1:
        return {"median": values[0], "p90": values[0]}
    return {"median": statistics.median(values), "p90": statistics.quantiles(values, n=10, method="inclusive")[-1]}


def assert_close(actual: Any, expected: Any, path: str = "report") -> None:
    """Equal, with floats compared approximately (pytest.approx does not nest)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (path, sorted(actual), sorted(expected))
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for n, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{path}[{n}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-7, abs=1e-8), (path, actual, expected)
    else:
        assert actual == expected, (path, actual, expected)


def figures_of(report: dict[str, Any], team: str) -> dict[str, Any]:
    return next(t for t in report["teams"] if t["team"] == team)


# -- the report ---------------------------------------------------------------------------------------


def test_the_generated_organisation_is_what_the_tests_need(world: tuple[Any, Org, Path]) -> None:
    _, org, _ = world
    expect = Expected(org, SINCE, UNTIL)
    assert len(org.events) >= 20_000 and len(org.items) >= 300 and len(org.rejections) >= 500
    kinds = {expect.without_outcome(i)[0] for i in expect.relevant()}
    assert {"closed", "unverified", "stale_open", None} <= kinds
    completed = [i for i in expect.relevant() if expect.completed(i)]
    assert any(not expect.assisted(i) for i in completed) and any(expect.assisted(i) for i in completed)
    assert any(all(e.cost is None for e in expect.events(i)) for i in completed if expect.assisted(i))  # unpriced items
    assert any(e.ts > i.completed_at for i in completed for e in expect.events(i))  # usage after completion
    assert any(expect.team_of(i) != i.team for i in expect.relevant())  # teams found from the spending
    # Items in progress and fresh at until, judged by what became of them: each verdict, and one not judged yet.
    judged = {expect.without_outcome(i)[0] for i in expect.relevant() if expect.status_at_until(i) in ("open", "in_progress") and i.created_at >= expect.stale_before}
    assert {"closed", "stale_open", None} <= judged
    at_until = Expected(org, SINCE, UNTIL, now=UNTIL)
    assert any(i.linked and at_until.without_outcome(i) == (None, None) and at_until.status_at_until(i) == "in_progress" for i in org.items.values())
    # Tickets whose merged PR covers their spend up to the merge, and some of it after the merge that counts.
    covered = [(i, after) for i in expect.relevant() if (after := expect.without_outcome(i)[1]) is not None]
    assert any(expect.in_period(e.ts) and e.ts <= after for i, after in covered for e in expect.events(i))
    assert any(expect.in_period(e.ts) and e.ts > after for i, after in covered for e in expect.events(i))
    assert any(i.registered == "auto" and i.changes for i in org.items.values())  # unverified at until, moved on later
    # Tickets left open with more than one merged PR (RELINK-*): two of them carrying parts of one ticket
    # in the period; one after an earlier merge, AI-assisted by the work since; one done by hand after the
    # ticket's earlier work, not assisted by it; one carrying its part though a later one merged since.
    carries = [(t, pr, span) for t in org.items.values() for pr in map(org.items.__getitem__, t.linked) if (span := expect.span(t, pr))]
    assert 2 in Counter(t.id for t, _, _ in carries).values()
    assert any(after is not None and expect.assisted(pr) for _, pr, (after, _) in carries)
    assert any(after is not None and not expect.assisted(pr) and any(e.status < 400 and e.ts <= after for e in expect.events(t)) for t, pr, (after, _) in carries)
    assert any(expect.standing(t)[-1] is not pr and expect.assisted(pr) for t, pr, _ in carries)
    assert any(not expect.merge_holds(org.items[pr]) for t, _, _ in carries for pr in t.linked)  # a merge reverted between two
    # Size and rework: both reasons among the period's completions, AI-assisted or not; reopened items
    # not done again; a ticket whose merged PR was reverted; reverts too late to be rework, or a second one.
    delivered = [i for i in expect.relevant() if expect.delivered(i)]
    marks = {(expect.rework(i) or (None, None))[1] for i in delivered if expect.reworked_in_period(i)} | {None}
    assert {"reverted", "reopened", None} <= marks
    assert any(expect.reworked_in_period(i) and expect.assisted(i) for i in delivered)
    assert any(expect.reworked_in_period(i) and not expect.assisted(i) for i in delivered)
    # Done again after a reopening: assisted by the answers since it (REDONE-1), not by the old ones (RECYCLED-1).
    redone = [i for i in completed if expect.redone_after(i) is not None]
    assert any(expect.assisted(i) for i in redone) and not expect.assisted(org.items["RECYCLED-1"]) and expect.completed(org.items["RECYCLED-1"])
    assert any(e.status < 400 for e in expect.events(org.items["RECYCLED-1"]))
    # A reopening before the period, done again in it: a completion that held, and its spend is an outcome.
    assert any(expect.rework(i) and not expect.reworked_in_period(i) and expect.completed(i) for i in delivered)
    assert any(not expect.completed(i) for i in delivered)
    assert any(any(expect.status_at_until(org.items[p]) == "done" and expect.undone_at_until(org.items[p]) for p in i.linked)
               for i in expect.relevant())  # fmt: skip
    reverts = [i for i in org.items.values() if i.reverts]
    assert any(r.changes[0].at - org.items[r.reverts].completed_at > timedelta(days=14) and not org.items[r.reverts].reverted_at for r in reverts)
    assert 2 in Counter(r.reverts for r in reverts).values()
    sizes = [expect.size(i) for i in completed if expect.assisted(i)]
    assert {("lines", 50), ("lines", 51)} & set(sizes) and any(s and s[0] == "points" for s in sizes) and None in sizes
    assert any(len(i.sizes) > 1 for i in org.items.values())  # reported twice: the latest holds


def test_report_equals_the_independent_computation(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    report = adoption_report(engine, since=SINCE, until=UNTIL, min_group_size=MIN_GROUP, stale_after_days=STALE_DAYS)
    assert_close(report, Expected(org, SINCE, UNTIL).report())

    # Privacy: the small team, and a team with items but nobody, are withheld with no figures at all.
    # With the two people without a team (the organisation's admin and the proxy's), whose spend is in
    # overall too, they are 5 people: overall less the teams shown is no smaller group's.
    assert [t["team"] for t in report["teams"]] == ["data", "legal", "mobile", "platform", "web"]
    for small in ("mobile", "legal"):
        assert figures_of(report, small) == {"team": small, "withheld": True, "reason": "fewer than 5 people"}
    assert "completed_items" in figures_of(report, "platform")  # exactly min_group_size people
    text = orjson.dumps(report).decode()
    for key in org.keys:
        assert key.id not in text and key.owner not in text


@pytest.mark.parametrize(
    ("since", "until", "stale_days", "min_group", "bands"),
    [
        (T0, END + timedelta(days=1), 14.0, 5, None),  # everything
        (T0 + timedelta(days=21), T0 + timedelta(days=28), 3.0, 6, None),  # one week; platform becomes too small
        (SINCE, UNTIL, STALE_DAYS, 3, None),  # the groups under 3 people hold 2 between them: mobile (3) is withheld with them
        (SINCE - SECOND, UNTIL + SECOND, STALE_DAYS, MIN_GROUP, None),  # the boundary items come in
        (SINCE + SECOND, UNTIL - SECOND, STALE_DAYS, MIN_GROUP, None),  # ... and go out
        (SINCE, UNTIL, STALE_DAYS, MIN_GROUP, SizeBands(lines=(1, 500), points=())),  # other bands; one band for all points
        (T0 + timedelta(days=30), END + timedelta(days=30), STALE_DAYS, MIN_GROUP, SizeBands(lines=(), points=(2.5,))),  # after most reworks
    ],
)
def test_other_periods_and_settings(
    world: tuple[Any, Org, Path], since: datetime, until: datetime, stale_days: float, min_group: int, bands: SizeBands | None
) -> None:
    engine, org, _ = world
    report = adoption_report(engine, since=since, until=until, min_group_size=min_group, stale_after_days=stale_days, size_bands=bands)
    assert_close(report, Expected(org, since, until, min_group=min_group, stale_days=stale_days, size_bands=bands).report())
    if min_group == 6:
        assert figures_of(report, "platform")["withheld"] is True
    if min_group == 3:
        assert figures_of(report, "mobile") == {"team": "mobile", "withheld": True, "reason": "withheld with the teams of fewer than 3 people, which a total would reveal"}
        assert all("completed_items" in figures_of(report, team) for team in ("data", "platform", "web"))


def test_period_boundaries_are_half_open(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    expect = Expected(org, SINCE, UNTIL)
    items = org.items
    assert [expect.completed(items[f"EDGE-{n}"]) for n in (1, 2, 3, 4)] == [True, False, False, True]
    # EDGE-5 was created stale_after_days before until: fresh then (not stale_open when the report is computed at
    # until), stale right after it and still open (stale_open once judged, as any report computed later finds).
    at_until = Expected(org, SINCE, UNTIL, now=UNTIL)
    assert at_until.without_outcome(items["EDGE-5"])[0] is None and at_until.without_outcome(items["EDGE-6"])[0] == "stale_open"
    assert expect.without_outcome(items["EDGE-5"])[0] == "stale_open"
    assert_close(adoption_report(engine, since=SINCE, until=UNTIL, min_group_size=MIN_GROUP, stale_after_days=STALE_DAYS, now=UNTIL), at_until.report())

    def web(since: datetime, until: datetime) -> dict[str, Any]:
        return adoption_report(engine, since=since, until=until, team="web", stale_after_days=STALE_DAYS)["overall"]

    base = web(SINCE, UNTIL)
    wider = web(SINCE - SECOND, UNTIL + SECOND)
    narrower = web(SINCE + SECOND, UNTIL - SECOND)
    assert wider["completed_items"] - base["completed_items"] == 2  # EDGE-2 at since-1s, EDGE-3 at until
    assert base["completed_items"] - narrower["completed_items"] == 2  # EDGE-1 at since, EDGE-4 at until-1s
    # EDGE-6 has an event at since (counted) and one at until (not); the wider period has both.
    edge6 = [e for e in org.events_by_item["EDGE-6"] if e.ts in (SINCE, UNTIL)]
    assert len(edge6) == 2


def test_team_filter_covers_only_that_team(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    full = adoption_report(engine, since=SINCE, until=UNTIL, stale_after_days=STALE_DAYS)
    for team in ("web", "platform", "mobile", "nobody"):
        report = adoption_report(engine, since=SINCE, until=UNTIL, team=team, stale_after_days=STALE_DAYS)
        assert_close(report, Expected(org, SINCE, UNTIL).report(team))
        assert report["team"] == team and [t["team"] for t in report["teams"]] == [team]
        if team in ("mobile", "nobody"):
            assert report["overall"] == {"withheld": True, "reason": "fewer than 5 people"}
        else:
            assert report["teams"][0] == figures_of(full, team)
            assert report["overall"] == {k: v for k, v in figures_of(full, team).items() if k != "team"}


FIRST_COLUMNS = (
    "scope", "team", "completed_items", "ai_assisted_items", "ai_assisted_share", "cost_per_item_median", "cost_per_item_p90", "cost_total",
    "tokens_per_item_median", "tokens_per_item_p90", "tokens_total", "spend_without_outcome_usd", "spend_after_completion_usd",
    "cycle_time_ai_assisted_hours", "cycle_time_other_hours", "rejected_requests_total", "withheld",
)  # fmt: skip


def test_csv_parses_back_to_the_json_figures(world: tuple[Any, Org, Path]) -> None:
    engine, _, _ = world
    report = adoption_report(engine, since=SINCE, until=UNTIL, stale_after_days=STALE_DAYS)
    every = list(csv.DictReader(io.StringIO(adoption_csv(report))))
    assert tuple(every[0]) == CSV_COLUMNS
    assert CSV_COLUMNS[:CSV_COLUMNS.index("withheld") + 1] == FIRST_COLUMNS  # columns added later come after: positions hold
    rows = [r for r in every if not r["scope"].endswith("_size_band")]
    assert [(r["scope"], r["team"]) for r in rows] == [("overall", "")] + [("team", t["team"]) for t in report["teams"]]
    for row, figures in zip(rows, [report["overall"], *report["teams"]], strict=True):
        if figures.get("withheld"):
            assert row["withheld"] == "true" and all(row[c] == "" for c in CSV_COLUMNS if c not in ("scope", "team", "withheld"))
            continue
        rework = figures["rework"]
        expected = {
            "completed_items": figures["completed_items"],
            "ai_assisted_items": figures["ai_assisted_items"],
            "ai_assisted_share": figures["ai_assisted_share"],
            "cost_per_item_median": figures["cost_per_completed_item"]["median"],
            "cost_per_item_p90": figures["cost_per_completed_item"]["p90"],
            "cost_total": figures["cost_per_completed_item"]["total"],
            "tokens_per_item_median": figures["tokens_per_completed_item"]["median"],
            "tokens_per_item_p90": figures["tokens_per_completed_item"]["p90"],
            "tokens_total": figures["tokens_per_completed_item"]["total"],
            "spend_without_outcome_usd": figures["spend_without_outcome_usd"],
            "spend_after_completion_usd": figures["spend_after_completion_usd"],
            "cycle_time_ai_assisted_hours": figures["cycle_time_hours"]["ai_assisted"],
            "cycle_time_other_hours": figures["cycle_time_hours"]["other"],
            "rejected_requests_total": sum(figures["rejected_requests"].values()),
            "cost_per_item_median_excluding_reworked": figures["cost_per_completed_item"]["excluding_reworked"]["median"],
            "cost_per_100_changed_lines": figures["cost_per_100_changed_lines"]["usd"],
            "rework_rate_ai_assisted": rework["ai_assisted"]["rate"],
            "rework_rate_other": rework["other"]["rate"],
            "reworked_items": rework["ai_assisted"]["reworked"] + rework["other"]["reworked"],
            "spend_without_outcome_reworked_usd": figures["spend_without_outcome_breakdown"]["reworked"],
            "spend_usd": figures["spend_usd"],
        }
        assert row["withheld"] == "false" and row["size_band"] == ""
        assert set(expected) | {"scope", "team", "size_band", "withheld"} == set(CSV_COLUMNS)
        for column, value in expected.items():
            assert (float(row[column]) if row[column] != "" else None) == (None if value is None else pytest.approx(value, rel=1e-12)), column

    # Then the size bands of every scope shown, in the report's order; withheld teams have none.
    bands = [r for r in every if r["scope"].endswith("_size_band")]
    shown = [("overall", "", report["overall"])] + [("team", t["team"], t) for t in report["teams"] if not t.get("withheld")]
    expected_bands = [(f"{scope}_size_band", team, band) for scope, team, figures in shown for band in figures["cost_by_size"]]
    assert len(bands) == len(expected_bands) == 9 * len(shown)
    for row, (scope, team, band) in zip(bands, expected_bands, strict=True):
        assert (row["scope"], row["team"], row["size_band"]) == (scope, team, band["label"])
        assert int(row["ai_assisted_items"]) == band["items"]
        for column, name in (("cost_per_item_median", "median"), ("cost_per_item_p90", "p90"), ("cost_total", "total")):
            assert (float(row[column]) if row[column] else None) == (None if band[name] is None else pytest.approx(band[name], rel=1e-12))
        assert row["completed_items"] == row["spend_without_outcome_usd"] == ""


def test_csv_of_a_filtered_report_and_of_awkward_names() -> None:
    figures = {"withheld": True, "reason": "fewer than 5 people"}
    report = {"team": "=cmd", "overall": figures, "teams": [{"team": "=cmd", **figures}]}
    rows = list(csv.reader(io.StringIO(adoption_csv(report))))
    assert rows[1][:2] == ["overall", "'=cmd"] and rows[2][:2] == ["team", "'=cmd"]  # not a spreadsheet formula


def test_plain_text_for_the_cli(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    report = adoption_report(engine, since=SINCE, until=UNTIL, stale_after_days=STALE_DAYS)
    lines = adoption_text(report).splitlines()
    assert lines[0].startswith(f"adoption {iso(SINCE)} .. {iso(UNTIL)}")
    by_scope = {line.split()[0]: line for line in lines[4:10]}
    assert set(by_scope) == {"overall", "data", "legal", "mobile", "platform", "web"} and lines[10] == ""
    rework = report["overall"]["rework"]
    assert lines[11].startswith(f"rework: {rework['ai_assisted']['reworked']} of {rework['ai_assisted']['items']} AI-assisted and ")
    bands = lines[-9:]
    assert [line.split("  ")[0] for line in bands] == [band["label"] for band in report["overall"]["cost_by_size"]]
    assert [int(re.split(r"\s{2,}", line)[1]) for line in bands] == [band["items"] for band in report["overall"]["cost_by_size"]]
    assert "fewer than 5 people" in by_scope["mobile"] and str(report["overall"]["completed_items"]) in by_scope["overall"]
    assert not any(key.owner in line for line in lines for key in org.keys)
    filtered = adoption_text(adoption_report(engine, since=SINCE, until=UNTIL, team="web")).splitlines()
    assert filtered[4].startswith("team web") and filtered[5] == "" and filtered[6].startswith("rework: ")
    small = adoption_text(adoption_report(engine, since=SINCE, until=UNTIL, team="mobile")).splitlines()
    assert len(small) == 5 and "fewer than 5 people" in small[4]  # withheld: no rework, no bands


def test_percentiles_interpolate_like_numpy_linear() -> None:
    import random

    rng = random.Random(3)
    for n in range(2, 40):
        values = [rng.uniform(0, 100) for _ in range(n)]
        assert quantile(values, 0.9) == pytest.approx(statistics.quantiles(values, n=10, method="inclusive")[-1])
        assert quantile(values, 0.5) == pytest.approx(statistics.median(values))
    assert quantile([7.0], 0.9) == 7.0 and quantile([], 0.5) is None
    assert quantile([1, 2, 3, 4], 0.9) == pytest.approx(3.7)  # numpy.percentile([1, 2, 3, 4], 90)


def test_item_detail(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    reopened = next(i for i in org.items.values() if i.kind == "reopened" and i.status == "done" and org.events_by_item.get(i.id))
    ticket = next(i for i in org.items.values() if i.linked and org.events_by_item.get(i.id))
    for item in (reopened, ticket, org.items["EDGE-6"]):
        detail = item_detail(engine, item.id)
        days: dict[str, list] = defaultdict(lambda: [0, 0, []])
        for event in org.events_by_item[item.id]:
            day = days[event.ts.date().isoformat()]
            day[0] += 1
            day[1] += event.total
            day[2].append(event.cost)
        expected_days = [
            {"day": d, "requests": n, "total_tokens": t, "cost_usd": sum(c for c in cs if c is not None) if any(c is not None for c in cs) else None}
            for d, (n, t, cs) in sorted(days.items())
        ]
        assert_close(detail["usage_by_day"], expected_days)
        assert detail["history"] == [{"ts": iso(c.at), "from": c.before, "to": c.after, "source": c.source, "note": None} for c in item.changes]
        if item.status == "done":
            assert detail["cycle_time_hours"] == pytest.approx((item.completed_at - item.created_at).total_seconds() / 3600)  # type: ignore[operator]
        else:
            assert detail["cycle_time_hours"] is None
    linked = item_detail(engine, ticket.id)["linked"]
    assert [entry["id"] for entry in linked] == ticket.linked
    assert linked[0]["status"] == org.items[ticket.linked[0]].status and linked[0]["kind"] == "merged_pr"
    assert item_detail(engine, ticket.linked[0])["linked_from"][0]["id"] == ticket.id
    nothing = item_detail(engine, "NOPE-1")
    assert nothing == {"cycle_time_hours": None, "size": None, "size_history": [], "rework": None, "usage_by_day": [], "history": [],
                       "linked": [], "linked_from": []}  # fmt: skip


# -- the routes ---------------------------------------------------------------------------------------


@pytest.fixture
async def api(world: tuple[Any, Org, Path], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    engine, _, folder = world
    settings = make_settings(
        tmp_path, database_url=f"sqlite:///{folder / 'taskproxy.db'}", privacy={"min_group_size": MIN_GROUP}, reports={"stale_after_days": STALE_DAYS}
    )
    async with in_process(create_app(settings, engine=engine), timeout=30) as http:
        yield http


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.anyio
async def test_routes_answer_the_report_as_json_and_csv(world: tuple[Any, Org, Path], api: httpx.AsyncClient) -> None:
    engine, org, _ = world
    params = {"since": iso(SINCE), "until": iso(UNTIL)}
    response = await api.get("/api/reports/adoption", params=params, headers=ADMIN)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    direct = adoption_report(engine, since=SINCE, until=UNTIL, min_group_size=MIN_GROUP, stale_after_days=STALE_DAYS)
    assert response.json() == orjson.loads(orjson.dumps(direct))
    assert_close(response.json(), Expected(org, SINCE, UNTIL).report())

    filtered = await api.get("/api/reports/adoption", params={**params, "team": "data"}, headers=ADMIN)
    assert_close(filtered.json(), Expected(org, SINCE, UNTIL).report("data"))
    small = await api.get("/api/reports/adoption", params={**params, "team": "mobile"}, headers=ADMIN)
    assert small.json()["overall"] == {"withheld": True, "reason": "fewer than 5 people"}

    as_csv = await api.get("/api/reports/adoption.csv", params=params, headers=ADMIN)
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.text == adoption_csv(direct)


@pytest.mark.anyio
async def test_the_reports_money_is_the_exact_sum_of_the_items_money(world: tuple[Any, Org, Path], api: httpx.AsyncClient) -> None:
    """One precision everywhere: the report's total cost is the sum of its items' costs as each item's
    own page gives them (with the tickets not done whose work led to them), to the nano-dollar, and an
    item's cost the sum of its days'."""
    _, org, _ = world
    expect = Expected(org, SINCE, UNTIL)
    report = (await api.get("/api/reports/adoption", params={"since": iso(SINCE), "until": iso(UNTIL)}, headers=ADMIN)).json()
    assisted = [i for i in expect.relevant() if expect.completed(i) and expect.assisted(i)]
    carried = [t for t in org.items.values() if t.status != "done" and any(t.id in
               {e.item for e in expect.outcome_events(i)} for i in assisted)]  # fmt: skip
    assert carried, "the organisation has no ticket left open whose merged PR carries its work"
    items = [(await api.get(f"/api/work-items/{quote(i.id, safe='')}", headers=ADMIN)).json() for i in [*assisted, *carried]]
    priced = [item for item in items if item["cost_usd"] is not None]
    assert len(priced) > 20

    def nanos(usd: float) -> int:
        exact = round(usd * 1e9)
        assert abs(usd * 1e9 - exact) < 1e-3, usd  # every figure is a whole number of nano-dollars
        return exact

    assert sum(nanos(item["cost_usd"]) for item in priced) == nanos(report["overall"]["cost_per_completed_item"]["total"])
    for item in priced:
        days = [day["cost_usd"] for day in item["usage_by_day"] if day["cost_usd"] is not None]
        assert sum(map(nanos, days)) == nanos(item["cost_usd"]), item["id"]


@pytest.mark.anyio
async def test_routes_default_period_errors_and_admin_only(world: tuple[Any, Org, Path], api: httpx.AsyncClient) -> None:
    engine, _, _ = world
    before = utcnow()
    default = (await api.get("/api/reports/adoption", headers=ADMIN)).json()
    until, since = parse_time(default["until"]), parse_time(default["since"])
    assert before - timedelta(seconds=1) <= until <= utcnow() + timedelta(seconds=1)
    assert until - since == timedelta(days=30)
    relative = (await api.get("/api/reports/adoption", params={"until": iso(UNTIL)}, headers=ADMIN)).json()
    assert relative["since"] == iso(UNTIL - timedelta(days=30))

    for params in ({"since": iso(UNTIL), "until": iso(SINCE)}, {"since": "yesterday"}, {"until": "soon"}):
        for path in ("/api/reports/adoption", "/api/reports/adoption.csv"):
            bad = await api.get(path, params=params, headers=ADMIN)
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request", (path, params)

    _, token = issue_key(engine, owner="route-tester", team=None, role="service")  # not a person: who is withheld stays as it is
    for path in ("/api/reports/adoption", "/api/reports/adoption.csv"):
        refused = await api.get(path, headers={"authorization": f"Bearer {token}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert (await api.get(path)).status_code == 401


def test_one_teams_part_of_the_whole_report_is_that_teams_report(world: tuple[Any, Org, Path]) -> None:
    """`?snapshot=latest&team=` answers from the snapshot computed for every team: for each team (shown,
    withheld, unknown) it is what computing with `team` gives."""
    engine, org, _ = world
    options = {"min_group_size": MIN_GROUP, "stale_after_days": STALE_DAYS}
    whole = adoption_report(engine, since=SINCE, until=UNTIL, **options)
    teams = [entry["team"] for entry in whole["teams"]]
    assert any(entry.get("withheld") for entry in whole["teams"]) and any(not entry.get("withheld") for entry in whole["teams"])
    for team in [*teams, "no-such-team"]:
        assert for_team(whole, team) == adoption_report(engine, since=SINCE, until=UNTIL, team=team, **options), team


def test_completions_by_period_are_the_reports_figures_for_each_period(world: tuple[Any, Org, Path]) -> None:
    """The dashboard's weekly chart reads the completed items once for all its weeks; each week's
    figures are those the adoption report gives for that week."""
    engine, _, _ = world
    windows = week_windows(UNTIL, 8)
    weeks = completions_by_period(engine, windows)
    for (since, until), figures in zip(windows, weeks, strict=True):
        overall = adoption_report(engine, since=since, until=until)["overall"]
        cost = overall["cost_per_completed_item"]
        expected = {"completed_items": overall["completed_items"], "ai_assisted_items": overall["ai_assisted_items"],
                    "median": cost["median"], "p90": cost["p90"], "total": cost["total"]}  # fmt: skip
        assert figures == expected, (since, until)
    assert sum(1 for f in weeks if f["ai_assisted_items"] and f["median"] is not None) >= 4  # not a comparison of empty weeks


# -- a ticket with more than one merged pull request --------------------------------------------------


class _Work:
    """A small organisation written through the real paths, for the carry's own tests."""

    def __init__(self, engine: Any, tmp_path: Path) -> None:
        self.engine, self.tmp_path, self.counter, self.pending, self.n = engine, tmp_path, TokenCounter(), [], 0

    def ticket(self, item: str, status: str, at: datetime) -> None:
        registry.transition(self.engine, item, status, source="jira", at=at, fields={"team": "web"}, created_at=at)

    def merged_pr(self, pr: str, merged: datetime, ticket: str | None = None) -> None:
        registry.transition(self.engine, pr, "open", source="github", at=merged - DAY, fields={"team": "web"}, created_at=merged - DAY)
        registry.transition(self.engine, pr, "done", source="github", at=merged, merged=True)
        if ticket is not None:  # its branch names the ticket
            registry.link(self.engine, ticket, pr, at=merged)

    def requests(self, item: str, *times: datetime, model: str = "big-model", status: int = 200, price: Price | None = PRICE) -> None:
        key = SimpleNamespace(id="worker", owner="worker@example.com", team="web")
        for ts in times:
            self.n += 1
            self.pending.append(past_request(id=f"r-{self.n}", ts=ts, key=key, work_item=item, model=model, body={"n": self.n}, status=status,
                                             prompt_tokens=100_000, completion_tokens=10_000, counter=self.counter, price=price))  # fmt: skip

    def flush(self) -> None:
        write_all(self.engine, self.tmp_path / f"spool-{self.n}.jsonl", self.pending, len(self.pending))
        self.pending = []

    def figures(self, since: datetime, until: datetime) -> tuple[int, int, float]:
        """(completed, AI-assisted, total cost per completed item) of the period, read two months later."""
        self.flush()
        overall = adoption_report(self.engine, since=since, until=until, min_group_size=1, now=datetime(2026, 6, 1))["overall"]
        return overall["completed_items"], overall["ai_assisted_items"], overall["cost_per_completed_item"]["total"]


DAY, HOUR = timedelta(days=1), timedelta(hours=1)
FEBRUARY, MARCH, APRIL, MAY = datetime(2026, 2, 1), datetime(2026, 3, 1), datetime(2026, 4, 1), datetime(2026, 5, 1)
REQUEST_USD = usd(PRICE.nanos(100_000, 10_000))  # each request of `_Work`: $2.25


@BOTH_DATABASES
def test_a_later_pull_request_naming_a_carried_ticket_takes_nothing_from_the_earlier_one(database_url: str, tmp_path: Path) -> None:
    """February: $9 of AI work on T-1 and its pull request #1, merged; T-1 left open. March: a pull
    request done by hand (#2, no request) whose branch names T-1. #2 carried all of T-1's usage up to
    its merge: March counted it AI-assisted (5/6 became 6/6) with February's $9 again, and February,
    read again, lost #1's (1/1 became 0/1) (found by a review). Each carries the ticket's usage since
    the merge before it, and is assisted only by an answer in that span."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    work = _Work(engine, tmp_path)
    for n in range(1, 6):  # five ordinary AI-assisted tickets done in March
        work.ticket(f"W-{n}", "open", MARCH - 5 * DAY)
        work.requests(f"W-{n}", MARCH + 2 * n * DAY + 9 * HOUR)
        work.ticket(f"W-{n}", "done", MARCH + 2 * n * DAY + 15 * HOUR)
    work.ticket("T-1", "in_progress", MARCH - 40 * DAY)
    work.requests("T-1", *(MARCH - 25 * DAY + k * HOUR for k in range(4)))
    work.merged_pr("acme/web#1", MARCH - 19 * DAY, ticket="T-1")
    second = MARCH + 19 * DAY
    work.merged_pr("acme/web#2", second)
    before = work.figures(MARCH, APRIL), work.figures(FEBRUARY, MARCH)
    assert before == ((6, 5, 5 * REQUEST_USD), (1, 1, 4 * REQUEST_USD))

    registry.link(engine, "T-1", "acme/web#2", at=second)  # the re-link: nothing it could carry
    work.requests("T-1", MARCH + 3 * DAY, status=429)  # nor a failed request in its span
    assert (work.figures(MARCH, APRIL), work.figures(FEBRUARY, MARCH)) == before

    work.requests("T-1", second - 2 * HOUR, second + HOUR)  # an answer in its span, and one after its merge
    assert work.figures(MARCH, APRIL) == (6, 6, 6 * REQUEST_USD)  # #2 at $2.25: the answer before its merge
    assert work.figures(FEBRUARY, MARCH) == before[1]

    # Two pull requests of T-1 in April, each its own span: #3 the work since #2 (the request an hour after
    # it, and one more), #4 the request between them.
    work.requests("T-1", APRIL + 2 * DAY)
    work.merged_pr("acme/web#3", APRIL + 3 * DAY, ticket="T-1")
    work.requests("T-1", APRIL + 5 * DAY)
    work.merged_pr("acme/web#4", APRIL + 6 * DAY, ticket="T-1")
    assert work.figures(APRIL, MAY) == (2, 2, 3 * REQUEST_USD)
    assert (work.figures(MARCH, APRIL), work.figures(FEBRUARY, MARCH)) == ((6, 6, 6 * REQUEST_USD), before[1])

    # T-1 done in May: its own outcome, with all its usage, and in none of its pull requests' costs (as before).
    work.ticket("T-1", "done", MAY + 2 * DAY)
    assert work.figures(MAY, MAY + 30 * DAY) == (1, 1, 8 * REQUEST_USD)
    assert (work.figures(FEBRUARY, MARCH), work.figures(MARCH, APRIL), work.figures(APRIL, MAY)) == ((1, 0, 0.0), before[0], (2, 0, 0.0))
    engine.dispose()


@BOTH_DATABASES
def test_the_usage_a_pull_request_carries_since_the_merge_before_is_a_scan_of_its_events(database_url: str, tmp_path: Path) -> None:
    """A span of a ticket's usage after one moment and up to another, each ticket its own spans, read
    from days, hours and the raw hours at both ends (`spend_after.usage_between`): per span and model,
    what a scan of the raw events gives. Ends mid-hour, at midnight, on an hour's first and last
    microsecond, both in one hour, both in one day; events on the ends and either side of them."""
    from sqlalchemy import select

    from taskproxy.storage import spend_after
    from taskproxy.storage.models import UsageEvent
    from taskproxy.storage.rollup import TOKEN_COUNT_ROUTES

    engine = make_engine(database_url)
    upgrade_schema(engine)
    work = _Work(engine, tmp_path)
    t0, microsecond = datetime(2026, 3, 2), timedelta(microseconds=1)
    spans = [
        ("S-1", t0 + 5 * HOUR + timedelta(minutes=17), t0 + 2 * DAY + 13 * HOUR + timedelta(minutes=40)),
        ("S-1", t0 + 2 * DAY + 13 * HOUR + timedelta(minutes=40), t0 + 4 * DAY),  # the next one, up to a midnight
        ("S-2", t0 + DAY, t0 + DAY + 6 * HOUR - microsecond),  # from a midnight to an hour's last microsecond
        ("S-2", t0 + 2 * DAY + 9 * HOUR + timedelta(minutes=5), t0 + 2 * DAY + 9 * HOUR + timedelta(minutes=50)),  # within one hour
        ("S-3", t0 + 3 * HOUR + microsecond, t0 + 3 * DAY + 3 * HOUR + microsecond),  # an hour's first microsecond, both ends
    ]
    rng = random.Random(5)
    for item in ("S-1", "S-2", "S-3"):
        times = [t0 - DAY + timedelta(seconds=rng.randrange(6 * 86400)) for _ in range(150)]
        times += [end + s * microsecond for ticket, *ends in spans if ticket == item for end in ends for s in (-1, 0, 1)]
        for ts in times:
            model = rng.choice(["big-model", "big-model", "local"])
            work.requests(item, ts, model=model, status=rng.choice([200, 200, 200, 429]), price=None if model == "local" else PRICE)
    work.flush()
    with engine.connect() as connection:
        found = {(item, moment, model): (int(a), int(ans or 0), None if cost is None else int(cost), int(tok or 0))
                 for item, moment, model, a, ans, cost, tok in spend_after.usage_between(connection, spans)}  # fmt: skip
        events = connection.execute(select(UsageEvent.__table__)).all()
    expected: dict[tuple[str, datetime, str], tuple[int, int, int | None, int]] = {}
    for item, after, moment in spans:
        for e in events:
            if e.work_item == item and after < e.ts <= moment:
                attempts, answered, cost, tokens = expected.get((item, moment, e.model), (0, 0, None, 0))
                answered += e.status < 400 and e.route not in TOKEN_COUNT_ROUTES
                cost = cost if e.cost_nanos is None else (cost or 0) + e.cost_nanos
                expected[(item, moment, e.model)] = (attempts + 1, answered, cost, tokens + e.total_tokens)
    engine.dispose()
    assert found == expected and {(item, moment) for item, moment, _ in found} == {(item, moment) for item, _, moment in spans}
