"""A generated organisation for the adoption report's tests.

Teams and their people's keys, a few hundred work items whose lifecycles span six weeks (done, closed,
reopened, left open, auto-registered as unverified, tickets whose merged PR is linked), tens of
thousands of usage events and some hundreds of rejections — all written through the real paths:
`issue_key`, `registry.transition` / `registry.link`, and the `BatchWriter` fed with `Exchange` and
`Rejected` items. Deterministic (a seeded `random.Random`).

Everything written is also kept here as plain records (`Org`), from which the tests compute the
expected figures on their own.
"""

from __future__ import annotations

import random
from itertools import chain
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from taskproxy import registry
from taskproxy.settings import DEFAULT_ID_PATTERNS
from taskproxy.trackers.base import Delivery, ItemUpdate, Size
from taskproxy.workitems import WorkItemIds
from taskproxy.guard.auth import issue_key, revoke
from taskproxy.metering.pricing import Price
from taskproxy.metering.tokens import TokenCounter
from write_path import past_request, write_all
from taskproxy.metering.usage import Rejected
from taskproxy.money import usd

T0 = datetime(2026, 1, 5)
END = T0 + timedelta(days=42)
SINCE = T0 + timedelta(days=14)
UNTIL = T0 + timedelta(days=35)
STALE_DAYS = 10.0
MIN_GROUP = 5

# People per team (one developer key each); "mobile" is below MIN_GROUP, "platform" exactly at it.
TEAM_SIZES = {"web": 8, "data": 6, "platform": 5, "mobile": 3}
PRICES: dict[str, Price | None] = {
    "gpt-4o-mini": Price(input=0.15e-6, output=0.6e-6),
    "claude-sonnet": Price(input=3e-6, output=15e-6),
    "local-llama": None,  # no known price
}
REASONS = ("work_item_required", "rate_limited", "budget_exceeded", "forbidden")
REWORK_DAYS = 14.0
# Lines changed on and around the default size bands' bounds (50, 200, 1000), and story points.
EDGE_LINES = (0, 1, 50, 51, 200, 201, 1000, 1001)
POINTS = (0.5, 1, 2, 3, 5, 8, 13)


@dataclass
class Key:
    id: str
    owner: str
    team: str | None
    revoked: bool = False


@dataclass
class Change:
    at: datetime
    before: str | None
    after: str
    source: str


@dataclass
class Item:
    id: str
    team: str | None  # the registered team
    kind: str
    home: str | None  # whose people mostly work on it
    created_at: datetime
    registered: str = "transition"  # transition | auto (by the writer, unverified) | none
    changes: list[Change] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)  # merged PRs that came out of it
    sizes: list[Size] = field(default_factory=list)  # as the tracker reported them, in order
    reverted_at: datetime | None = None  # a revert of this merged PR was merged then (within REWORK_DAYS)
    reverts: str | None = None  # a revert: the pull request it undoes

    @property
    def status(self) -> str:
        if self.changes:
            return self.changes[-1].after
        return "unverified"

    @property
    def completed_at(self) -> datetime | None:
        if self.changes and self.changes[-1].after in ("done", "closed"):
            return self.changes[-1].at
        return None


@dataclass
class Event:
    id: str
    ts: datetime
    item: str
    key: Key
    model: str
    status: int
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion if self.status < 400 else 0

    @property
    def cost(self) -> float | None:
        price = PRICES[self.model]
        if price is None:
            return None
        if self.status >= 400:
            return 0.0
        return usd(price.nanos(self.prompt, self.completion))  # each event's cost is exact to the nano-dollar


@dataclass
class Rejection:
    id: str
    ts: datetime
    key: Key | None
    reason: str


@dataclass
class Org:
    keys: list[Key]
    items: dict[str, Item]
    events: list[Event]
    rejections: list[Rejection]
    events_by_item: dict[str, list[Event]]


