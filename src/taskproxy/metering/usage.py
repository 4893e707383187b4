"""Building usage records from what the request path observed.

The request path fills an `Exchange` with cheap facts (times, ids, status) and a callable that can
read the provider's usage out of the bytes it relayed. The expensive part — parsing the response,
counting tokens with tiktoken, hashing the prompt, pricing — happens in `to_record()`, which the
storage writer calls on its own thread.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from taskproxy.metering.pricing import Price
from taskproxy.metering.tokens import TokenCounter
from taskproxy.storage.writer import Record

log = logging.getLogger("taskproxy.metering")


@dataclass(frozen=True)
class ProviderUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Anthropic reports cache writes separately; they are part of the prompt.
    cache_creation_tokens: int = 0


@dataclass(frozen=True)
class Observed:
    """What the response told us: the provider's usage if it reported any, and the completion text."""

    usage: ProviderUsage | None = None
    completion_text: str = ""


NOTHING_OBSERVED = Observed()

# Which request fields make up the prompt, per route family; used for estimates and the hash.
PROMPT_FIELDS = ("system", "instructions", "messages", "prompt", "input", "tools")


MAX_TOKEN_COUNT = 2**62  # what a provider reports is clamped to this: a column must hold it


def prompt_hash(body: dict) -> str:
    """A stable hash of what was asked (for spotting identical prompts), never the prompt itself."""
    prompt = {k: body[k] for k in PROMPT_FIELDS if k in body}
    return hashlib.sha256(orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _clamp(value: int) -> int:
    return min(max(int(value), 0), MAX_TOKEN_COUNT)


def estimate_prompt_tokens(counter: TokenCounter, model: str, body: dict) -> int:
    total = 0
    if isinstance(body.get("messages"), list):
        total += counter.count_chat(model, body["messages"], body.get("tools"))
    elif body.get("tools"):
        total += counter.count_inputs(model, orjson.dumps(body["tools"]).decode())
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            total += counter.count_chat(model, value) - 3  # Responses API input items
        elif value is not None:
            total += counter.count_inputs(model, value)
    for key in ("system", "instructions"):
        value = body.get(key)
        if isinstance(value, str):
            total += counter.count(model, value)
        elif isinstance(value, list):
            total += counter.count_chat(model, [{"content": value}]) - 6
    return total


@dataclass
class Exchange:
    """One forwarded request, as observed by the request path. Implements the writer's `Recordable`."""

    id: str
    ts: datetime
    key_id: str
    owner: str
    team: str | None
    work_item: str
    attribution_source: str
    route: str
    model: str
    upstream_model: str
    provider: str
    stream: bool
    body: dict
    user_agent: str | None
    counter: TokenCounter
    price: Price | None
    register_work_item: dict | None = None
    store_prompts: bool = False
    attempt: int = 1  # 2, 3, ... for fallbacks after a failed attempt
    status: int = 0
    error: str | None = None
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    observe: Callable[[], Observed] = field(default=lambda: NOTHING_OBSERVED)

    def _count(self, count: Callable[[], int]) -> int:
        """A token estimate; if counting fails the event is still recorded, with the estimate 0."""
        try:
            return count()
        except Exception:
            log.exception("token counting failed for event %s; recorded without the estimate", self.id)
            return 0

    def _observe(self) -> Observed:
        try:
            return self.observe()
        except Exception:  # an odd response must not cost the event: record what the request says
            log.exception("could not read usage from the response of event %s; it is estimated", self.id)
            return NOTHING_OBSERVED

    def _prompt_hash(self) -> str | None:
        try:
            return prompt_hash(self.body)
        except Exception:
            return None

    def to_record(self) -> Record:
        """The event's row. Never raises: whatever fails, the request is still recorded."""
        observed = self._observe()
        est_prompt = self._count(lambda: estimate_prompt_tokens(self.counter, self.upstream_model, self.body))
        usage = observed.usage
        if usage is not None:
            prompt, completion = _clamp(usage.prompt_tokens + usage.cache_creation_tokens), _clamp(usage.completion_tokens)
            cached, written, reasoning = _clamp(usage.cached_tokens), _clamp(usage.cache_creation_tokens), _clamp(usage.reasoning_tokens)
            source = "provider"
        else:
            completion = self._count(lambda: self.counter.count(self.upstream_model, observed.completion_text))
            prompt, cached, written, reasoning, source = est_prompt, 0, 0, 0, "estimated"
            if self.status >= 400:  # refused or never answered: nothing to bill, the estimate stays
                prompt = completion = 0
        cost = self.price.cost(prompt, completion, cached, written) if self.price is not None else None
        row: dict[str, Any] = {
            "id": self.id,
            "ts": self.ts,
            "key_id": self.key_id,
            "owner": self.owner,
            "team": self.team,
            "work_item": self.work_item,
            "attribution_source": self.attribution_source,
            "route": self.route,
            "model": self.model,
            "upstream_model": self.upstream_model,
            "provider": self.provider,
            "status": self.status,
            "error": self.error,
            "attempt": self.attempt,
            "stream": self.stream,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": cached,
            "cache_write_tokens": written,
            "reasoning_tokens": reasoning,
            "est_prompt_tokens": est_prompt,
            "usage_source": source,
            "cost_usd": cost,
            "latency_ms": round(self.latency_ms, 3),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 3),
            "prompt_hash": self._prompt_hash(),
            "user_agent": self.user_agent[:400] if self.user_agent else None,
            "prompt_text": self._prompt_text() if self.store_prompts else None,
            "completion_text": observed.completion_text if self.store_prompts else None,
        }
        return Record("event", row, self.register_work_item)


    def _prompt_text(self) -> str | None:
        try:
            return orjson.dumps({k: self.body[k] for k in PROMPT_FIELDS if k in self.body}).decode()
        except Exception:
            return None


@dataclass
class Rejected:
    """A request refused before anything went upstream."""

    id: str
    ts: datetime
    key_id: str | None
    reason: str
    route: str

    def to_record(self) -> Record:
        return Record("rejection", {"id": self.id, "ts": self.ts, "key_id": self.key_id, "reason": self.reason, "route": self.route})
