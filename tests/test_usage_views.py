"""The read views agree with the raw events at their edges (found by a review, 2026-12-07): an item's
people counted as the privacy floor counts them, a window's task list naming the models used in that
window, a key's own items in the order they were last used, and periods in ASCII digits only."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Proxy
from signals_org import PRICE
from write_path import past_request, write_all

from taskproxy.metering.tokens import TokenCounter
from taskproxy.storage.db import make_engine

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 3, 1)


async def _write(proxy: Proxy, tmp_path: Path, uses: list[tuple[str, str, datetime, str]]) -> None:
    """(key id, work item, time, model) each one past request of that key's."""
    keys = {k["id"]: SimpleNamespace(id=k["id"], owner=k["owner"], team=k["team"]) for k in await proxy.get("/api/keys")}
    counter = TokenCounter()
    exchanges = [past_request(id=f"u-{n}", ts=ts, key=keys[key_id], work_item=item, model=model, body={"n": n}, prompt_tokens=10,
                              completion_tokens=1, counter=counter, price=PRICE) for n, (key_id, item, ts, model) in enumerate(uses)]  # fmt: skip
    engine = make_engine(proxy.settings.database_url)
    write_all(engine, tmp_path / "past.jsonl", exchanges, len(exchanges))
    engine.dispose()


async def _key_ids(proxy: Proxy) -> dict[str, str]:
    return {k["owner"]: k["id"] for k in await proxy.get("/api/keys")}


async def test_an_items_people_are_counted_as_the_privacy_floor_counts_them(proxy: Proxy, tmp_path: Path) -> None:
    """`dana`, `Dana` and `DANA` are one person to the privacy floor; the item's view said 3. (`dana ` is
    stored as `dana`: privacy.owner_name.)"""
    for owner in ("dana", "Dana", "DANA", "rae"):
        await proxy.new_key(owner, "payments")
    ids = await _key_ids(proxy)
    await _write(proxy, tmp_path, [(ids[owner], "PAY-1", T0, "gpt-4o-mini") for owner in ("dana", "Dana", "DANA", "rae")])
    assert (await proxy.get("/api/work-items/PAY-1"))["people"] == 2


async def test_a_windows_tasks_name_the_models_used_in_that_window(proxy: Proxy, tmp_path: Path) -> None:
    """A model used on the item before the window is not among the window's models (it was: all time)."""
    await proxy.new_key("dana", "payments")
    ids = await _key_ids(proxy)
    await _write(proxy, tmp_path, [(ids["dana"], "PAY-1", T0, "gpt-4o-mini"), (ids["dana"], "PAY-1", T0 + timedelta(days=2), "team-model")])
    tasks = (await proxy.get("/api/reports/tasks", since="2026-03-02T00:00:00Z", until="2026-03-04T00:00:00Z"))["tasks"]
    assert [(t["work_item"], t["requests"], t["models"]) for t in tasks] == [("PAY-1", 1, ["team-model"])]


async def test_a_keys_own_items_come_most_recently_used_first_within_a_millisecond(proxy: Proxy, tmp_path: Path) -> None:
    """Two items last used within one millisecond: the later one first, as `items=1` picks it (the list
    was sorted again by the times shown, which are rounded to the millisecond, and fell back to ids)."""
    key = await proxy.new_key("dana", "payments")
    ids = await _key_ids(proxy)
    await _write(proxy, tmp_path, [(ids["dana"], "ZZZ-1", T0 + timedelta(microseconds=900), "gpt-4o-mini"),
                                   (ids["dana"], "AAA-1", T0 + timedelta(microseconds=100), "gpt-4o-mini")])  # fmt: skip
    mine = (await proxy.http.get("/api/me/usage", headers={"authorization": f"Bearer {key}"})).json()
    assert [w["work_item"] for w in mine["work_items"]] == ["ZZZ-1", "AAA-1"]


async def test_a_period_is_written_in_ascii_digits(proxy: Proxy) -> None:
    for period in ("٣d", "３d", "𝟑d"):
        response = await proxy.http.get("/api/usage", params={"since": period}, headers=proxy.admin_headers)
        assert response.status_code == 400, (period, response.text)
        assert response.json()["error"]["param"] == "since"
    assert (await proxy.http.get("/api/usage", params={"since": "3d"}, headers=proxy.admin_headers)).status_code == 200
