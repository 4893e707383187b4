"""Gaming signals (DESIGN §9) on a generated organisation with planted patterns and honest people.

The organisation (tests/signals_org.py) is written through the real paths and kept as plain records.
Every planted pattern must be flagged — the right kind, the right key, evidence equal to what was
planted (computed here from the records, never with the report module's helpers or SQL) — and no
honest person may be flagged: heavy but productive users, people who retry a prompt, ask a question
after an item was done, work late or at night, or spend a little on an unverified item.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import statistics
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ADMIN_KEY, BOTH_DATABASES, PROVIDER_URL, in_process, make_settings, postgres_schema, start_proxy, wait_until
from taskproxy.upstream.mock import MockProvider
from test_rollup import event as raw_event
from signals_org import (
    TAGGED_ITEMS,
    ARM64_QUESTION,
    AFTER_REQUESTS,
    CRON_DAYS,
    END,
    LOOP_REQUESTS,
    OUTLIER_FACTOR,
    PLANTED,
    QUICK_ITEMS,
    SPLIT_ITEMS,
    SINCE,
    T0,
    UNTIL,
    Event,
    Org,
    generate,
)

from taskproxy import registry
from taskproxy.app import create_app
from taskproxy.guard.auth import issue_key
from taskproxy.errors import ConfigError
from taskproxy.config import settings_from_mapping
from taskproxy.reports.signals import KINDS, SignalSettings, gaming_signals, signals_text
from taskproxy.storage import repo, rollup
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.timeutil import iso

DEFAULTS = SignalSettings()
GRACE = timedelta(hours=DEFAULTS.after_completion_grace_hours)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Org, Path]]:
    folder = tmp_path_factory.mktemp("signals")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_schema()) if request.param == "postgres" else f"sqlite:///{folder / 'taskproxy.db'}"
        engine = make_engine(url)
        upgrade_schema(engine)
        org = generate(engine, folder / "spool.jsonl")
        yield engine, org, folder
        engine.dispose()


# -- plain computations on the records ----------------------------------------------------------------


def in_period(ts: datetime | None, since: datetime = SINCE, until: datetime = UNTIL) -> bool:
    return ts is not None and since <= ts < until


def window(org: Org, name: str) -> list[Event]:
    return [e for e in org.events_of(name) if in_period(e.ts)]


def spend(events: list[Event]) -> float:
    return sum(e.cost for e in events)


def hash_of(event: Event) -> str:
    """The prompt hash, computed here: sha256 of the prompt fields as compact JSON with sorted keys."""
    prompt = {"messages": event.body["messages"]}
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def after_completion(org: Org, name: str, grace: timedelta = GRACE, since: datetime = SINCE, until: datetime = UNTIL) -> list[Event]:
    found = []
    for event in (e for e in org.events_of(name) if in_period(e.ts, since, until)):
        item = org.items[event.item]
        if item.completed_at is not None and event.ts > item.completed_at + grace:
            found.append(event)
    return found


def hours_per_day(events: list[Event]) -> dict[Any, set[int]]:
    days: dict[Any, set[int]] = defaultdict(set)
    for event in events:
        days[event.ts.date()].add(event.ts.hour)
    return days


def item_costs(org: Org, team: str) -> dict[str, float]:
    """Cost per completed item (all its spend ever) of the team's items completed in the period."""
    costs: dict[str, float] = defaultdict(float)
    done = {i.id for i in org.items.values() if i.team == team and i.status == "done" and in_period(i.completed_at)}
    for event in org.events:
        if event.item in done:
            costs[event.item] += event.cost
    return dict(costs)


def period_item_costs(org: Org, team: str) -> dict[str, float]:
    """Cost per completed item in the period (what `trivial_completions` holds an item against) of the team's items completed in it."""
    costs: dict[str, float] = defaultdict(float)
    done = {i.id for i in org.items.values() if i.team == team and i.status == "done" and in_period(i.completed_at)}
    for event in org.events:
        if event.item in done and in_period(event.ts):
            costs[event.item] += event.cost
    return {i: c for i, c in costs.items() if c > 0}


def flagged(report: dict[str, Any], org: Org) -> list[tuple[str, str]]:
    names = {k.id: n for n, k in org.keys.items()}
    return [(s["kind"], names.get(s["key_id"], s["key_id"])) for s in report["signals"]]


def signal(report: dict[str, Any], org: Org, kind: str, name: str) -> dict[str, Any]:
    key_id = org.keys[name].id
    return next(s for s in report["signals"] if s["kind"] == kind and s["key_id"] == key_id)


