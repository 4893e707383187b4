"""The machine-cadence signal rules keys out by the hours of their days with requests
(`usage_key_daily.request_hours`) before it reads any request: a key it rules out could never have been
flagged, and the keys flagged are exactly those the definition (signals.py) flags, computed here in
plain Python from the request times. Keys near the threshold on purpose, on either database."""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import update

from conftest import BOTH_DATABASES
from taskproxy.reports.signal_cadence import could_be_flagged
from taskproxy.reports.signal_data import load_spend
from taskproxy.reports.signals import gaming_signals
from taskproxy.settings import SignalSettings
from taskproxy.storage import repo
from taskproxy.storage.rollup import KEY_DAILY
from taskproxy.storage.db import make_engine, upgrade_schema
from test_rollup import event

SINCE = datetime(2026, 5, 4, 9, 30)  # partial days at both ends
UNTIL = datetime(2026, 5, 8, 17, 45)
DEFAULTS = SignalSettings()  # 50 requests; cv 0.2; 20 hours on 3 days
# Regular intervals alone, at thresholds the machines below straddle (no key reaches 99 days).
THRESHOLDS = [DEFAULTS, *(SignalSettings(cadence_max_cv=cv, around_clock_min_days=99) for cv in (0.2, 0.6, 1.5, 3.0))]
# Around the clock at 6 hours a day: the night owl's four such days include both partial ones.
EDGES = SignalSettings(around_clock_min_hours=6, around_clock_min_days=4)


def schedules(rng: random.Random) -> dict[str, list[datetime]]:
    """Request times per key: machines at near-regular intervals (jitter around cv 0.2) that stop for
    a few hours a day or not at all, machines that keep office hours, people, and an irregular key that
    never sleeps."""
    found: dict[str, list[datetime]] = {}
    start, end = SINCE.replace(hour=0) - timedelta(hours=2), UNTIL + timedelta(hours=2)
    for n in range(60):
        interval, jitter = rng.choice([240, 600, 1200]), rng.uniform(0, 0.35)
        off_from, off_hours = rng.randrange(24), rng.choice([0, 0, rng.uniform(0.5, 8)])
        at, stamps = start, []
        while at < end:
            at += timedelta(seconds=interval * (1 + rng.uniform(-jitter, jitter) * 3**0.5))  # uniform, sd = jitter × interval
            since_off = (at - at.replace(hour=off_from, minute=0, second=0, microsecond=0)).total_seconds() / 3600
            if 0 <= since_off < off_hours:
                at += timedelta(hours=off_hours - since_off)  # the daily stop
            stamps.append(at)
        found[f"machine-{n:02d}"] = stamps
    for n in range(8):  # regular, but only from 9 to 17
        found[f"office-bot-{n}"] = [SINCE.replace(hour=0) + timedelta(days=d, hours=9, seconds=s)
                                    for d in range(6) for s in range(0, 8 * 3600, 300 + 60 * n)]  # fmt: skip
    for n in range(12):  # people: working hours, at random
        found[f"person-{n:02d}"] = [SINCE.replace(hour=0) + timedelta(days=d, hours=rng.uniform(8, 19)) for d in range(6) for _ in range(25)]
    found["insomniac"] = [start + (end - start) * rng.random() for _ in range(900)]
    midnight = SINCE.replace(hour=0)
    owl_days = [(SINCE, range(10, 16)), (midnight + timedelta(days=1), range(1, 7)), (midnight + timedelta(days=3), range(1, 7)),
                (UNTIL.replace(hour=0), range(9, 15))]  # fmt: skip
    found["night-owl"] = [day.replace(hour=hour, minute=rng.randrange(60), second=rng.randrange(60)) for day, hours in owl_days
                          for hour in hours for _ in range(4)]  # fmt: skip
    return {key: sorted(ts) for key, ts in found.items()}


def flagged_by_definition(times: dict[str, list[datetime]], t: SignalSettings) -> set[str]:
    found = set()
    for key, stamps in times.items():
        inside = [ts for ts in stamps if SINCE <= ts < UNTIL]
        if len(inside) < t.cadence_min_requests:
            continue
        gaps = [(b - a).total_seconds() for a, b in zip(inside, inside[1:])]
        hours_per_day: dict[object, set[int]] = defaultdict(set)
        for ts in inside:
            hours_per_day[ts.date()].add(ts.hour)
        around = sum(1 for hours in hours_per_day.values() if len(hours) >= t.around_clock_min_hours)
        if statistics.pstdev(gaps) / statistics.fmean(gaps) <= t.cadence_max_cv or around >= t.around_clock_min_days:
            found.add(key)
    return found


@BOTH_DATABASES
def test_keys_ruled_out_by_their_hours_are_never_ones_the_definition_flags(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    rng = random.Random(15)
    times = schedules(rng)
    rows = [event(rng, ts, key_id=key, owner=key, attempt=1, status=200, route="/v1/chat/completions") for key, stamps in times.items() for ts in stamps]
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])

    machines = {k for k in times if k.startswith("machine")}
    ruled_out_near = 0
    for t in [*THRESHOLDS, EDGES]:
        expected = flagged_by_definition(times, t)
        report = gaming_signals(engine, since=SINCE, until=UNTIL, thresholds=t)
        assert {s["key_id"] for s in report["signals"] if s["kind"] == "machine_cadence"} == expected, t
        with engine.connect() as connection:
            spend = load_spend(connection, SINCE, UNTIL)
            kept = set(could_be_flagged(connection, sorted(spend), spend, SINCE, UNTIL, t))
        assert expected <= kept, t  # nothing the definition flags is ruled out
        if t in THRESHOLDS:
            assert machines & expected and machines - expected, t  # the machines straddle every threshold
            ruled_out_near += len(machines - kept)
        if t is DEFAULTS:  # people and office hours are ruled out without reading a request
            assert not {k for k in kept if k.startswith(("person", "office-bot"))} and "insomniac" in expected
    # A replica older than migration 0012 (during an upgrade) writes rows without hours: such a key is
    # no longer ruled out, since its quiet hours are not known.
    table = KEY_DAILY.table
    with engine.begin() as connection:
        day = SINCE.replace(hour=0) + timedelta(days=2)  # a whole day of the period (as stored, within the hour: SQLite keeps text)
        within_day = (table.c.bucket > day - timedelta(hours=1), table.c.bucket < day + timedelta(hours=1))
        assert connection.execute(update(table).where(table.c.key_id == "person-00", *within_day).values(request_hours=0)).rowcount
        kept = set(could_be_flagged(connection, sorted(spend), spend, SINCE, UNTIL, DEFAULTS))
    assert "person-00" in kept and "person-01" not in kept
    engine.dispose()
    assert ruled_out_near >= 20  # and so are many of the machines that stop for a while, at each threshold
    assert "night-owl" in flagged_by_definition(times, EDGES) and "night-owl" not in flagged_by_definition(times, DEFAULTS)
