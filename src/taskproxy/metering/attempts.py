"""Each attempt at a provider, from its start to the one moment it is recorded.

`Attempts.begin` opens an attempt: its usage event (`Exchange`) and its meter, which counts what the
provider reports against the budgets as it arrives. `Attempt.record_once` records it, exactly once,
however it ended: answered, refused by the provider, failed, cut short by the client, or ended by a
shutdown. The attempts begun and not yet recorded are counted, so that a shutdown can wait for them
before it drains the writer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from taskproxy.ids import time_ordered_id
from taskproxy.metering.meter import Meter
from taskproxy.metering.observed import ProviderUsage
from taskproxy.metering.pricing import Price, tier_asked
from taskproxy.metering.tokens import TokenCounter
from taskproxy.metering.usage import Exchange
from taskproxy.settings import ModelSettings
from taskproxy.storage.batch import UsageSink


@dataclass
class Attempt:
    exchange: Exchange  # set up by the request path as the answer arrives (observe, answered)
    meter: Meter
    started: float  # perf_counter at the request's arrival
    _attempts: Attempts
    recorded: bool = False

    def record_once(self, *, status: int, error: str | None = None, first_byte: float | None = None) -> None:
        """Record the attempt, however it ended; the request path calls it exactly once per attempt
        (a second call would count the attempt twice, and is refused)."""
        if self.recorded:
            raise RuntimeError("an attempt is recorded once")
        self.recorded = True
        exchange = self.exchange
        exchange.status = status
        exchange.error = error
        exchange.latency_ms = (time.perf_counter() - self.started) * 1000
        exchange.ttfb_ms = (first_byte - self.started) * 1000 if first_byte is not None else None
        exchange.charged = (self.meter.tokens, self.meter.nanos)
        self._attempts.sink.submit(exchange)
        self._attempts.open -= 1


# Counts spend against budgets: (work item, team, time, tokens, nano-USD).
Charge = Callable[[str, str | None, datetime, int, int], None]


@dataclass(frozen=True)
class Caller:
    """Whose request an attempt serves, and the work item it is billed to."""

    key_id: str
    owner: str
    team: str | None
    work_item: str
    attribution_source: str  # header | body | branch | binding


@dataclass
class Attempts:
    sink: UsageSink
    counter: TokenCounter
    prices: dict[str, Price | None]
    charge: Charge
    register_unknown_items: bool  # work_items.mode open: an item first seen in a request is registered
    store_prompts: bool
    open: int = 0

    def begin(
        self, caller: Caller, *, ts: datetime, started: float, body: dict, user_agent: str | None, route: str,
        usage_of: Callable[[Any], ProviderUsage | None], model: ModelSettings, stream: bool, number: int, weight: int = 0,
    ) -> Attempt:  # fmt: skip
        register = None
        if self.register_unknown_items:
            register = {"id": caller.work_item, "source": "auto", "status": "unverified", "created_at": ts}
        price = self.prices.get(model.name)
        exchange = Exchange(
            id=time_ordered_id(ts), ts=ts, key_id=caller.key_id, owner=caller.owner, team=caller.team, work_item=caller.work_item,
            attribution_source=caller.attribution_source, route=route, model=model.name, upstream_model=model.target_model,
            provider=model.provider, stream=stream, body=body, user_agent=user_agent, counter=self.counter, price=price,
            register_work_item=register, store_prompts=self.store_prompts, attempt=number, weight=weight,
        )  # fmt: skip
        self.open += 1
        # The meter counts at the tier asked for: OpenAI's stream says which it served outside its usage object.
        metered = price.for_service(tier_asked(body)) if price is not None else None
        return Attempt(exchange, Meter(usage_of, metered, partial(self.charge, caller.work_item, caller.team, ts)), started, self)

    async def wait_until_recorded(self, timeout: float) -> int:
        """Wait for the open attempts; answers how many were still open when the time ran out."""
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.open