def expected_order(org: Org, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(pairs, key=lambda pair: (KINDS.index(pair[0]), org.keys[pair[1]].id))


def span(events: list[Event]) -> dict[str, str | None]:
    return {"first": iso(min(e.ts for e in events)), "last": iso(max(e.ts for e in events))}


# -- the organisation -----------------------------------------------------------------------------------


def test_the_organisation_is_what_the_tests_need(world: tuple[Any, Org, Path]) -> None:
    _, org, _ = world
    honest = [n for n in org.keys if n not in PLANTED]
    assert len(org.events) > 8000 and len(honest) >= 9
    # Honest heavy users: well over the heavy-spend threshold, with items that complete.
    heavy = [n for n in honest if spend(window(org, n)) >= 2 * DEFAULTS.heavy_spend_min_usd]
    assert {"honest-web-0", "honest-web-4"} <= set(heavy)
    for name in heavy:
        assert any(org.items[e.item].status == "done" and in_period(org.items[e.item].completed_at) for e in window(org, name))
    # ... and one whose only item in the period completes after it.
    epic = org.items["DATA-EPIC-1"]
    assert spend(window(org, "honest-data-5")) >= DEFAULTS.heavy_spend_min_usd
    assert epic.completed_at is not None and epic.completed_at >= UNTIL
    # Human cadence: business hours, late evenings, nights — never around the clock.
    most_hours = {n: max(len(h) for h in hours_per_day(window(org, n)).values()) for n in honest if n != "ci-bot"}
    assert 16 <= max(most_hours.values()) < DEFAULTS.around_clock_min_hours, most_hours
    assert {e.ts.hour for e in window(org, "honest-data-1")} >= {23, 0, 5}  # works at night, UTC
    # A few retries of one prompt, a few questions after an item was done (some within the grace period).
    repeats: dict[str, int] = defaultdict(int)
    for event in window(org, "honest-web-1"):
        repeats[hash_of(event)] += 1
    assert max(repeats.values()) == 5
    for name in honest:
        assert len(after_completion(org, name)) < DEFAULTS.after_completion_min_requests
    assert (
        sum(len(after_completion(org, n, timedelta(0))) for n in honest) > sum(len(after_completion(org, n)) for n in honest) > 0
    )
    # A little spend on an unverified item.
    data2 = window(org, "honest-data-2")
    assert 0 < spend([e for e in data2 if org.items[e.item].status == "unverified"]) < 0.3 * spend(data2)
    # The service key: one prompt every 30 minutes around the clock.
    bot = window(org, "ci-bot")
    assert len(bot) == 21 * 48 and len({hash_of(e) for e in bot}) == 1
    # Honest items stay well within their team's costs.
    for team in ("web", "data"):
        costs = item_costs(org, team)
        median = statistics.median(costs.values())
        assert sum(1 for c in costs.values() if c >= DEFAULTS.cost_min_ratio * median) == (1 if team == "web" else 0)


# -- the signals ----------------------------------------------------------------------------------------


def test_every_planted_pattern_is_flagged_and_no_honest_person_is(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    report = gaming_signals(engine, since=SINCE, until=UNTIL)
    assert flagged(report, org) == expected_order(org, [(kind, name) for name, kind in PLANTED.items()])
    assert report["since"] == iso(SINCE) and report["until"] == iso(UNTIL)
    assert report["thresholds"] == {name: getattr(DEFAULTS, name) for name in report["thresholds"]}
    for entry in report["signals"]:
        key = next(k for k in org.keys.values() if k.id == entry["key_id"])
        assert (entry["owner"], entry["team"], entry["role"]) == (key.owner, key.team, "developer")


def test_repeated_prompt_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "repeated_prompt", "looper")
    events = window(org, "looper")
    loop = [e for e in events if e.content == "write more unit tests for utils.py"]
    assert len(loop) == LOOP_REQUESTS and len({hash_of(e) for e in loop}) == 1
    evidence = found["evidence"]
    assert evidence == {
        "requests": len(events),
        "repeated_prompts": 1,
        "repeated_requests": LOOP_REQUESTS,
        "cost_usd": pytest.approx(spend(loop)),
        "items": 1,
        **span(loop),
        "prompts": [
            {"prompt_hash": hash_of(loop[0]), "requests": LOOP_REQUESTS, "cost_usd": pytest.approx(spend(loop)), **span(loop)}
        ],
    }
    assert found["work_items"] == [
        {"id": "WEB-LOOP-1", "status": "done", "requests": LOOP_REQUESTS, "cost_usd": pytest.approx(spend(loop))}
    ]
    # Down to five requests, the honest retry is a repeat too; the looper asked that question once,
    # which is not a repeat of its own.
    assert sum(e.content == ARM64_QUESTION for e in events) == 1
    lowered = gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=DEFAULTS.model_copy(update={"repeated_prompt_min_requests": 5}))
    assert signal(lowered, org, "repeated_prompt", "looper") == found
    retried = signal(lowered, org, "repeated_prompt", "honest-web-1")["evidence"]
    assert (retried["repeated_prompts"], retried["repeated_requests"], retried["items"]) == (1, 5, 1)


def test_spend_after_completion_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "spend_after_completion", "closer")
    after = after_completion(org, "closer")
    assert len(after) == 3 * AFTER_REQUESTS and {e.item for e in after} == {"WEB-CLOSE-1", "WEB-CLOSE-2", "WEB-CLOSE-3"}
    assert found["evidence"] == {
        "requests": 3 * AFTER_REQUESTS, "cost_usd": pytest.approx(spend(after)), "tokens": sum(e.prompt + e.completion for e in after),
        "items": 3, **span(after),
    }  # fmt: skip
    expected = []
    for n, status in enumerate(["done", "done", "closed"], start=1):
        item = org.items[f"WEB-CLOSE-{n}"]
        mine = [e for e in after if e.item == item.id]
        expected.append({"id": item.id, "status": status, "requests": AFTER_REQUESTS, "cost_usd": pytest.approx(spend(mine)),
                         "completed_at": iso(item.completed_at), **span(mine)})  # fmt: skip
    assert found["work_items"] == expected


def test_spend_without_completion_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "spend_without_completion", "spinner")
    events = window(org, "spinner")
    assert {e.item for e in events} == {"WEB-SPIN-1", "WEB-SPIN-2"} and spend(events) >= DEFAULTS.heavy_spend_min_usd
    assert found["evidence"] == {
        "requests": len(events), "cost_usd": pytest.approx(spend(events)), "tokens": sum(e.prompt + e.completion for e in events),
        "items": 2, **span(events), "items_by_status": {"closed": 1, "in_progress": 1}, "completed_items": 0, "completed_cost_usd": 0.0, "carried_tickets": 0,
    }  # fmt: skip
    assert [(w["id"], w["status"], w["requests"]) for w in found["work_items"]] == [
        ("WEB-SPIN-1", "in_progress", sum(e.item == "WEB-SPIN-1" for e in events)),
        ("WEB-SPIN-2", "closed", sum(e.item == "WEB-SPIN-2" for e in events)),
    ]


