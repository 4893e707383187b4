"""Money: stored and summed as whole nano-dollars (10^-9 USD), so that every total equals the sum of
its parts exactly, in every report and API. Shown in USD: `usd()` for the API's numbers, `format_usd()`
where a person reads it."""

from __future__ import annotations

import math
from typing import Any

NANOS_PER_USD = 1_000_000_000

# The largest budgets taskproxy accepts. A budget, and what is spent and leased against it, are kept in
# the database's 64-bit integers (tokens, nano-dollars: at most ~9.2 x 10^18); these leave room for the
# slices and overshoot counted on top of a budget. Larger ones mean "no limit": leave the budget unset.
MAX_BUDGET_TOKENS = 10**18
MAX_BUDGET_USD = 1_000_000_000.0  # 10^18 nano-dollars


def to_nanos(usd: float) -> int:
    return round(usd * NANOS_PER_USD)


def usd(nanos: Any) -> float | None:
    """An API's figure in USD from nano-dollars (an int, or a statistic such as a median, which is
    rounded to the nano-dollar); None stays None: an unknown price."""
    return None if nanos is None else round(nanos) / NANOS_PER_USD


def format_usd(value: float | None, *, unknown: str = "unpriced") -> str:
    """For people, from USD: cents from a dollar up, three significant digits below (one request can
    cost $0.0000123); `unknown` for an unknown price."""
    if value is None:
        return unknown
    value = float(value)
    if value == 0:
        return "$0.00"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    decimals = min(10, max(2, 2 - math.floor(math.log10(abs(value)))))
    return f"${value:.{decimals}f}"
