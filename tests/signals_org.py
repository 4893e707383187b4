"""A generated organisation for the gaming signals' tests: honest people, and ten planted patterns.

Honest people work like people: items one after another, requests in sessions during their working
hours on weekdays with jittered (log-normal) intervals, a different prompt every time, items that
complete, now and then a question after an item was done. Some are heavy users (many sessions a day,
many items, well over the heavy-spend threshold), one retries the same prompt a few times, one works
late and has two crunch days (07:00 to midnight), one works at night (UTC), one has a little spend on an unverified item, one spends
heavily on an item that completes only after the period.

Planted, one pattern per key, each kept clear of the other signals:

- `looper`  (web): a script sends the same prompt 120 times, in four bursts, on one of its items (and
  asks once the question an honest person retries);
- `closer`  (web): 15 requests on each of three items after they were done (2) or closed (1);
- `spinner` (web): about $65 in the period on two items, neither completed (one closed, one open);
- `shielder` (web): about $60 in the period on an item that stays open, and one tiny item done with
  a single request, as if that outcome covered the rest;
- `cron`    (data): a developer key in a cron job: every 15 minutes (+0–6 s), around the clock, 5 days;
- `outlier` (web): one completed item costing 20× the team's median cost per completed item;
- `unverif` (data): most of its spend on auto-registered (unverified) items and one never registered;
- `quick`   (ops): eight items, each opened, asked about three times and done within 4 minutes,
  and one ordinary item (split work closed fast to make cost per completed item look good);
- `tagger`  (ops): six tickets worked on by hand for a day or more, each tagged with one request of
  under 100 tokens (AI-assisted share bought for pennies), half a few minutes before it was done and
  half two hours before, and one ordinary item;
- `splitter` (mobile): ordinary pull requests of 150–400 changed lines, like its honest teammate's,
  and one burst of five of 30–50 lines completed within a few hours: one item's work, cut in five.

And `ci-bot` (web, a service key): the same prompt every 30 minutes around the clock — declared
automation, which the machine-behaviour signals leave out by default.

Everything is written through the real paths — keys by `issue_key`, lifecycles by
`registry.transition`, usage by the `BatchWriter` fed with `Exchange` items whose `body` makes the
prompt hash — and kept here as plain records, from which the tests compute the expected evidence.
Deterministic (a seeded `random.Random`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from taskproxy import registry
from taskproxy.trackers.base import Size
from taskproxy.guard.auth import issue_key
from taskproxy.metering.pricing import Price
from taskproxy.money import usd
from taskproxy.metering.tokens import TokenCounter
from write_path import past_request, write_all

T0 = datetime(2026, 3, 2)  # a Monday
SINCE = T0 + timedelta(days=7)
UNTIL = T0 + timedelta(days=28)
END = T0 + timedelta(days=35)
MODEL = "big-model"
PRICE = Price(input=15e-6, output=75e-6)
PLANTED = {
    "looper": "repeated_prompt",
    "closer": "spend_after_completion",
    "spinner": "spend_without_completion",
    "shielder": "spend_without_completion",
    "cron": "machine_cadence",
    "outlier": "cost_outlier",
    "unverif": "unverified_spend",
    "quick": "trivial_completions",
    "tagger": "trivial_completions",
    "splitter": "split_work",
}
OUTLIER_FACTOR = 20.0
LOOP_REQUESTS = 120
ARM64_QUESTION = "why does the build fail on arm64?"  # honest-web-1 retries it five times
AFTER_REQUESTS = 15  # per closer item
CRON_DAYS = 5
QUICK_ITEMS = 8  # trivial ones, each done 4 minutes after it was opened
TAGGED_ITEMS = 6  # done by hand, each with one light request: half 3 minutes before it was done, half 2 hours
SPLIT_ITEMS = 5  # small pull requests done within hours of each other, about one ordinary item together


@dataclass
class Key:
    id: str
    name: str  # the generator's name for the person: honest-web-0, looper, ...
    owner: str
    team: str
    role: str = "developer"


@dataclass
class Item:
    id: str
    team: str | None
    owner: Key | None  # who mainly works on it
    created_at: datetime
    registered: str = "transition"  # transition | auto (by the writer, unverified) | none
    steps: list[tuple[datetime, str]] = field(default_factory=list)
    lines: int | None = None  # changed lines, as a tracker reported them (team mobile only)

    @property
    def status(self) -> str:
        return self.steps[-1][1] if self.steps else ("unverified" if self.registered == "auto" else "unknown")

    @property
    def completed_at(self) -> datetime | None:
        return self.steps[-1][0] if self.steps and self.steps[-1][1] in ("done", "closed") else None


@dataclass
class Event:
    id: str
    ts: datetime
    item: str
    key: Key
    prompt: int
    completion: int
    content: str  # the user message: the prompt hash follows it

    @property
    def cost(self) -> float:
        return usd(PRICE.nanos(self.prompt, self.completion))  # exact to the nano-dollar, as recorded

    @property
    def body(self) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": self.content}]}


@dataclass
class Profile:
    hours: tuple[int, int]  # working hours, UTC: requests start in [from, to); to may be past 24
    sessions: tuple[int, int]  # sessions per working day
    size: tuple[int, int]  # requests per session
    pause: tuple[float, float] = (0.5, 30)  # hours from an item's last request to the next item (done in between)
    weekends: bool = False


HUMAN = Profile((8, 18), (2, 4), (6, 20))
HEAVY = Profile((7, 19), (6, 9), (15, 35), pause=(0.2, 3))
LATE = Profile((8, 24), (7, 10), (6, 16))  # works until midnight
NIGHT = Profile((22, 31), (2, 4), (6, 20))  # 22:00–07:00 UTC


@dataclass
class Org:
    keys: dict[str, Key]  # by generator name
    items: dict[str, Item]
    events: list[Event]

    def events_of(self, name: str) -> list[Event]:
        key = self.keys[name]
        return [e for e in self.events if e.key.id == key.id]

    @property
    def honest(self) -> list[Key]:
        return [k for n, k in self.keys.items() if n not in PLANTED]


class _Builder:
    def __init__(self, engine: Engine, rng: random.Random) -> None:
        self.engine, self.rng = engine, rng
        self.keys: dict[str, Key] = {}
        self.items: dict[str, Item] = {}
        self.events: list[Event] = []
        self.helpers: dict[str, list[Key]] = defaultdict(list)  # honest people of each team
        self.sequence = 0

    def uid(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def key(self, name: str, team: str, role: str = "developer", *, helper: bool = False) -> Key:
        owner = f"{name}@example.com"
        row, _ = issue_key(self.engine, owner=owner, team=team, role=role)
        key = self.keys[name] = Key(row.id, name, owner, team, role)
        if helper:
            self.helpers[team].append(key)
        return key

    def item(
        self, item_id: str, team: str | None, owner: Key | None, created: datetime, *, registered: str = "transition"
    ) -> Item:
        item = self.items[item_id] = Item(item_id, team, owner, created, registered)
        if registered == "transition":
            self.step(item, created, "open")
        return item

    def step(self, item: Item, at: datetime, status: str) -> None:
        fields = {"team": item.team} if not item.steps and item.team else None
        registry.transition(
            self.engine,
            item.id,
            status,
            source="jira",
            at=at,
            fields=fields,
            created_at=item.created_at if not item.steps else None,
        )
        item.steps.append((at, status))

    def event(
        self,
        item: Item,
        ts: datetime,
        key: Key,
        *,
        prompt: int | None = None,
        completion: int | None = None,
        content: str | None = None,
    ) -> Event:
        self.sequence += 1
        rng = self.rng
        event = Event(
            self.uid(), ts.replace(microsecond=0), item.id, key,
            prompt if prompt is not None else rng.randint(2000, 6000),
            completion if completion is not None else rng.randint(200, 1200),
            content if content is not None else f"{key.name} on {item.id}: step {self.sequence}, {rng.getrandbits(32):08x}",
        )  # fmt: skip
        self.events.append(event)
        return event

    # -- human time -------------------------------------------------------------------------------

    def sessions(self, start: datetime, count: int, profile: Profile) -> list[datetime]:
        """`count` request times from `start` on: sessions in the profile's working hours, jittered."""
        rng = self.rng
        times: list[datetime] = []
        day = datetime(start.year, start.month, start.day)
        while len(times) < count:
            if profile.weekends or day.weekday() < 5:
                low, high = profile.hours
                starts = sorted(rng.uniform(low, high - 0.5) for _ in range(rng.randint(*profile.sessions)))
                moment = day
                for hour in starts:
                    moment = max(moment + timedelta(minutes=20), day + timedelta(hours=hour))
                    for _ in range(rng.randint(*profile.size)):
                        if moment >= start:
                            times.append(moment)
                        moment += timedelta(seconds=min(rng.lognormvariate(3.3, 1.0), 900))
                        if len(times) == count:
                            return times
            day += timedelta(days=1)
        return times

    def work(self, key: Key, profile: Profile, start: datetime, stop: datetime, *, follow_ups: int = 2) -> list[Item]:
        """Items one after another from `start` until `stop`: each created, worked on, completed."""
        rng = self.rng
        done: list[Item] = []
        cursor = start
        n = 0
        while cursor < stop:
            n += 1
            item = self.item(f"{key.team.upper()}-{key.name.upper()}-{n}", key.team, key, cursor)
            times = self.sessions(cursor + timedelta(minutes=5), rng.randint(30, 90), profile)
            helpers = [h for h in self.helpers[key.team] if h is not key]
            for ts in times:
                worker = rng.choice(helpers) if helpers and rng.random() < 0.1 else key
                self.event(item, ts, worker)
            pause = rng.uniform(*profile.pause)
            finished = times[-1] + timedelta(hours=pause * rng.uniform(0.3, 0.7))
            if finished >= END:
                self.step(item, times[0], "in_progress")  # still being worked on
                break
            self.step(item, finished, "done")
            done.append(item)
            cursor = times[-1] + timedelta(hours=pause)
        for item in rng.sample(done, min(follow_ups, len(done))):  # a question or two after it was done
            after = item.completed_at
            assert after is not None
            self.event(item, after + timedelta(minutes=10), key)  # within the grace period
            for _ in range(rng.randint(1, 2)):
                self.event(item, after + timedelta(hours=rng.uniform(2, 48)), key)
        return done

    # -- the organisation -------------------------------------------------------------------------

    def honest_people(self) -> None:
        web = [("honest-web-0", HEAVY), ("honest-web-1", HUMAN), ("honest-web-3", LATE), ("honest-web-4", HEAVY)]
        data = [("honest-data-0", HUMAN), ("honest-data-1", NIGHT), ("honest-data-2", HUMAN)]
        people = [(self.key(name, "web", helper=True), profile) for name, profile in web]
        people += [(self.key(name, "data", helper=True), profile) for name, profile in data]
        for key, profile in people:
            self.work(key, profile, T0 + timedelta(hours=self.rng.uniform(8, 40)), END)
        # A retry: the same prompt five times in a row.
        retrier = self.keys["honest-web-1"]
        item = next(i for i in self.items.values() if i.owner is retrier and i.completed_at and SINCE < i.completed_at < UNTIL)
        first = next(e.ts for e in self.events if e.item == item.id and e.key is retrier)
        for n in range(5):
            self.event(item, first + timedelta(seconds=20 + 15 * n), retrier, content=ARM64_QUESTION)
        # Two crunch days: working from 07:00 until past 23:00 (17 hours of the day), then done.
        late = self.keys["honest-web-3"]
        crunch = self.item("WEB-CRUNCH-1", "web", late, SINCE + timedelta(days=8, hours=6))
        moment = crunch.created_at
        for day in (SINCE + timedelta(days=8), SINCE + timedelta(days=9)):
            for hour in range(7, 24):
                moment = day + timedelta(hours=hour + self.rng.uniform(0, 0.5))
                for _ in range(self.rng.randint(1, 3)):
                    self.event(crunch, moment, late)
                    moment += timedelta(seconds=min(self.rng.lognormvariate(3.3, 1.0), 300))
        self.step(crunch, moment + timedelta(hours=1), "done")
        # A little spend on an item first seen in a request (unverified).
        small = self.keys["honest-data-2"]
        auto = self.item("DATA-900", None, small, SINCE + timedelta(days=3), registered="auto")
        for ts in self.sessions(auto.created_at, 40, HUMAN):
            self.event(auto, ts, small)
        # Heavy spend in the period on an item that completes only after it.
        slow = self.key("honest-data-5", "data")
        epic = self.item("DATA-EPIC-1", "data", slow, SINCE + timedelta(days=1))
        self.step(epic, epic.created_at + timedelta(hours=2), "in_progress")
        for ts in self.sessions(epic.created_at + timedelta(hours=3), 700, HEAVY):
            if ts < UNTIL:
                self.event(epic, ts, slow)
        self.step(epic, UNTIL + timedelta(days=3), "done")
        # A service key: the same prompt every 30 minutes, around the clock, on its own item.
        bot = self.key("ci-bot", "web", role="service")
        ci = self.item("WEB-CI", "web", bot, SINCE - timedelta(days=1))
        self.step(ci, ci.created_at + timedelta(hours=1), "in_progress")
        moment = SINCE
        while moment < UNTIL:
            self.event(
                ci,
                moment + timedelta(seconds=self.rng.randint(0, 5)),
                bot,
                prompt=300,
                completion=40,
                content="review the nightly diff",
            )
            moment += timedelta(minutes=30)

    def looper(self) -> None:
        key = self.key("looper", "web")
        self.work(key, HUMAN, T0 + timedelta(hours=9), END, follow_ups=0)
        item = self.item("WEB-LOOP-1", "web", key, SINCE + timedelta(days=1, hours=8))
        times = self.sessions(item.created_at + timedelta(hours=1), 40, HUMAN)
        for ts in times:
            self.event(item, ts, key)
        runs = [
            SINCE + timedelta(days=1, hours=10),
            SINCE + timedelta(days=1, hours=15),
            SINCE + timedelta(days=2, hours=11),
            SINCE + timedelta(days=2, hours=16),
        ]
        for start in runs:  # launched four times: 30 requests a run, 2–4 s apart
            moment = start
            for _ in range(LOOP_REQUESTS // len(runs)):
                self.event(item, moment, key, prompt=500, completion=100, content="write more unit tests for utils.py")
                moment += timedelta(seconds=self.rng.randint(2, 4))
        # Once, the question honest-web-1 retries: another key's repeat is not the looper's.
        self.event(item, runs[0] - timedelta(minutes=5), key, content=ARM64_QUESTION)
        self.step(item, max(times[-1], moment) + timedelta(hours=2), "done")

    def closer(self) -> None:
        key = self.key("closer", "web")
        self.work(key, HUMAN, T0 + timedelta(hours=10), END, follow_ups=0)
        for n, status in enumerate(["done", "done", "closed"], start=1):
            item = self.item(f"WEB-CLOSE-{n}", "web", key, SINCE + timedelta(days=n))
            times = self.sessions(item.created_at + timedelta(hours=1), 40, HUMAN)
            for ts in times:
                self.event(item, ts, key)
            completed = times[-1] + timedelta(hours=1)
            self.step(item, completed, status)
            for _ in range(AFTER_REQUESTS):  # hours to days after it was done
                self.event(item, completed + timedelta(hours=self.rng.uniform(2, 96)), key)

    def spinner(self) -> None:
        key = self.key("spinner", "web")
        self.work(key, HUMAN, T0 + timedelta(hours=9), T0 + timedelta(days=1), follow_ups=0)  # done before the period
        for item_id, closed in (("WEB-SPIN-1", None), ("WEB-SPIN-2", SINCE + timedelta(days=13))):
            item = self.item(item_id, "web", key, SINCE + timedelta(days=1))
            self.step(item, item.created_at + timedelta(hours=1), "in_progress")
            for ts in self.sessions(item.created_at + timedelta(hours=2), 300, HUMAN):
                if closed is None or ts < closed:
                    self.event(item, ts, key)
            if closed is not None:
                self.step(item, closed, "closed")

    def shielder(self) -> None:
        key = self.key("shielder", "web")
        item = self.item("WEB-SHIELD-1", "web", key, SINCE + timedelta(days=1))
        self.step(item, item.created_at + timedelta(hours=1), "in_progress")
        for ts in self.sessions(item.created_at + timedelta(hours=2), 600, HUMAN):
            self.event(item, ts, key)
        tiny = self.item("WEB-SHIELD-2", "web", key, SINCE + timedelta(days=9, hours=10))
        self.event(tiny, tiny.created_at + timedelta(hours=2), key, prompt=40, completion=20)
        self.step(tiny, tiny.created_at + timedelta(hours=5), "done")

    def cron(self) -> None:
        key = self.key("cron", "data")
        item = self.item("DATA-NIGHTLY-1", "data", key, SINCE)
        self.step(item, SINCE + timedelta(hours=1), "in_progress")
        start = SINCE + timedelta(days=2)
        for n in range(CRON_DAYS * 96):
            ts = start + timedelta(seconds=900 * n + self.rng.randint(0, 6))
            self.event(item, ts, key, prompt=300, completion=50, content=f"summarise the error log of {ts.isoformat()}")

    def unverif(self) -> None:
        key = self.key("unverif", "data")
        real = self.item("DATA-REAL-1", "data", key, SINCE + timedelta(days=2))
        times = self.sessions(real.created_at + timedelta(hours=1), 40, HUMAN)
        for ts in times:
            self.event(real, ts, key)
        self.step(real, times[-1] + timedelta(hours=2), "done")
        for n, registered in enumerate(["auto", "auto", "auto", "none"], start=1):
            item = self.item(f"DATA-{700 + n}", None, key, SINCE + timedelta(days=3 + n), registered=registered)
            for ts in self.sessions(item.created_at, 45, HUMAN):
                if ts < UNTIL:
                    self.event(item, ts, key)

    def outlier(self) -> None:
        key = self.key("outlier", "web")
        self.work(key, HUMAN, T0 + timedelta(hours=11), END, follow_ups=0)
        item = self.item("WEB-HUGE-1", "web", key, SINCE + timedelta(days=5))
        times = self.sessions(item.created_at + timedelta(hours=1), 100, HUMAN)
        completed = times[-1] + timedelta(hours=3)
        assert completed < UNTIL
        # The team's median cost per completed item, this item (the most expensive) included.
        costs = [
            self.item_cost(i)
            for i in self.items.values()
            if i.team == "web"
            and i is not item
            and i.status == "done"
            and i.completed_at is not None
            and SINCE <= i.completed_at < UNTIL
        ]
        costs.append(float("inf"))
        costs.sort()
        middle = len(costs) // 2
        median = costs[middle] if len(costs) % 2 else (costs[middle - 1] + costs[middle]) / 2
        per_request = OUTLIER_FACTOR * median / len(times)
        completion = 1000
        prompt = round((per_request - completion * PRICE.output) / PRICE.input)
        for ts in times:
            self.event(item, ts, key, prompt=prompt, completion=completion)
        self.step(item, completed, "done")
        self.outlier_median = median

    def quick(self) -> None:
        key = self.key("quick", "ops")
        for n in range(QUICK_ITEMS):
            opened = SINCE + timedelta(days=2 + n, hours=10, minutes=self.rng.uniform(0, 30))
            item = self.item(f"OPS-QUICK-{n + 1}", "ops", key, opened)
            for k in range(3):
                self.event(item, opened + timedelta(seconds=20 + 40 * k), key)
            self.step(item, opened + timedelta(minutes=4), "done")
        ordinary = self.item("OPS-REAL-1", "ops", key, SINCE + timedelta(days=1))
        for ts in self.sessions(ordinary.created_at + timedelta(hours=1), 3, HUMAN):  # costs as much as a quick one: no cost outlier
            self.event(ordinary, ts, key)
        self.step(ordinary, ordinary.created_at + timedelta(days=2), "done")

    def tagger(self) -> None:
        key = self.key("tagger", "ops")
        for n in range(TAGGED_ITEMS):
            opened = SINCE + timedelta(days=1 + 2 * n, hours=9, minutes=self.rng.uniform(0, 30))
            item = self.item(f"OPS-TAGGED-{n + 1}", "ops", key, opened)
            done = opened + timedelta(days=1, hours=self.rng.uniform(2, 6))
            tagged = done - (timedelta(minutes=3) if n < TAGGED_ITEMS // 2 else timedelta(hours=2))  # the later half escapes the minutes
            self.event(item, tagged, key, prompt=self.rng.randint(20, 60), completion=self.rng.randint(10, 40))
            self.step(item, done, "done")
        ordinary = self.item("OPS-TAGGER-REAL-1", "ops", key, SINCE + timedelta(days=3))
        for ts in self.sessions(ordinary.created_at + timedelta(hours=1), 3, HUMAN):
            self.event(ordinary, ts, key)
        self.step(ordinary, ordinary.created_at + timedelta(days=2), "done")

    def sized(self, item: Item, lines: int) -> None:
        """The size a tracker would report for a pull request (added + deleted lines)."""
        assert item.completed_at is not None
        added = lines * 3 // 4
        registry.record_size(self.engine, item.id, Size(lines_added=added, lines_deleted=lines - added), source="github", at=item.completed_at)
        item.lines = lines

    def mobile(self) -> None:
        honest = self.key("honest-mobile-0", "mobile", helper=True)
        splitter = self.key("splitter", "mobile")
        for key in (honest, splitter):
            for item in self.work(key, HUMAN, T0 + timedelta(hours=self.rng.uniform(8, 40)), END, follow_ups=0):
                self.sized(item, self.rng.randint(150, 400))
        finished = SINCE + timedelta(days=10, hours=10)
        for n in range(SPLIT_ITEMS):
            item = self.item(f"MOBILE-SPLIT-{n + 1}", "mobile", splitter, finished - timedelta(hours=1))
            for k in range(3):
                self.event(item, item.created_at + timedelta(minutes=5 + 10 * k), splitter)
            self.step(item, finished, "done")
            self.sized(item, self.rng.randint(30, 50))
            finished += timedelta(minutes=self.rng.uniform(30, 70))

    def item_cost(self, item: Item) -> float:
        return sum(e.cost for e in self.events if e.item == item.id)


def generate(engine: Engine, spool_path: Path, *, seed: int = 20260302) -> Org:
    """Write the organisation into `engine` (schema already created) and return its records."""
    builder = _Builder(engine, random.Random(seed))
    builder.honest_people()
    builder.looper()
    builder.closer()
    builder.spinner()
    builder.shielder()
    builder.cron()
    builder.unverif()
    builder.quick()
    builder.tagger()
    builder.mobile()
    builder.outlier()  # last: it needs the team's other items

    counter = TokenCounter()
    exchanges = (
        past_request(
            id=event.id, ts=event.ts, key=event.key, work_item=event.item, model=MODEL, body=event.body,
            prompt_tokens=event.prompt, completion_tokens=event.completion, counter=counter, price=PRICE,
            auto_registered_at=builder.items[event.item].created_at if builder.items[event.item].registered == "auto" else None,
            user_agent="signals-org", latency_ms=900.0,
        )
        for event in builder.events
    )  # fmt: skip
    write_all(engine, spool_path, exchanges, expected=len(builder.events))
    return Org(builder.keys, builder.items, builder.events)