def test_spend_without_completion_is_not_shielded_by_one_cheap_completed_item(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "spend_without_completion", "shielder")
    events = window(org, "shielder")
    tiny = [e for e in events if e.item == "WEB-SHIELD-2"]
    assert len(tiny) == 1 and spend(events) >= DEFAULTS.heavy_spend_min_usd
    evidence = found["evidence"]
    assert (evidence["completed_items"], evidence["items_by_status"]) == (1, {"done": 1, "in_progress": 1})
    assert evidence["completed_cost_usd"] == pytest.approx(spend(tiny)) and spend(tiny) < 0.01 * spend(events)


def test_machine_cadence_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "machine_cadence", "cron")
    events = sorted(window(org, "cron"), key=lambda e: e.ts)
    gaps = [(b.ts - a.ts).total_seconds() for a, b in itertools.pairwise(events)]
    assert len(events) == CRON_DAYS * 96
    evidence = found["evidence"]
    assert evidence == {
        "requests": CRON_DAYS * 96,
        **span(events),
        "interval_mean_seconds": pytest.approx(statistics.fmean(gaps), abs=1e-3),
        "interval_median_seconds": pytest.approx(statistics.median(gaps), abs=1e-3),
        "interval_cv": pytest.approx(statistics.pstdev(gaps) / statistics.fmean(gaps), abs=1e-6),
        "distinct_hours": 24,
        "around_the_clock_days": CRON_DAYS,
        "reasons": ["regular_intervals", "around_the_clock"],
    }
    assert evidence["interval_cv"] < 0.01
    assert [w["id"] for w in found["work_items"]] == ["DATA-NIGHTLY-1"]


def test_cost_outlier_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "cost_outlier", "outlier")
    costs = item_costs(org, "web")
    median = statistics.median(costs.values())
    mad = statistics.median(abs(c - median) for c in costs.values())
    cost = costs["WEB-HUGE-1"]
    mine = [e for e in org.events if e.item == "WEB-HUGE-1"]
    assert all(e.key is org.keys["outlier"] for e in mine)
    assert cost / median == pytest.approx(OUTLIER_FACTOR, rel=1e-4)
    assert found["evidence"] == {"items": 1, "requests": len(mine), "cost_usd": pytest.approx(cost), **span(mine)}
    item = org.items["WEB-HUGE-1"]
    assert found["work_items"] == [{
        "id": "WEB-HUGE-1", "status": "done", "requests": len(mine), "cost_usd": pytest.approx(cost),
        "completed_at": iso(item.completed_at), "item_cost_usd": pytest.approx(cost), "team": "web", "team_items": len(costs),
        "team_median_usd": pytest.approx(median), "team_mad_usd": pytest.approx(mad),
        "robust_z": pytest.approx(0.6745 * (cost - median) / mad, abs=1e-3), "ratio_to_median": pytest.approx(OUTLIER_FACTOR, rel=1e-4),
        "key_cost_usd": pytest.approx(cost), "key_share": 1.0, "carried_tickets": [], **span(mine),
    }]  # fmt: skip


def test_unverified_spend_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "unverified_spend", "unverif")
    events = window(org, "unverif")
    unverified = [e for e in events if org.items[e.item].status in ("unverified", "unknown")]
    share = spend(unverified) / spend(events)
    assert share >= DEFAULTS.unverified_min_share
    assert found["evidence"] == {
        "cost_usd": pytest.approx(spend(events)), "unverified_cost_usd": pytest.approx(spend(unverified)), "carried_cost_usd": 0.0,
        "share": pytest.approx(share, abs=1e-6), "requests": len(unverified), "items": 4, **span(unverified),
    }  # fmt: skip
    assert [(w["id"], w["status"]) for w in found["work_items"]] == [
        ("DATA-701", "unverified"), ("DATA-702", "unverified"), ("DATA-703", "unverified"), ("DATA-704", "unknown")
    ]  # fmt: skip


def test_split_work_sees_items_whose_tracker_gave_no_team_through_their_projects_team(world: tuple[Any, Org, Path]) -> None:
    """Trackers give items no team; the signal took its team medians from the items' own teams and
    so never fired on items that came from a tracker. `work_items.teams` gives them their project's."""
    from sqlalchemy import update

    from taskproxy.storage.models import WorkItem
    from taskproxy.workitems import project_of

    engine, org, _ = world
    items = WorkItem.__table__
    mobile = items.c.id.like("MOBILE-%")
    assert {i.team for i in org.items.values() if i.id.startswith("MOBILE-")} == {"mobile"}
    with engine.begin() as connection:  # as a tracker delivers them: no team
        assert connection.execute(update(items).where(mobile).values(team=None)).rowcount > 0
    try:
        def splitters(**options: Any) -> set[str]:
            return {s["key_id"] for s in gaming_signals(engine, since=SINCE, until=UNTIL, **options)["signals"] if s["kind"] == "split_work"}

        assert splitters() == set()  # no team, no median to be small against
        projects = {project_of(i.id): "mobile" for i in org.items.values() if i.id.startswith("MOBILE-")}  # (this world's ids: MOBILE-<KEY>-n)
        assert splitters(item_teams=projects) == {org.keys["splitter"].id}
    finally:
        with engine.begin() as connection:
            connection.execute(update(items).where(mobile).values(team="mobile"))


# -- thresholds, periods, order -------------------------------------------------------------------------


def test_split_work_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "split_work", "splitter")
    sized = [i.lines for i in org.items.values() if i.team == "mobile" and i.lines is not None and i.status == "done" and in_period(i.completed_at)]
    median = statistics.median(sized)
    burst = sorted((i for i in org.items.values() if i.id.startswith("MOBILE-SPLIT-")), key=lambda i: i.completed_at)  # type: ignore[arg-type,return-value]
    assert len(burst) == SPLIT_ITEMS and all(i.lines <= 0.5 * median for i in burst)  # type: ignore[operator]
    [evidence] = found["evidence"]["bursts"]
    assert evidence == {"team": "mobile", "items": SPLIT_ITEMS, "combined_lines": sum(i.lines for i in burst), "team_median_lines": round(median, 1),  # type: ignore[misc]
                        "first_completed": iso(burst[0].completed_at), "last_completed": iso(burst[-1].completed_at)}  # fmt: skip
    assert [w["id"] for w in found["work_items"]] == sorted(i.id for i in burst)
    assert found["evidence"]["requests"] == 3 * SPLIT_ITEMS