class _Builder:
    def __init__(self, engine: Engine, rng: random.Random) -> None:
        self.engine, self.rng = engine, rng
        self.keys: list[Key] = []
        self.members: dict[str, list[Key]] = defaultdict(list)
        self.items: dict[str, Item] = {}
        self.events: list[Event] = []
        self.later: list[tuple[Item, datetime, str]] = []  # transitions of auto items, after the writer

    def uid(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    # -- people -----------------------------------------------------------------------------------

    def key(self, owner: str, team: str | None, role: str = "developer", *, revoked: bool = False, member: bool = True) -> Key:
        row, _ = issue_key(self.engine, owner=owner, team=team, role=role)
        if revoked:
            revoke(self.engine, row.id)
        key = Key(row.id, owner, team, revoked)
        self.keys.append(key)
        if member and team is not None:
            self.members[team].append(key)
        return key

    def people(self) -> None:
        for team, size in TEAM_SIZES.items():
            for n in range(size):
                self.key(f"person-{team}-{n:02d}", team)
        first = self.members["platform"][0]
        self.key(first.owner, "platform")  # a second key of the same person: still one person
        self.key("person-mobile-left", "mobile", revoked=True, member=False)  # revoked: not counted
        self.key("person-research-left", "research", revoked=True, member=False)
        self.key("ci-bot-web", "web", role="service")  # a service key is one more "owner" of the team
        self.admin = self.key("org-admin", None, role="admin", member=False)

    # -- work items -------------------------------------------------------------------------------

    def lifecycle(self, item: Item, steps: list[tuple[datetime, str]], *, source: str = "jira") -> None:
        self.items[item.id] = item
        for n, (at, status) in enumerate(steps):
            fields = {"team": item.team} if n == 0 and item.team else None
            registry.transition(self.engine, item.id, status, source=source, at=at, fields=fields, created_at=item.created_at if n == 0 else None)
            item.changes.append(Change(at, item.changes[-1].after if item.changes else None, status, source))

    def when(self, start: datetime, low_hours: float, high_hours: float) -> datetime:
        moment = start + timedelta(seconds=round(self.rng.uniform(low_hours, high_hours) * 3600))
        return min(moment, END)

    def work_items(self, count: int) -> None:
        rng = self.rng
        kinds = ["done"] * 42 + ["closed"] * 9 + ["open"] * 13 + ["reopened"] * 5 + ["auto"] * 9 + ["ghost"] * 2 + ["ticket"] * 8 + ["noteam"] * 12
        teams = sorted(TEAM_SIZES)
        for n in range(count):
            kind = rng.choice(kinds)
            home = rng.choice(teams)
            created = T0 + timedelta(seconds=rng.randint(0, 38 * 86400))
            item_id = f"{home.upper()}-{n + 1}"
            if kind == "auto":
                self.items[item_id] = item = Item(item_id, None, kind, home, created, registered="auto")
                if rng.random() < 0.4:  # an admin picks it up later
                    self.later.append((item, self.when(created, 24, 24 * 20), "in_progress"))
                continue
            if kind == "ghost":
                self.items[item_id] = Item(item_id, None, kind, home, created, registered="none")
                continue
            team = None if kind == "noteam" else home
            item = Item(item_id, team, kind, home, created)
            started = self.when(created, 1, 72)
            if kind in ("done", "noteam"):
                steps = [(created, "open"), (started, "in_progress"), (self.when(started, 2, 24 * 9), "done")]
                if rng.random() < 0.15:
                    steps = [(created, "open"), (self.when(created, 2, 24 * 6), "done")]
            elif kind == "closed":
                steps = [(created, "open"), (started, "in_progress"), (self.when(started, 2, 24 * 9), "closed")]
            elif kind == "open":
                steps = [(created, "open")] + ([(started, "in_progress")] if rng.random() < 0.6 else [])
            elif kind == "reopened":
                done = self.when(started, 2, 24 * 5)
                again = self.when(done, 2, 24 * 4)
                steps = [(created, "open"), (started, "in_progress"), (done, "done"), (again, "in_progress")]
                if rng.random() < 0.7:
                    steps.append((self.when(again, 2, 24 * 5), "done"))
            else:  # a ticket, worked on, whose PR is merged (or not yet, or closed unmerged)
                self.ticket_with_pr(item, started)
                continue
            steps = [s for i, s in enumerate(steps) if i == 0 or s[0] > steps[i - 1][0]]  # END clips: keep order strict
            self.lifecycle(item, steps)

    def ticket_with_pr(self, ticket: Item, started: datetime) -> None:
        self.lifecycle(ticket, [(ticket.created_at, "open"), (started, "in_progress")])
        pr_opened = self.when(started, 1, 48)
        pr = Item(f"acme/{ticket.home}#{len(self.items)}", ticket.home, "pr", ticket.home, pr_opened)
        outcome = self.rng.choice(["done", "done", "done", "closed", "open"])
        steps = [(pr_opened, "open")]
        end = self.when(pr_opened, 2, 24 * 8)
        if outcome != "open" and end > pr_opened:
            steps.append((end, outcome))
        self.lifecycle(pr, steps, source="github")
        registry.link(self.engine, ticket.id, pr.id, at=end)
        ticket.linked.append(pr.id)

    def edges(self) -> None:
        """Items on the period's boundaries."""
        stale = timedelta(days=STALE_DAYS)
        plan = [
            ("EDGE-1", SINCE - timedelta(days=3), SINCE, "done"),  # completed at since: in
            ("EDGE-2", SINCE - timedelta(days=3), SINCE - timedelta(seconds=1), "done"),  # just before: out
            ("EDGE-3", UNTIL - timedelta(days=3), UNTIL, "done"),  # completed at until: out
            ("EDGE-4", UNTIL - timedelta(days=3), UNTIL - timedelta(seconds=1), "done"),  # just before until: in
            ("EDGE-5", UNTIL - stale, None, "open"),  # created exactly stale_after_days before until: not stale
            ("EDGE-6", UNTIL - stale - timedelta(seconds=1), None, "open"),  # one second earlier: stale
        ]
        for item_id, created, done, status in plan:
            item = Item(item_id, "web", "edge", "web", created)
            self.lifecycle(item, [(created, "open")] + ([(done, status)] if done else []))
        # Done and reopened before the period, done again in it: a completion that held.
        redone = Item("REDONE-1", "web", "edge", "web", SINCE - timedelta(days=6))
        self.lifecycle(redone, [(redone.created_at, "open"), (SINCE - timedelta(days=4), "done"), (SINCE - timedelta(days=2), "in_progress"),
                                (SINCE + timedelta(days=3), "done")])  # fmt: skip
        # Done with AI before the period, reopened in it and set done again with no request since: a
        # recycled completion, not AI-assisted again (its events: usage(), from a generator of their own).
        recycled = Item("RECYCLED-1", "web", "recycled", "web", SINCE - timedelta(days=10))
        self.lifecycle(recycled, [(recycled.created_at, "open"), (SINCE - timedelta(days=5), "done"), (SINCE + timedelta(days=2), "in_progress"),
                                  (SINCE + timedelta(days=3), "done")])  # fmt: skip
        # Done in the period without AI, then reopened: rework of other work.
        quiet = Item("QUIET-1", "web", "quiet", "web", SINCE + timedelta(days=1))
        self.lifecycle(quiet, [(quiet.created_at, "open"), (SINCE + timedelta(days=2), "done"), (SINCE + timedelta(days=4), "in_progress")])
        # An item nobody with a team used: its spend counts only overall.
        orphan = Item("ORPHAN-1", None, "orphan", None, SINCE + timedelta(days=1))
        self.lifecycle(orphan, [(orphan.created_at, "open"), (orphan.created_at + timedelta(days=2), "done")])
        # A team with items but no people.
        for n, status in enumerate(["done", "open"]):
            item = Item(f"LEGAL-{n + 1}", "legal", "legal", "web", SINCE + timedelta(days=2))
            self.lifecycle(item, [(item.created_at, "open")] + ([(item.created_at + timedelta(days=1), status)] if status == "done" else []))

    # -- size and rework ----------------------------------------------------------------------------

    def sizes_and_reverts(self, rng: random.Random) -> None:
        """Sizes as trackers report them (some reported twice: the latest holds), and merged pull
        requests reverted within `REWORK_DAYS` of their merge or later (not rework). Reopened items
        are rework already: their lifecycles reopen them."""
        for item in list(self.items.values()):
            if item.registered != "transition" or not item.changes:
                continue
            first = item.changes[0].at
            if item.kind == "pr":
                self.size(item, Size(lines_added=rng.randint(0, 900), lines_deleted=rng.randint(0, 400), files_changed=rng.randint(1, 30)), first)
                if rng.random() < 0.2:  # pushed again: the size changes
                    self.size(item, Size(lines_added=rng.choice(EDGE_LINES), lines_deleted=0), first + timedelta(minutes=30))
            elif item.kind in ("done", "noteam", "closed", "reopened", "ticket", "edge"):
                roll = rng.random()
                if roll < 0.45:
                    self.size(item, Size(points=rng.choice(POINTS)), first, source="jira")
                elif roll < 0.6:  # lines known for a ticket too (from its merge request): lines win over points
                    self.size(item, Size(lines_added=rng.choice(EDGE_LINES), lines_deleted=rng.choice((0, 0, 7)), points=rng.choice(POINTS)), first)
        ids = WorkItemIds(DEFAULT_ID_PATTERNS)
        merged = [i for i in self.items.values() if i.kind == "pr" and i.status == "done"]
        doubled = False
        for n, pr in enumerate(merged):
            if rng.random() >= 0.6:
                continue
            merged_at = pr.completed_at
            assert merged_at is not None
            late = rng.random() < 0.25
            days = rng.uniform(REWORK_DAYS + 0.5, REWORK_DAYS + 10) if late else rng.uniform(0.05, REWORK_DAYS - 0.1)
            at = (merged_at + timedelta(days=days)).replace(microsecond=0)
            twice, doubled = not late and not doubled, doubled or not late
            for again in range(2 if twice else 1):  # the first reverted in time is reverted twice: the first revert is the rework
                revert = Item(f"acme/{pr.home}#{9000 + 10 * n + again}", None, "revert", None, at - timedelta(hours=1))
                revert.reverts = pr.id
                update = ItemUpdate(revert.id, "done", at=at, created_at=revert.created_at, merged=True, title=f"Revert {pr.id}", reverts=pr.id)
                registry.apply_delivery(self.engine, ids, Delivery("github", self.uid(), "pull_request", [update]), at, rework_days=REWORK_DAYS)
                revert.changes.append(Change(at, None, "closed", "github"))  # a merged revert is no completed work (reverts.revert_or_reland)
                self.items[revert.id] = revert
                if pr.reverted_at is None and not late:
                    pr.reverted_at = at
                at += timedelta(hours=2)

    def size(self, item: Item, size: Size, at: datetime, *, source: str = "github") -> None:
        registry.record_size(self.engine, item.id, size, source=source, at=at)
        item.sizes.append(size)

    # -- usage ------------------------------------------------------------------------------------

    def event(self, item: Item, ts: datetime, key: Key, model: str, status: int = 200) -> None:
        rng = self.rng
        self.events.append(Event(self.uid(), ts, item.id, key, model, status, rng.randint(50, 4000), rng.randint(10, 1500)))

    def usage(self) -> None:
        rng = self.rng
        done_by_hand: list[Item] = []
        for item in list(self.items.values()):
            if item.kind in ("quiet", "recycled"):
                continue  # no AI usage at all; the recycled item's below
            if item.kind == "orphan":
                for _ in range(12):
                    self.event(item, self.when(item.created_at, 0, 40), self.admin, "gpt-4o-mini")
                continue
            profile = rng.choices(["mixed", "none", "failed", "unpriced", "single"], weights=[80, 6, 4, 6, 4])[0]
            if item.kind == "edge":
                profile = "mixed"
            if profile == "none":
                if item.completed_at is not None:
                    done_by_hand.append(item)
                continue
            start = item.created_at
            stop = item.completed_at or min(item.created_at + timedelta(days=rng.uniform(2, 25)), END)
            count = 1 if profile == "single" else rng.randint(20, 140)
            people = self.members[item.home] if item.home else []
            outsiders = [k for k in self.keys if k.team is not None and k.team != item.home and not k.revoked]
            for _ in range(count):
                ts = start + (stop - start) * rng.random()
                key = rng.choice(outsiders) if rng.random() < (0.3 if item.team is None else 0.05) else rng.choice(people)
                if rng.random() < 0.02:
                    key = self.admin
                model = "local-llama" if profile == "unpriced" else rng.choices(list(PRICES), weights=[60, 30, 10])[0]
                status = 200 if profile != "failed" and rng.random() > 0.06 else rng.choice([429, 500, 503])
                self.event(item, ts.replace(microsecond=0), key, model, status)
            if item.completed_at is not None and rng.random() < 0.35:  # usage after the item was completed
                for _ in range(rng.randint(1, 6)):
                    self.event(item, self.when(item.completed_at, 0.01, 24 * 6), rng.choice(people), "gpt-4o-mini")
        # Some work done by hand, tagged with a request or two after it was done (not AI-assisted). Their
        # own generator: the rest of the organisation stays as it was.
        tagging = random.Random(len(done_by_hand))
        for item in done_by_hand[::2]:
            for _ in range(tagging.randint(1, 2)):
                ts = item.completed_at + timedelta(minutes=tagging.randint(2, 600))  # type: ignore[operator]
                if ts < END:
                    key = tagging.choice(self.members[item.home] or self.keys)
                    self.events.append(Event(f"{tagging.getrandbits(128):032x}", ts, item.id, key, "gpt-4o-mini", 200, tagging.randint(50, 4000),
                                             tagging.randint(10, 1500)))  # fmt: skip
        recycling = random.Random(7)
        recycled = self.items["RECYCLED-1"]
        for n in range(5):  # before its first completion only
            ts = recycled.created_at + timedelta(days=n + 0.5)
            self.events.append(Event(f"{recycling.getrandbits(128):032x}", ts, recycled.id, self.members["web"][1], "gpt-4o-mini", 200,
                                     recycling.randint(50, 4000), recycling.randint(10, 1500)))  # fmt: skip
        edge6 = self.items["EDGE-6"]
        for ts in (SINCE, UNTIL):  # on the boundaries: the first counts, the second does not
            self.event(edge6, ts, self.members["web"][0], "claude-sonnet")

    def relinked(self) -> None:
        """Tickets left open with more than one merged pull request: each carries the ticket's usage since
        the one before it still standing (README, "Work items and their outcomes"). After `usage`, with a
        generator of their own, and none of the items `sizes_and_reverts` picks from: the rest of the
        organisation stays as it was."""
        rng = random.Random(11)
        day, hour, minute = timedelta(days=1), timedelta(hours=1), timedelta(minutes=1)
        web = self.members["web"]

        def ticket(item_id: str, created: datetime, status: str = "in_progress") -> Item:
            item = Item(item_id, "web", "relink", "web", created)
            self.lifecycle(item, [(created, "open"), (created + hour, status)])
            return item

        def pull(number: int, of: Item, merged: datetime, opened: datetime | None = None) -> Item:
            item = Item(f"acme/web#{number}", "web", "relinked_pr", "web", opened or merged - day)
            self.lifecycle(item, [(item.created_at, "open"), (merged, "done")], source="github")
            registry.link(self.engine, of.id, item.id, at=merged)
            of.linked.append(item.id)
            return item

        def used(item: Item, *times: datetime, status: int = 200) -> None:
            for n, ts in enumerate(times):
                self.events.append(Event(f"{rng.getrandbits(128):032x}", ts, item.id, web[2 + n % 2], "gpt-4o-mini", status, rng.randint(50, 4000),
                                         rng.randint(10, 1500)))  # fmt: skip

        # Worked with AI before the period and merged; in it, a pull request done by hand whose branch names
        # the ticket again, with one failed request between: AI-assisted by none of the earlier work.
        first = ticket("RELINK-1", SINCE - 12 * day)
        used(first, *(SINCE - 10 * day + k * 7 * hour for k in range(6)))
        pull(8101, first, SINCE - 7 * day)
        used(first, SINCE + 2 * day, status=429)
        pull(8102, first, SINCE + 6 * day + 3 * hour)
        # Two pull requests in the period, each carrying its part: one event at the first merge itself (the
        # first's), then the rest of that hour, that day and the next days, and the second merge's hour.
        both = ticket("RELINK-2", SINCE - 2 * day)
        used(both, *(SINCE + k * 9 * hour for k in range(5)))
        merged = SINCE + 3 * day + 12 * hour + 20 * minute
        pull(8201, both, merged)
        used(both, merged, merged + 10 * minute, merged + 2 * hour, SINCE + 5 * day + 9 * hour, SINCE + 8 * day + 4 * hour + 5 * minute)
        pull(8202, both, SINCE + 8 * day + 4 * hour + 30 * minute)
        # Done by hand in the period after AI work on its ticket, and another pull request after the period:
        # the later one takes nothing from it.
        kept = ticket("RELINK-3", SINCE + 5 * day)
        used(kept, *(SINCE + 6 * day + k * 3 * hour for k in range(4)))
        pull(8301, kept, SINCE + 10 * day)
        pull(8302, kept, UNTIL + 3 * day, opened=UNTIL + day)
        # A merge reverted between two: the later one carries all since the last merge standing (none).
        reverted = ticket("RELINK-4", SINCE)
        used(reverted, SINCE + 12 * hour, SINCE + day)
        undone = pull(8401, reverted, SINCE + 2 * day)
        used(reverted, SINCE + 4 * day, SINCE + 5 * day + 6 * hour)
        pull(8402, reverted, SINCE + 9 * day)
        at = SINCE + 2 * day + 5 * hour
        revert = Item("acme/web#8409", None, "revert", None, at - hour)
        revert.reverts = undone.id
        update = ItemUpdate(revert.id, "done", at=at, created_at=revert.created_at, merged=True, title=f"Revert {undone.id}", reverts=undone.id)
        delivery = Delivery("github", f"{rng.getrandbits(128):032x}", "pull_request", [update])
        registry.apply_delivery(self.engine, WorkItemIds(DEFAULT_ID_PATTERNS), delivery, at, rework_days=REWORK_DAYS)
        revert.changes.append(Change(at, None, "closed", "github"))
        self.items[revert.id] = revert
        undone.reverted_at = at
        # Done after the period: its own outcome, in none of its pull requests' costs.
        done = ticket("RELINK-5", SINCE - 9 * day)
        used(done, SINCE - 8 * day, SINCE - 2 * day)
        pull(8501, done, SINCE - 6 * day)
        used(done, SINCE + day, SINCE + 2 * day)
        pull(8502, done, SINCE + 4 * day)
        registry.transition(self.engine, done.id, "done", source="jira", at=UNTIL + 2 * day)
        done.changes.append(Change(UNTIL + 2 * day, "in_progress", "done", "jira"))

    def rejections(self, count: int) -> list[Rejection]:
        rng = self.rng
        found = []
        for _ in range(count):
            ts = T0 + timedelta(seconds=rng.randint(0, 42 * 86400))
            if rng.random() < 0.1:
                found.append(Rejection(self.uid(), ts, None, "invalid_api_key"))
            else:
                found.append(Rejection(self.uid(), ts, rng.choice(self.keys), rng.choice(REASONS)))
        web = self.members["web"][1]
        found += [Rejection(self.uid(), SINCE, web, "rate_limited"), Rejection(self.uid(), UNTIL, web, "rate_limited")]
        return found


def _keys_held_from_the_start(engine: Engine) -> None:
    """The keys (the proxy's admin key too, when made first) were created before any usage, and the
    revoked ones revoked then too: a period's figures count the people holding keys at its end
    (privacy.py), and `issue_key` dates a key now."""
    from sqlalchemy import update

    from taskproxy.storage.models import ApiKey

    keys = ApiKey.__table__
    with engine.begin() as connection:
        connection.execute(update(keys).values(created_at=T0 - timedelta(days=2)))
        connection.execute(update(keys).where(keys.c.revoked_at.is_not(None)).values(revoked_at=T0 - timedelta(days=1)))


def generate(engine: Engine, spool_path: Path, *, seed: int = 20260105, items: int = 320, rejections: int = 700) -> Org:
    """Write the organisation into `engine` (schema already created) and return its records."""
    builder = _Builder(engine, random.Random(seed))
    builder.people()
    _keys_held_from_the_start(engine)
    builder.work_items(items)
    builder.edges()
    builder.usage()
    builder.relinked()
    refused = builder.rejections(rejections)
    builder.sizes_and_reverts(random.Random(seed + 1))  # a generator of its own: the rest stays as it was

    counter = TokenCounter()
    exchanges = (
        past_request(
            id=event.id, ts=event.ts, key=event.key, work_item=event.item, model=event.model,
            body={"model": event.model, "messages": [{"role": "user", "content": "make the tests pass"}]},
            prompt_tokens=event.prompt, completion_tokens=event.completion, counter=counter, price=PRICES[event.model],
            status=event.status, auto_registered_at=builder.items[event.item].created_at if builder.items[event.item].registered == "auto" else None,
            user_agent="org-generator",
        )
        for event in builder.events
    )  # fmt: skip
    rejections = (Rejected(r.ts, r.key.id if r.key else None, r.reason, "/v1/chat/completions") for r in refused)
    write_all(engine, spool_path, chain(exchanges, rejections), expected=len(builder.events) + len(refused))

    # Auto-registered items that an admin moved on later (after their usage was recorded).
    used = {e.item for e in builder.events}
    for item, at, status in builder.later:
        if item.id not in used or at <= item.created_at:
            continue  # never registered (nothing used it), or no time left to move it
        registry.transition(engine, item.id, status, source="api", at=at)
        item.changes.append(Change(at, "unverified", status, "api"))

    by_item: dict[str, list[Event]] = defaultdict(list)
    for event in builder.events:
        by_item[event.item].append(event)
    return Org(builder.keys, builder.items, builder.events, refused, dict(by_item))
