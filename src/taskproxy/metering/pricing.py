"""Prices per token: litellm's bundled model cost map, read as a file (never fetched, litellm not
imported), with per-model overrides from config. An unknown price is None, never 0."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from taskproxy.settings import ModelSettings

PRICE_TABLE_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True)
class Price:
    input: float  # USD per prompt token
    output: float  # USD per completion token
    cached_input: float | None = None  # USD per cached prompt token; None: billed as input

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(cached_tokens, prompt_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (prompt_tokens - cached) * self.input + cached * cached_rate + completion_tokens * self.output


def bundled_price_table() -> dict:
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent / PRICE_TABLE_FILE
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def _from_table(entry: dict) -> Price | None:
    try:
        return Price(
            input=float(entry["input_cost_per_token"]),
            output=float(entry.get("output_cost_per_token", 0.0)),
            cached_input=float(entry["cache_read_input_token_cost"]) if entry.get("cache_read_input_token_cost") is not None else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def prices_for(models: Iterable[ModelSettings], table: dict | None = None) -> dict[str, Price | None]:
    """The price of each configured model (by client-facing name)."""
    models = list(models)
    if table is None and any(m.pricing is None for m in models):
        table = bundled_price_table()
    prices: dict[str, Price | None] = {}
    for model in models:
        if model.pricing is not None:
            p = model.pricing
            prices[model.name] = Price(
                input=p.input_per_million / 1e6,
                output=p.output_per_million / 1e6,
                cached_input=None if p.cached_input_per_million is None else p.cached_input_per_million / 1e6,
            )
            continue
        candidates = (model.target_model, f"{model.provider}/{model.target_model}", model.name)
        entry = next((table[c] for c in candidates if table and isinstance(table.get(c), dict)), None)
        prices[model.name] = _from_table(entry) if entry else None
    return prices