@pytest.mark.parametrize("seed", [7, 1234])
def test_other_seeds_flag_the_planted_patterns_and_no_honest_person(seed: int, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'taskproxy.db'}")
    upgrade_schema(engine)
    org = generate(engine, tmp_path / "spool.jsonl", seed=seed)
    report = gaming_signals(engine, since=SINCE, until=UNTIL)
    assert flagged(report, org) == expected_order(org, [(kind, name) for name, kind in PLANTED.items()])
    engine.dispose()


def test_trivial_completions_evidence(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "trivial_completions", "quick")
    events = window(org, "quick")
    completed = {e.item for e in events if org.items[e.item].status == "done" and in_period(org.items[e.item].completed_at)}
    trivial = {i for i in completed if org.items[i].completed_at - org.items[i].created_at <= timedelta(minutes=10)}  # type: ignore[operator]
    assert len(completed) == QUICK_ITEMS + 1 and len(trivial) == QUICK_ITEMS
    evidence = found["evidence"]
    assert (evidence["completed_items"], evidence["trivial_items"], evidence["quick_items"], evidence["small_items"]) == (QUICK_ITEMS + 1, QUICK_ITEMS, QUICK_ITEMS, 0)
    assert evidence["share"] == round(QUICK_ITEMS / (QUICK_ITEMS + 1), 3)
    on_trivial = [e for e in events if e.item in trivial]
    assert evidence["requests"] == len(on_trivial) == 3 * QUICK_ITEMS
    assert evidence["cost_usd"] == pytest.approx(spend(on_trivial), abs=1e-9)
    assert [w["id"] for w in found["work_items"]] == sorted(trivial)
    assert all(w["minutes_to_complete"] == 4.0 and w["changed_lines"] is None for w in found["work_items"])


