"""Prices per token: litellm's bundled model cost map, read as a file (never fetched, litellm not
imported), with per-model overrides from config. An unknown price is None, never 0."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from taskproxy.jsonbytes import object_at
from taskproxy.metering.observed import ProviderUsage
from taskproxy.money import to_nanos
from taskproxy.settings import ModelSettings

PRICE_TABLE_FILE = "model_prices_and_context_window_backup.json"
ALIAS = "alias_of"
MAX_ALIAS_HOPS = 4


@dataclass(frozen=True)
class Price:
    input: float  # USD per prompt token
    output: float  # USD per completion token
    cached_input: float | None = None  # USD per cached prompt token (cache read); None: billed as input
    cache_write: float | None = None  # USD per prompt token written to the cache (Anthropic); None: as input
    cache_write_1h: float | None = None  # USD per token written to the cache for an hour; None: as `cache_write`
    # Long-context rates: (prompt tokens, the rates of a request whose prompt has more), ascending. A
    # request over the threshold is billed at those rates for all its tokens, output included (OpenAI's
    # models above 272k, Gemini's and Anthropic's above 200k or 100k).
    above: tuple[tuple[int, Price], ...] = ()
    # The rates of a processing tier the provider says it served the request in (`service_tier` flex or
    # priority: half and about twice the standard rates); any other tier bills as standard.
    services: tuple[tuple[str, Price], ...] = ()
    # Multiples of a whole request's price (the table's `provider_specific_entry`): Anthropic's `fast`
    # (fast mode) and a region's (`us`: inference kept in the US), as the answer's usage names them.
    uplifts: tuple[tuple[str, float], ...] = ()

    def bill(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, cache_write_tokens: int = 0,
             cache_write_1h_tokens: int = 0, *, tier: str | None = None, speed: str | None = None, region: str | None = None) -> int:  # fmt: skip
        """The request's cost in nano-USD: at its processing tier's rates (`for_service`), times the
        surcharges its speed and region carry."""
        nanos = self.for_service(tier).nanos(prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens)
        factor = 1.0
        for name, multiple in self.uplifts:
            if name == speed == "fast" or (name == region and region not in ("global", "not_available", "fast")):
                factor *= multiple
        return nanos if factor == 1.0 else round(nanos * factor)

    def for_service(self, tier: str | None) -> Price:
        """The rates of the processing tier the answer names (None, `default`, `standard`: these)."""
        for name, rates in self.services:
            if name == tier:
                return rates
        return self

    def for_prompt(self, prompt_tokens: int) -> Price:
        """The rates a request with `prompt_tokens` (cached and cache writes included) is billed at."""
        chosen = self
        for threshold, rates in self.above:
            if prompt_tokens > threshold:
                chosen = rates
        return chosen

    def nanos(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, cache_write_tokens: int = 0,
              cache_write_1h_tokens: int = 0) -> int:  # fmt: skip
        """The cost in nano-USD. `prompt_tokens` include the cached and cache-write tokens, which are
        billed at their own rates; `cache_write_1h_tokens` are the part of the writes kept for an hour
        (Anthropic bills them at twice the input rate, the 5-minute ones at 1.25 times). A prompt over a
        long-context threshold bills the whole request at that tier's rates (`above`)."""
        if self.above and (rates := self.for_prompt(prompt_tokens)) is not self:
            return rates.nanos(prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens)
        cached = min(cached_tokens, prompt_tokens)
        written = min(cache_write_tokens, prompt_tokens - cached)
        for_an_hour = min(cache_write_1h_tokens, written)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        hour_rate = write_rate if self.cache_write_1h is None else self.cache_write_1h
        return to_nanos((prompt_tokens - cached - written) * self.input + cached * cached_rate + (written - for_an_hour) * write_rate
                        + for_an_hour * hour_rate + completion_tokens * self.output)  # fmt: skip

    def cost_nanos(self, usage: ProviderUsage) -> int:
        return self.bill(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_creation_tokens, usage.cache_creation_1h_tokens,
                         tier=usage.service_tier, speed=usage.speed, region=usage.inference_geo)  # fmt: skip


def bundled_price_file() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / PRICE_TABLE_FILE
    return path if path.exists() else None


def _read_entry(raw: bytes, name: str) -> dict | None:
    key = re.compile(rb'"' + re.escape(name.encode()) + rb'"\s*:\s*\{')
    for match in key.finditer(raw):
        entry = object_at(raw, match.end() - 1)
        if isinstance(entry, dict) and ({"input_cost_per_token", "litellm_provider", ALIAS} & entry.keys()):
            return entry
    return None


def follow_aliases(entry: object, lookup: Callable[[str], object]) -> dict | None:
    """The entry an alias (`{"alias_of": "gpt-6-luna"}`, as newer tables name their `-latest`
    models) stands for; any other entry as it is. None for a dangling or circular alias."""
    for _ in range(MAX_ALIAS_HOPS):
        if not isinstance(entry, dict):
            return None
        if ALIAS not in entry:
            return entry
        entry = lookup(str(entry[ALIAS]))
    return None


def table_entries(raw: bytes, names: Iterable[str]) -> dict[str, dict]:
    """The price table's entries for `names`, each parsed on its own (aliases followed). Parsing the
    whole table (~2,500 models) to keep a handful left ~5 MiB of fragmented memory in the server for good."""
    found: dict[str, dict] = {}
    for name in set(names):
        entry = follow_aliases(_read_entry(raw, name), lambda target: _read_entry(raw, target))
        if entry is not None:
            found[name] = entry
    return found


