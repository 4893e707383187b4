"""What an answer told us about its usage: the shapes shared by the readers of each API format
(upstream/observe.py), the request path's meter and the usage records."""

from __future__ import annotations

from dataclasses import dataclass, field

COMPLETION = "completion_tokens"
PROMPT = "prompt_tokens"


@dataclass(frozen=True)
class ProviderUsage:
    prompt_tokens: int = 0  # cache reads and writes included
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_tokens: int = 0  # Anthropic reports cache writes apart; they are part of the prompt
    cache_creation_1h_tokens: int = 0  # of which written for an hour (Anthropic's `ttl: 1h`), at a higher rate
    # The processing tier the provider says it served the request in (`service_tier`: flex, priority,
    # default, standard…), which prices it (metering/pricing.py); None when it did not say.
    service_tier: str | None = None
    # Anthropic's surcharges, as its usage says: `speed` (`fast`: fast mode) and `inference_geo` (`us`:
    # inference kept in the US), each a multiple of the whole request's price (pricing.Price.uplifts).
    speed: str | None = None
    inference_geo: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Observed:
    """What the answer told us."""

    usage: ProviderUsage | None = None  # None: the provider reported nothing
    completion_text: str = ""
    # The kept text stands for this many times its size (the middle of a long stream was not kept).
    text_scale: float = 1.0
    error: str | None = None  # the provider's error type, sent inside an answer that had begun (a stream)
    missing: frozenset[str] = field(default_factory=frozenset)  # usage fields the provider had not reported yet
    response_id: str | None = None  # the Responses API's id of what the provider stored (read back by id)
    # A background response (`background: true`) answers before it is generated: its usage is recorded
    # later, once, when a read of it by id shows it finished (routes/stored.py).
    deferred: bool = False


NOTHING_OBSERVED = Observed()
NOT_BILLED = Observed(ProviderUsage())  # e.g. Anthropic's count_tokens: answered, nothing generated