def test_trivial_completions_see_tickets_done_by_hand_and_tagged_with_one_request(world: tuple[Any, Org, Path]) -> None:
    """Opened a day or more before they were done, so quick only from the key's first request on them;
    and a tag sent two hours before escapes the minutes (half of them): each is light, one request of
    under 100 tokens in all (three quick items alone are under `trivial_min_items`)."""
    engine, org, _ = world
    found = signal(gaming_signals(engine, since=SINCE, until=UNTIL), org, "trivial_completions", "tagger")
    evidence = found["evidence"]
    assert (evidence["completed_items"], evidence["trivial_items"], evidence["quick_items"], evidence["light_items"]) == (
        TAGGED_ITEMS + 1, TAGGED_ITEMS, TAGGED_ITEMS // 2, TAGGED_ITEMS)
    assert evidence["requests"] == TAGGED_ITEMS
    assert [w["id"] for w in found["work_items"]] == [f"OPS-TAGGED-{n + 1}" for n in range(TAGGED_ITEMS)]
    assert [w["tokens"] for w in found["work_items"]] == [sum(e.prompt + e.completion for e in org.events if e.item == w["id"]) for w in found["work_items"]]
    assert [w["minutes_from_first_request"] for w in found["work_items"]] == [3.0] * (TAGGED_ITEMS // 2) + [120.0] * (TAGGED_ITEMS // 2)
    assert all(w["minutes_to_complete"] > 24 * 60 for w in found["work_items"])
    # Light by cost too: each tag is under 1 % of what the team's other items completed in the period cost there.
    others = [c for i, c in period_item_costs(org, "ops").items() if org.items[i].owner is not org.keys["tagger"]]
    assert len(others) >= DEFAULTS.cost_min_items
    assert [w["typical_cost_usd"] for w in found["work_items"]] == [pytest.approx(statistics.median(others), abs=1e-9)] * TAGGED_ITEMS
    assert [w["item_cost_usd"] for w in found["work_items"]] == [pytest.approx(spend([e for e in org.events if e.item == w["id"]]), abs=1e-9)
                                                                  for w in found["work_items"]]  # fmt: skip
    assert max(w["item_cost_usd"] for w in found["work_items"]) <= DEFAULTS.trivial_max_cost_share * statistics.median(others)


def test_each_threshold_moves_its_signal(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world

    def kinds_of(**changes: Any) -> list[tuple[str, str]]:
        return flagged(gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=DEFAULTS.model_copy(update=changes)), org)

    planted = [(kind, name) for name, kind in PLANTED.items()]

    def without(kind: str, name: str | None = None) -> list[tuple[str, str]]:
        return expected_order(org, [p for p in planted if p[0] != kind or name is not None and p[1] != name])

    assert kinds_of(repeated_prompt_min_requests=LOOP_REQUESTS + 1) == without("repeated_prompt")
    # Lowered to 5, the honest retry is flagged too: a false positive the docs warn about.
    assert kinds_of(repeated_prompt_min_requests=5) == expected_order(org, [*planted, ("repeated_prompt", "honest-web-1")])
    assert kinds_of(after_completion_min_requests=3 * AFTER_REQUESTS + 1) == without("spend_after_completion")
    heavy = max(spend(window(org, "spinner")), spend(window(org, "shielder")))
    assert kinds_of(heavy_spend_min_usd=heavy + 0.01) == without("spend_without_completion")
    assert kinds_of(heavy_spend_max_completed_share=0.0) == without("spend_without_completion", "shielder")  # any completion shields
    assert kinds_of(cadence_max_cv=0.001, around_clock_min_days=CRON_DAYS + 1) == without("machine_cadence")
    assert kinds_of(cost_min_ratio=OUTLIER_FACTOR + 1) == without("cost_outlier")
    assert kinds_of(cost_min_items=len(item_costs(org, "web")) + 1) == without("cost_outlier")
    share = spend([e for e in window(org, "unverif") if org.items[e.item].status in ("unverified", "unknown")]) / spend(
        window(org, "unverif")
    )
    assert kinds_of(unverified_min_share=share + 0.001) == without("unverified_spend")
    assert kinds_of(split_min_items=SPLIT_ITEMS + 1) == without("split_work")
    assert kinds_of(split_window_hours=0.4) == without("split_work")  # the burst's completions are 30-70 minutes apart
    assert kinds_of(trivial_min_items=QUICK_ITEMS + 1) == without("trivial_completions")
    assert kinds_of(trivial_max_minutes=3.5) == without("trivial_completions", "quick")  # its items took 4 minutes; the tagger's 3 from its request
    assert kinds_of(trivial_max_minutes=2) == without("trivial_completions", "quick")  # the tagger's tags are light: still flagged
    # The tags are light twice over: a handful of tokens, and a negligible share of the others' cost per completed item.
    assert kinds_of(trivial_max_minutes=2, trivial_max_tokens=0) == without("trivial_completions", "quick")
    assert kinds_of(trivial_max_minutes=2, trivial_max_cost_share=0) == without("trivial_completions", "quick")
    assert kinds_of(trivial_max_minutes=2, trivial_max_tokens=0, trivial_max_cost_share=0) == without("trivial_completions")
    tags = [sum(e.prompt + e.completion for e in org.events if e.item == f"OPS-TAGGED-{n + 1}") for n in range(TAGGED_ITEMS)]
    assert kinds_of(trivial_max_tokens=max(tags) - 1, trivial_max_cost_share=0) == expected_order(org, planted)  # three quick tags and three light are six
    assert kinds_of(trivial_max_tokens=min(tags) - 1, trivial_max_cost_share=0) == without("trivial_completions", "tagger")  # three quick alone: too few
    typical = statistics.median(c for i, c in period_item_costs(org, "ops").items() if org.items[i].owner is not org.keys["tagger"])
    tag_costs = [spend([e for e in org.events if e.item == f"OPS-TAGGED-{n + 1}"]) for n in range(TAGGED_ITEMS)]
    assert kinds_of(trivial_max_tokens=0, trivial_max_cost_share=max(tag_costs) / typical * 1.001) == expected_order(org, planted)  # all six light
    assert kinds_of(trivial_max_tokens=0, trivial_max_cost_share=min(tag_costs) / typical * 0.999) == without("trivial_completions", "tagger")  # none
    assert kinds_of(trivial_min_share=QUICK_ITEMS / (QUICK_ITEMS + 1) + 0.001) == without("trivial_completions")

    # Either cadence reason alone flags the cron key.
    regular = signal(
        gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=DEFAULTS.model_copy(update=dict(around_clock_min_days=CRON_DAYS + 1))),
        org,
        "machine_cadence",
        "cron",
    )
    assert regular["evidence"]["reasons"] == ["regular_intervals"]
    clock = signal(
        gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=DEFAULTS.model_copy(update=dict(cadence_max_cv=0.001))),
        org,
        "machine_cadence",
        "cron",
    )
    assert clock["evidence"]["reasons"] == ["around_the_clock"]

    # The service key is declared automation: flagged only when asked for.
    assert kinds_of(flag_service_keys=True) == expected_order(
        org, [*planted, ("repeated_prompt", "ci-bot"), ("machine_cadence", "ci-bot")]
    )


def test_the_grace_period_after_completion(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    honest = [n for n in org.keys if n not in PLANTED]
    # Graces that put the moment the grace ends inside days of work: a key's day on an item is then
    # partly before it and partly after (read from the raw events), or wholly on one side (the rollup).
    for grace_hours in (DEFAULTS.after_completion_grace_hours, 0.0, 0.25, 2.5, 7.0, 30.0):
        t = DEFAULTS.model_copy(update=dict(after_completion_min_requests=1, after_completion_grace_hours=grace_hours))
        report = gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=t)
        counted = {name: len(after_completion(org, name, timedelta(hours=grace_hours))) for name in honest}
        expected = {name: n for name, n in counted.items() if n}
        found = {name: signal(report, org, "spend_after_completion", name)["evidence"]["requests"] for name in expected}
        assert found == expected and len(expected) >= 3
        assert {n for k, n in flagged(report, org) if k == "spend_after_completion"} == {*expected, "closer"}


def test_spend_after_completion_in_the_partial_days_at_a_periods_ends(world: tuple[Any, Org, Path]) -> None:
    """Periods that start and end inside days: those hours have no rollup row of their own and are read
    from the raw events, for any key, on the items done or closed before them."""
    engine, org, _ = world
    honest = [n for n in org.keys if n not in PLANTED]
    t = DEFAULTS.model_copy(update=dict(after_completion_min_requests=1, after_completion_grace_hours=0.0))
    late = next(e for name in honest for e in after_completion(org, name, timedelta(0)) if e.ts.time() != time())
    checked = 0
    for since, until in ((late.ts, late.ts + timedelta(hours=5)),  # the period starts on an event: it counts
                         (SINCE + timedelta(hours=13, minutes=7), UNTIL - timedelta(hours=6, minutes=41)),
                         (SINCE + timedelta(days=3, hours=9), SINCE + timedelta(days=3, hours=17)),  # inside one day
                         (SINCE - timedelta(hours=2), UNTIL + timedelta(days=2, hours=11, seconds=1))):  # fmt: skip
        report = gaming_signals(engine, since=since, until=until, thresholds=t)
        counted = {name: len(after_completion(org, name, timedelta(0), since, until)) for name in [*honest, "closer"]}
        expected = {name: n for name, n in counted.items() if n}
        found = {name: signal(report, org, "spend_after_completion", name)["evidence"]["requests"] for name in expected}
        assert found == expected
        assert {n for k, n in flagged(report, org) if k == "spend_after_completion"} == set(expected)
        checked += len(expected)
    assert checked >= 5


