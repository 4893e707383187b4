"""Counting an exchange's spend against its budgets the moment the provider reports it.

This runs on the request path, so it does only what is cheap: when a chunk holds a usage object
(a bytes search), that small object is parsed and priced. Usage is counted before the client has
the end of the answer, so a client sending one request after another is refused on the first one
after its budget is spent. Only an estimate (a provider that reported nothing) waits for the
writer thread, which adds whatever differs from what was counted here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from taskproxy.jsonbytes import last_usage_object
from taskproxy.metering.observed import ProviderUsage
from taskproxy.metering.pricing import Price

Charge = Callable[[int, int], None]  # (tokens, nano-USD) more than was counted before


class Meter:
    __slots__ = ("_usage_of", "_price", "_charge", "_reported", "tokens", "nanos", "pending")

    def __init__(self, usage_of: Callable[[Any], ProviderUsage | None], price: Price | None, charge: Charge) -> None:
        self._usage_of = usage_of
        self._price = price
        self._charge = charge
        self._reported: dict = {}
        self.tokens = 0  # counted so far
        self.nanos = 0
        self.pending = False  # a usage object began but has not arrived whole yet

    def saw(self, recent: bytes) -> None:
        """`recent`: the end of what has arrived, which holds a usage object (or its beginning)."""
        found = last_usage_object(recent)
        self.pending = found is None
        if found is None:
            return
        self._reported.update(found)  # Anthropic reports input in message_start and output later
        usage = self._usage_of(self._reported)
        if usage is None:
            return
        tokens = usage.total_tokens
        nanos = self._price.cost_nanos(usage) if self._price is not None else 0
        if tokens != self.tokens or nanos != self.nanos:
            self._charge(tokens - self.tokens, nanos - self.nanos)
            self.tokens, self.nanos = tokens, nanos