def _optional(entry: dict, key: str) -> float | None:
    return float(entry[key]) if entry.get(key) is not None else None


SERVICE_TIERS = ("flex", "priority", "ultrafast", "balanced")  # processing tiers with rates of their own (OpenAI's, Gemini's); others bill as standard


def tier_asked(body: Mapping[str, Any]) -> str | None:
    """The processing tier a request asked for (`service_tier`), if one with rates of its own: what
    prices an answer that does not say (one too large to read whole) and the budget meter's count."""
    asked = body.get("service_tier")
    return asked if asked in SERVICE_TIERS else None


def speed_asked(body: Mapping[str, Any]) -> str | None:
    """Anthropic's fast mode asked for (`speed: "fast"`): what prices an answer whose usage does not say."""
    return "fast" if body.get("speed") == "fast" else None


def _from_table(entry: dict) -> Price | None:
    try:
        standard = _rates(entry, "", None)
        if standard is None:
            return None
        services = tuple((tier, rates) for tier in SERVICE_TIERS if (rates := _rates(entry, f"_{tier}", standard)) is not None)
        return replace(standard, services=services, uplifts=_uplifts(entry.get("provider_specific_entry")))
    except (KeyError, TypeError, ValueError):
        return None


def _uplifts(entry: Any) -> tuple[tuple[str, float], ...]:
    """The table's `provider_specific_entry` multiples (`{"us": 1.1, "fast": 2.0}`), the sensible ones."""
    if not isinstance(entry, dict):
        return ()
    found = [(str(name).lower(), float(value)) for name, value in entry.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    # `fast`, and regions (`us`, `eu`, `apac`): the entry holds flags and counts of other kinds too.
    return tuple(sorted((name, value) for name, value in found if _UPLIFT.fullmatch(name) and 0 < value <= 100 and math.isfinite(value)))


_UPLIFT = re.compile(r"fast|[a-z]{2,4}")


def _rates(entry: dict, suffix: str, standard: Price | None) -> Price | None:
    """The rates the table names with `suffix` ("" for the standard tier, "_flex", "_priority"), their
    long-context tiers (`input_cost_per_token_above_272k_tokens…` and its output, cache read and cache
    write twins) included. A rate a tier does not name is the standard tier's; a long-context rate a
    processing tier does not name is its own rate raised as the standard tier's is past that threshold
    (OpenAI charges the long-context multiples on standard and flex alike; litellm's table names them
    for some models only)."""
    if entry.get(f"input_cost_per_token{suffix}") is None:
        return None

    def rates(infix: str, fallback: Price | None) -> Price:
        def rate(name: str, default: float | None) -> float | None:
            found = _optional(entry, f"{name}{infix}{suffix}")
            return default if found is None else found

        return Price(
            input=float(entry[f"input_cost_per_token{infix}{suffix}"]),
            output=rate("output_cost_per_token", fallback.output if fallback else 0.0) or 0.0,
            cached_input=rate("cache_read_input_token_cost", fallback.cached_input if fallback else None),
            cache_write=rate("cache_creation_input_token_cost", fallback.cache_write if fallback else None),
            cache_write_1h=rate("cache_creation_input_token_cost_above_1hr", fallback.cache_write_1h if fallback else None),
        )

    own = rates("", standard)
    long_context = re.compile(rf"^input_cost_per_token_above_(\d+)k_tokens{re.escape(suffix)}$")
    named = {int(match[1]) * 1000 for key in entry if (match := long_context.match(key)) is not None and entry[key] is not None}
    standard_above = dict(standard.above) if standard is not None else {}
    above = []
    for threshold in sorted(named | standard_above.keys()):
        fallback = _scaled(standard_above[threshold], standard, own) if standard is not None and threshold in standard_above else own
        above.append((threshold, rates(f"_above_{threshold // 1000}k_tokens", fallback) if threshold in named else fallback))
    return replace(own, above=tuple(above))


def _scaled(long: Price, standard: Price, own: Price) -> Price:
    """A processing tier's rates past a long-context threshold the table does not name for it: each of
    its own rates times the standard tier's rise there."""

    def scale(name: str) -> float | None:
        mine, base, raised = getattr(own, name), getattr(standard, name), getattr(long, name)
        if mine is None or not base or raised is None:
            return mine if mine is not None else raised
        return float(mine * raised / base)

    return Price(input=scale("input") or 0.0, output=scale("output") or 0.0, cached_input=scale("cached_input"),
                 cache_write=scale("cache_write"), cache_write_1h=scale("cache_write_1h"))  # fmt: skip


def prices_for(models: Iterable[ModelSettings], table: dict | None = None) -> dict[str, Price | None]:
    """The price of each configured model (by client-facing name)."""
    models = list(models)
    if table is None and any(m.pricing is None for m in models):
        path = bundled_price_file()
        wanted = [c for m in models for c in (m.target_model, f"{m.provider}/{m.target_model}", m.name)]
        table = table_entries(path.read_bytes(), wanted) if path else {}
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
        entry = next((e for c in candidates if table and (e := follow_aliases(table.get(c), table.get)) is not None), None)
        prices[model.name] = _from_table(entry) if entry else None
    return prices