def test_periods_are_half_open(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    assert gaming_signals(engine, since=T0, until=SINCE)["signals"] == []  # before anything was planted
    cron = sorted(e.ts for e in window(org, "cron"))
    cut = cron[240]
    report = gaming_signals(engine, since=SINCE, until=cut)
    assert signal(report, org, "machine_cadence", "cron")["evidence"]["requests"] == 240
    assert signal(report, org, "machine_cadence", "cron")["evidence"]["last"] == iso(cron[239])
    later = gaming_signals(engine, since=cut, until=END)
    assert signal(later, org, "machine_cadence", "cron")["evidence"]["requests"] == 240
    with pytest.raises(ValueError):
        gaming_signals(engine, since=UNTIL, until=SINCE)


def test_signals_are_ordered_by_kind_and_key_never_by_spend(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    lax = SignalSettings(
        repeated_prompt_min_requests=2, after_completion_min_requests=1, heavy_spend_min_usd=0.01, cadence_max_cv=100.0,
        around_clock_min_hours=1, around_clock_min_days=1, cost_min_z=0.0, cost_min_ratio=0.0, cost_min_key_share=0.01,
        unverified_min_share=0.01, unverified_min_usd=0.01, flag_service_keys=True,
    )  # fmt: skip
    report = gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=lax)
    order = [(KINDS.index(s["kind"]), s["key_id"]) for s in report["signals"]]
    assert order == sorted(order) and len(order) > 20
    cadence = [s for s in report["signals"] if s["kind"] == "machine_cadence"]
    spends = [spend(window(org, next(n for n, k in org.keys.items() if k.id == s["key_id"]))) for s in cadence]
    assert spends != sorted(spends) and spends != sorted(spends, reverse=True)  # the order says nothing about spend
    assert set(report) == {"since", "until", "thresholds", "signals"}
    for entry in report["signals"]:
        assert set(entry) == {"kind", "key_id", "owner", "team", "role", "evidence", "work_items"}
        assert [w["id"] for w in entry["work_items"]] == sorted(w["id"] for w in entry["work_items"])


def test_thresholds_are_the_config_section_and_refuse_nonsense() -> None:
    assert settings_from_mapping({"signals": {"heavy_spend_min_usd": 10}}, {}).signals == SignalSettings(heavy_spend_min_usd=10)
    with pytest.raises(ConfigError, match="signals.nope"):
        settings_from_mapping({"signals": {"nope": 1}}, {})
    for bad in ({"cadence_min_requests": 2}, {"around_clock_min_hours": 25}, {"unverified_min_share": 0}, {"cost_min_key_share": 1.5},
                {"heavy_spend_min_usd": -1}, {"cost_min_items": 2}, {"repeated_prompt_min_requests": 0}):  # fmt: skip
        with pytest.raises(ConfigError, match="signals." + next(iter(bad))):
            settings_from_mapping({"signals": bad}, {})


def test_plain_text_for_the_cli(world: tuple[Any, Org, Path]) -> None:
    engine, org, _ = world
    report = gaming_signals(engine, since=SINCE, until=UNTIL)
    text = signals_text(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"gaming signals {iso(SINCE)} .. {iso(UNTIL)}") and "advisory" in lines[0]
    headlines = [line for line in lines[1:] if not line.startswith(" ")]
    assert [line.split()[0] for line in headlines] == [s["kind"] for s in report["signals"]]
    assert org.keys["cron"].id in text and "around_the_clock" in text and "WEB-HUGE-1" in text
    shielder, spinner = (next(line for line in headlines if org.keys[name].id in line) for name in ("shielder", "spinner"))
    assert "1 completed, carrying $0.0" in shielder and "none completed" in spinner
    assert signals_text(gaming_signals(engine, since=T0, until=SINCE)).splitlines()[1] == "no signals"


# -- the route ------------------------------------------------------------------------------------------


@pytest.fixture
async def api(world: tuple[Any, Org, Path], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    engine, _, folder = world
    settings = make_settings(tmp_path, database_url=f"sqlite:///{folder / 'taskproxy.db'}")
    async with in_process(create_app(settings, engine=engine), timeout=30) as http:
        yield http


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.anyio
async def test_route_answers_admins_and_audits_the_read(world: tuple[Any, Org, Path], api: httpx.AsyncClient) -> None:
    engine, org, _ = world
    params = {"since": iso(SINCE), "until": iso(UNTIL)}
    response = await api.get("/api/reports/signals", params=params, headers=ADMIN)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == orjson.loads(orjson.dumps(gaming_signals(engine, since=SINCE, until=UNTIL)))
    assert flagged(response.json(), org) == expected_order(org, [(kind, name) for name, kind in PLANTED.items()])

    async def audit() -> list[dict]:
        return (await api.get("/api/audit", headers=ADMIN)).json()

    entries = await wait_until(audit, lambda rows: any(r["action"] == "GET /api/reports/signals" for r in rows))
    read = next(r for r in entries if r["action"] == "GET /api/reports/signals")
    assert "since=" in read["target"] and read["actor_key_id"]

    default = (await api.get("/api/reports/signals", headers=ADMIN)).json()
    assert default["thresholds"] == orjson.loads(orjson.dumps(gaming_signals(engine, since=SINCE, until=UNTIL)))["thresholds"]


@pytest.mark.anyio
async def test_route_refuses_other_keys_and_bad_periods(world: tuple[Any, Org, Path], api: httpx.AsyncClient) -> None:
    engine, _, _ = world
    _, token = issue_key(engine, owner="signals-route-tester", team=None, role="developer")
    refused = await api.get("/api/reports/signals", headers={"authorization": f"Bearer {token}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert (await api.get("/api/reports/signals")).status_code == 401
    for params in ({"since": iso(UNTIL), "until": iso(SINCE)}, {"since": "yesterday"}, {"until": "soon"}):
        bad = await api.get("/api/reports/signals", params=params, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request", params


@pytest.mark.anyio
async def test_route_reads_the_thresholds_from_the_config(world: tuple[Any, Org, Path], tmp_path: Path) -> None:
    engine, org, folder = world
    settings = make_settings(tmp_path, database_url=f"sqlite:///{folder / 'taskproxy.db'}", signals={"repeated_prompt_min_requests": LOOP_REQUESTS + 1})
    async with in_process(create_app(settings, engine=engine), timeout=30) as http:
        report = (await http.get("/api/reports/signals", params={"since": iso(SINCE), "until": iso(UNTIL)}, headers=ADMIN)).json()
    assert report["thresholds"]["repeated_prompt_min_requests"] == LOOP_REQUESTS + 1
    assert "repeated_prompt" not in {kind for kind, _ in flagged(report, org)}


@pytest.mark.anyio
async def test_signals_and_reports_count_the_same_requests(tmp_path: Path, fake: Any) -> None:
    """A request is one definition (storage/rollup.py `is_request`): a count_tokens call is recorded,
    and counted by neither the reports nor the signals' evidence."""
    provider_root = PROVIDER_URL.removesuffix("/v1")
    settings = make_settings(
        tmp_path, signals={"heavy_spend_min_usd": 0.0000001},
        models=[{"name": "claude", "provider": "anthropic", "base_url": provider_root, "upstream_model": "claude-sonnet-4-5"}],
    )  # fmt: skip
    async for proxy in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        key = await proxy.new_key("sam", "payments")
        headers = {"x-api-key": key, "x-work-item": "PAY-77", "anthropic-version": "2023-06-01"}
        ask = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]}
        for _ in range(3):
            assert (await proxy.http.post("/v1/messages", json=ask, headers=headers)).status_code == 200
        for _ in range(4):
            assert (await proxy.http.post("/v1/messages/count_tokens", json=ask, headers=headers)).status_code == 200
        assert len(await proxy.events(7)) == 7
        item = await proxy.item("PAY-77", requests=3)
        report = await proxy.get("/api/reports/signals", since="1d")
    heavy = [s for s in report["signals"] if s["kind"] == "spend_without_completion"]
    assert len(heavy) == 1, report
    assert heavy[0]["evidence"]["requests"] == item["requests"] == 3
    assert [w["requests"] for w in heavy[0]["work_items"]] == [3]


@pytest.mark.postgres
def test_the_signals_of_more_keys_than_a_statement_can_bind(postgres_url: str) -> None:
    """An organisation has more keys than PostgreSQL binds parameters in one statement (65,535): 65,536
    keys, each sending three requests a minute apart, are each flagged for their machine cadence."""

    from taskproxy.reports.signals import gaming_signals
    from taskproxy.settings import SignalSettings
    from taskproxy.storage import bulk, rollup
    from taskproxy.storage.db import make_engine, upgrade_schema
    from taskproxy.storage.models import UsageEvent
    from test_rollup import event

    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    rng, keys, start = random.Random(9), 65_536, SINCE + timedelta(hours=1)
    rows = [event(rng, start + timedelta(minutes=n), key_id=f"k{k:05d}", owner=f"p{k}", attempt=1, status=200, route="/v1/chat/completions")
            for k in range(keys) for n in range(3)]  # fmt: skip
    with engine.begin() as connection:  # the events, and their rollups as the backfill makes them (faster than the writer for 196,608)
        bulk.insert_new(connection, UsageEvent.__table__, rows)
        rollup.backfill(connection)
    report = gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=SignalSettings(cadence_min_requests=3))
    engine.dispose()
    cadence = [s for s in report["signals"] if s["kind"] == "machine_cadence"]
    assert len(cadence) == keys and {s["evidence"]["interval_cv"] for s in cadence} == {0.0}


@BOTH_DATABASES
def test_around_the_clock_counts_days_with_exactly_the_threshold_of_distinct_hours(database_url: str) -> None:
    """The cadence figures, on either database (PostgreSQL computes them itself): a key active in exactly
    `around_clock_min_hours` distinct hours on `around_clock_min_days` days is flagged; one hour fewer is
    not. Irregular intervals, so only the hours can flag it; the interval figures are checked too."""

    import statistics

    from taskproxy.reports.signals import gaming_signals
    from taskproxy.settings import SignalSettings
    from taskproxy.storage import repo
    from taskproxy.storage.db import make_engine, upgrade_schema
    from test_rollup import event

    engine = make_engine(database_url)
    upgrade_schema(engine)
    t = SignalSettings(cadence_min_requests=10, around_clock_min_hours=6, around_clock_min_days=2, cadence_max_cv=0.0)
    rng, rows, times = random.Random(4), [], {}
    for key, hours in (("k-six", 6), ("k-five", 5)):
        stamps = sorted(SINCE + timedelta(days=day, hours=hour, minutes=rng.randrange(60), seconds=rng.randrange(60))
                        for day in (1, 2) for hour in range(hours) for _ in range(2))  # fmt: skip
        times[key] = stamps
        rows += [event(rng, ts, key_id=key, owner=key, attempt=1, status=200, route="/v1/chat/completions") for ts in stamps]
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    report = gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=t)
    engine.dispose()
    cadence = {s["key_id"]: s["evidence"] for s in report["signals"] if s["kind"] == "machine_cadence"}
    assert set(cadence) == {"k-six"}
    gaps = [(b - a).total_seconds() for a, b in zip(times["k-six"], times["k-six"][1:])]
    assert cadence["k-six"] == {
        "requests": 24, "first": iso(times["k-six"][0]), "last": iso(times["k-six"][-1]),
        "interval_mean_seconds": round(statistics.fmean(gaps), 3), "interval_median_seconds": round(statistics.median(gaps), 3),
        "interval_cv": round(statistics.pstdev(gaps) / statistics.fmean(gaps), 6), "distinct_hours": 6, "around_the_clock_days": 2,
        "reasons": ["around_the_clock"],
    }  # fmt: skip


def test_the_dashboards_signals_page_counts_every_kind_and_shows_a_bounded_number_of_each(world: tuple[Any, Org, Path]) -> None:
    from taskproxy.dashboard.data import signals_page

    engine, _, _ = world
    full = gaming_signals(engine, since=SINCE, until=UNTIL)
    counts = {kind: [s["kind"] for s in full["signals"]].count(kind) for kind in KINDS if any(s["kind"] == kind for s in full["signals"])}
    assert len(counts) >= 8  # every kind is planted, trivial_completions twice
    first_of_each = [s for n, s in enumerate(full["signals"]) if all(other["kind"] != s["kind"] for other in full["signals"][:n])]
    assert len(first_of_each) < len(full["signals"])
    for per_kind, shown in ((0, []), (1, first_of_each)):
        page = signals_page(engine, SINCE, UNTIL, SignalSettings(), per_kind=per_kind)
        assert page["counts"] == counts and page["signals"] == shown and page["per_kind"] == per_kind


OUTLIER_SINCE, OUTLIER_UNTIL = datetime(2026, 3, 1), datetime(2026, 3, 31)


def _team_with_an_outlier(engine: Any) -> tuple[Any, Any]:
    """Six ordinary completed items of the team web, and WEB-BIG, completed too, costing $21: $9 + $9
    from the key `web` in two models, $3 from a key of the team data. Returns the two keys."""
    rng = random.Random(3)
    web, _ = issue_key(engine, owner="big@example.com", team="web")
    data, _ = issue_key(engine, owner="helper@example.com", team="data")
    rows = []

    def spent(item_id: str, key: Any, team: str, model: str, nanos: int, day: int) -> None:
        rows.append(raw_event(rng, OUTLIER_SINCE + timedelta(days=day, hours=9), key_id=key.id, owner=key.owner, team=team,
                              work_item=item_id, model=model, cost_nanos=nanos, status=200, attempt=1, route="/v1/chat/completions"))  # fmt: skip

    for n in range(6):  # the team's ordinary completed items: $1.00 to $1.05
        spent(f"WEB-{n}", web, "web", "gpt-4o-mini", 10**9 + n * 10**7, n + 1)
    spent("WEB-BIG", web, "web", "gpt-4o-mini", 9 * 10**9, 8)
    spent("WEB-BIG", web, "web", "claude-sonnet", 9 * 10**9, 9)
    spent("WEB-BIG", data, "data", "gpt-4o-mini", 3 * 10**9, 10)
    for n, item_id in enumerate([*(f"WEB-{n}" for n in range(6)), "WEB-BIG"]):
        registry.transition(engine, item_id, "open", source="jira", at=OUTLIER_SINCE + timedelta(days=n), fields={"team": "web"})
        registry.transition(engine, item_id, "done", source="jira", at=OUTLIER_SINCE + timedelta(days=n + 12))
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    return web, data


def _outliers(engine: Any) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    found = gaming_signals(engine, since=OUTLIER_SINCE, until=OUTLIER_UNTIL)["signals"]
    return [(s["key_id"], [(w["id"], w["item_cost_usd"], w["key_cost_usd"], w["key_share"]) for w in s["work_items"]])
            for s in found if s["kind"] == "cost_outlier"]  # fmt: skip


@BOTH_DATABASES
def test_a_cost_outliers_cost_is_its_spend_in_every_model_and_team(database_url: str) -> None:
    """An item's cost, against its team's median, is its whole spend: every model and every team that
    spent on it (the per-item totals hold a row for each), and each key's share is of that whole."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    web, _ = _team_with_an_outlier(engine)
    assert _outliers(engine) == [
        (web.id, [("WEB-BIG", pytest.approx(21.0), pytest.approx(18.0), pytest.approx(18 / 21))])
    ]  # the helper's $3 is a seventh of it: below the 25 % a key needs
    engine.dispose()


@pytest.mark.postgres
def test_the_signals_read_one_snapshot_while_writers_commit(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch committed while the signals are being read (here: between the cost outliers' read of
    the items' costs and of their keys' spend) is in neither: a key's spend never exceeds the item's
    cost it is a share of."""
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    web, _ = _team_with_an_outlier(engine)
    late = raw_event(random.Random(4), OUTLIER_SINCE + timedelta(days=20), key_id=web.id, owner=web.owner, team="web", work_item="WEB-BIG",
                     model="gpt-4o-mini", cost_nanos=30 * 10**9, status=200, attempt=1, route="/v1/chat/completions")  # fmt: skip
    grouped = rollup.grouped

    def committing_meanwhile(*args: Any, **kwargs: Any) -> Any:
        found = grouped(*args, **kwargs)
        if kwargs.get("period") is rollup.LIFETIME:  # the items' costs are read: a writer commits
            repo.write_batch(engine, events=[late], rejections=[], new_items=[])
        return found

    monkeypatch.setattr(rollup, "grouped", committing_meanwhile)
    assert _outliers(engine) == [(web.id, [("WEB-BIG", pytest.approx(21.0), pytest.approx(18.0), pytest.approx(18 / 21))])]
    monkeypatch.undo()
    assert _outliers(engine) == [(web.id, [("WEB-BIG", pytest.approx(51.0), pytest.approx(48.0), pytest.approx(48 / 51))])]
    engine.dispose()
