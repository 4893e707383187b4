"""Writing usage of the past through the real write path (BatchWriter + Exchange), for generated data."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from taskproxy.metering.pricing import Price
from taskproxy.metering.tokens import TokenCounter
from taskproxy.metering.observed import Observed, ProviderUsage
from taskproxy.metering.usage import Exchange
from taskproxy.storage.writer import BatchWriter


def past_request(
    *,
    id: str,
    ts: datetime,
    key: Any,  # anything with .id, .owner and .team
    work_item: str,
    model: str,
    body: dict,
    prompt_tokens: int,
    completion_tokens: int,
    counter: TokenCounter,
    price: Price | None,
    status: int = 200,
    auto_registered_at: datetime | None = None,
    user_agent: str = "generator",
    latency_ms: float = 120.0,
) -> Exchange:
    """A request answered at `ts`, as the proxy would have recorded it (usage from the provider if it succeeded)."""
    observed = Observed(ProviderUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)) if status < 400 else Observed()
    register = None
    if auto_registered_at is not None:
        register = {"id": work_item, "source": "auto", "status": "unverified", "created_at": auto_registered_at}
    return Exchange(
        id=id, ts=ts, key_id=key.id, owner=key.owner, team=key.team, work_item=work_item, attribution_source="header",
        route="/v1/chat/completions", model=model, upstream_model=model, provider="openai", stream=False, body=body,
        user_agent=user_agent, counter=counter, price=price, register_work_item=register, status=status,
        error=None if status < 400 else "upstream_error", latency_ms=latency_ms, observe=lambda: observed, answered=status < 400,
    )  # fmt: skip


def write_all(engine: Any, spool_path: Any, records: Iterable[Any], expected: int) -> None:
    """Write `records` (exchanges, refusals) through a BatchWriter of their own, as the proxy would,
    and check that all `expected` rows were committed."""
    writer = BatchWriter(engine, flush_interval=0.05, batch_size=2000, spool_path=spool_path)
    writer.start()
    for record in records:
        writer.submit(record)
    writer.close(timeout=120)
    assert writer.committed == expected, (writer.committed, writer.spooled, writer.set_aside)
