"""Building usage records from what the request path observed.

The request path fills an `Exchange` with cheap facts (times, ids, status) and a callable that reads
the provider's usage out of what was kept of its answer. The expensive part — parsing the answer,
counting tokens with tiktoken, hashing the prompt, pricing — happens in `to_record()`, which the
storage writer calls on its own thread.

Which figures are the provider's and which are estimated:

- every figure the provider reported is kept, even when the answer ended early (an Anthropic stream
  cut after `message_start` keeps its input and cache tokens);
- what the provider had not reported is estimated with tiktoken: the prompt from the request, the
  completion from the text relayed (scaled up for the middle of a long stream that was not kept);
  `estimated_fields` names those fields and `usage_source` is then `estimated`;
- an attempt the provider refused (an error status) or never answered bills nothing: its tokens are
  estimated as 0 (its prompt estimate is still recorded in `est_prompt_tokens`);
- an error the provider sent inside a stream it had begun is recorded as `upstream_error` with the
  provider's error type in `provider_error`, and the attempt's status as 502.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from taskproxy.errors import ClientGone, UpstreamError
from taskproxy.metering.observed import COMPLETION, NOTHING_OBSERVED, PROMPT, Observed
from taskproxy.metering.pricing import Price, speed_asked, tier_asked
from taskproxy.metering.tokens import CountBudget, TokenCounter
from taskproxy.storage.batch import Record

log = logging.getLogger("taskproxy.metering")

# Which request fields make up the prompt, per route family; used for estimates and the hash.
PROMPT_FIELDS = ("system", "instructions", "messages", "prompt", "input", "tools")
# What a provider reports is clamped to this: far above any real request (a trillion tokens), and
# a year of such events per rollup row still fits the BIGINT sums.
MAX_TOKEN_COUNT = 2**40


def prompt_hash(body: dict) -> str:
    """A stable hash of what was asked (for spotting identical prompts), never the prompt itself."""
    prompt = {k: body[k] for k in PROMPT_FIELDS if k in body}
    return hashlib.sha256(orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _clamp(value: int) -> int:
    return min(max(int(value), 0), MAX_TOKEN_COUNT)


def estimate_prompt_tokens(counter: TokenCounter, model: str, body: dict) -> int:
    """The prompt's tokens by tiktoken: new text counted exactly up to COUNT_EXACT_CHARS (64 KiB) a
    request, the rest estimated from random windows of each text (tokens.py), so one request costs the
    recording thread a bounded time whatever text it sends."""
    budget = CountBudget()
    total = 0
    if isinstance(body.get("messages"), list):
        total += counter.count_chat(model, body["messages"], body.get("tools"), budget)
    elif body.get("tools"):
        total += counter.count_inputs(model, orjson.dumps(body["tools"]).decode(), budget)
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            total += counter.count_chat(model, value, budget=budget) - 3  # Responses API input items
        elif value is not None:
            total += counter.count_inputs(model, value, budget)
    for key in ("system", "instructions"):
        value = body.get(key)
        if isinstance(value, str):
            total += counter.count(model, value, budget)
        elif isinstance(value, list):
            total += counter.count_chat(model, [{"content": value}], budget=budget) - 6
    return total


@dataclass
class Exchange:
    """One attempt at a provider, as observed by the request path. Implements the writer's `Recordable`."""

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
    weight: int = 0  # the request body's bytes: what this holds until its record is built (the writer's backlog)
    # How it ended, set once by the request path when the attempt is over.
    status: int = 0
    error: str | None = None
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    answered: bool = False  # the provider accepted the request: its successful answer began
    observe: Callable[[], Observed] = field(default=lambda: NOTHING_OBSERVED)
    charged: tuple[int, int] = (0, 0)  # (tokens, nano-USD) already counted against budgets on the request path

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

    def _completion_estimate(self, observed: Observed) -> int:
        counted = self._count(lambda: self.counter.count(self.upstream_model, observed.completion_text))
        return round(counted * observed.text_scale)

    def to_record(self) -> Record:
        """The event's row. Never raises: whatever fails, the request is still recorded."""
        observed = self._observe()
        est_prompt = self._count(lambda: estimate_prompt_tokens(self.counter, self.upstream_model, self.body))
        usage = observed.usage
        estimated: set[str] = set()
        prompt = completion = cached = written = written_1h = reasoning = 0
        if usage is not None:
            prompt, completion = _clamp(usage.prompt_tokens), _clamp(usage.completion_tokens)
            cached, written, reasoning = _clamp(usage.cached_tokens), _clamp(usage.cache_creation_tokens), _clamp(usage.reasoning_tokens)
            written_1h = _clamp(usage.cache_creation_1h_tokens)
            if COMPLETION in observed.missing:  # the stream ended before the provider's count: what was relayed
                completion = max(completion, _clamp(self._completion_estimate(observed)))
                estimated.add(COMPLETION)
        else:
            estimated |= {PROMPT, COMPLETION}
            # Answered but no usage reported (cut short, or a provider without usage). Not a stream whose
            # provider sent its error before anything was generated (an in-band `overloaded_error` under a
            # 200): a refusal, billed nothing as the same refusal with its own status is.
            refused_in_band = observed.error is not None and not observed.completion_text
            if self.answered and not refused_in_band:
                prompt, completion = est_prompt, _clamp(self._completion_estimate(observed))
        status, error, provider_error = self.status, self.error, None
        # The provider's error was relayed before anything else ended the answer: a client that hangs up
        # on reading it (the SDKs raise on it) does not make it the client's doing.
        if observed.error is not None and error in (None, ClientGone.code):
            status, error, provider_error = UpstreamError.default_status, UpstreamError.code, observed.error
        # The tier the answer says it was served in, else the one the request asked for.
        tier = (usage.service_tier if usage is not None else None) or tier_asked(self.body)
        speed = (usage.speed if usage is not None else None) or speed_asked(self.body)
        region = usage.inference_geo if usage is not None else None
        cost = self.price.bill(prompt, completion, cached, written, written_1h, tier=tier, speed=speed, region=region) if self.price is not None else None
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
            "status": status,
            "error": error,
            "provider_error": provider_error,
            "attempt": self.attempt,
            "stream": self.stream,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": cached,
            "cache_write_tokens": written,
            "reasoning_tokens": reasoning,
            "est_prompt_tokens": est_prompt,
            "usage_source": "deferred" if observed.deferred else "estimated" if estimated else "provider",
            "estimated_fields": ",".join(sorted(estimated, key=(PROMPT, COMPLETION).index)) or None,
            "cost_nanos": cost,
            "latency_ms": round(self.latency_ms, 3),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 3),
            "prompt_hash": self._prompt_hash(),
            "user_agent": self.user_agent[:400] if self.user_agent else None,
            "prompt_text": self._prompt_text() if self.store_prompts else None,
            "completion_text": observed.completion_text if self.store_prompts else None,
            "response_id": observed.response_id,
        }
        return Record("event", row, self.register_work_item, charged=self.charged)

    def _prompt_text(self) -> str | None:
        try:
            return orjson.dumps({k: self.body[k] for k in PROMPT_FIELDS if k in self.body}).decode()
        except Exception:
            return None


@dataclass
class Rejected:
    """A request refused before anything went upstream."""

    ts: datetime
    key_id: str | None
    reason: str
    route: str

    def to_record(self) -> Record:
        return Record("rejection", {"ts": self.ts, "key_id": self.key_id, "reason": self.reason, "route": self.route, "count": 1})
