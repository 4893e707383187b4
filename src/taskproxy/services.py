"""What one running app holds: built in the app's lifespan, reached by routes via `request.app.state`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from starlette.requests import Request

from taskproxy.guard.attribution import Attribution
from taskproxy.guard.auth import KeyStore
from taskproxy.guard.body import BodyGate
from taskproxy.guard.budgets import Budgets
from taskproxy.guard.items import ItemCache, Policy
from taskproxy.guard.ratelimit import RateLimiter
from taskproxy.metering.pricing import Price
from taskproxy.metering.tokens import TokenCounter
from taskproxy.settings import Settings
from taskproxy.storage.writer import BatchWriter
from taskproxy.trackers.base import Tracker
from taskproxy.upstream.provider import ProviderClient
from taskproxy.upstream.translate import Translator

if TYPE_CHECKING:  # metrics.py and routes/pipeline.py import this module
    from taskproxy.metrics import Metrics
    from taskproxy.routes.pipeline import OpenAttempts


@dataclass
class Services:
    settings: Settings
    engine: Engine
    keys: KeyStore
    attribution: Attribution
    provider: ProviderClient
    translator: Translator
    writer: BatchWriter
    counter: TokenCounter
    prices: dict[str, Price | None]
    items: ItemCache
    policy: Policy
    budgets: Budgets
    trackers: dict[str, Tracker]
    rate_limiter: RateLimiter
    metrics: Metrics
    open_attempts: OpenAttempts
    body_gate: BodyGate


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
