"""What each recorded field means, in plain words (the "My data" page), and how a field's value is
shown wherever the dashboard lists raw fields (events, signal evidence)."""

from __future__ import annotations

from typing import Any

from taskproxy.dashboard import format as fmt
from taskproxy.records import EVENT_FIELDS, TEXT_FIELDS  # noqa: F401  (the fields the page explains)

EVENT_FIELD_MEANINGS = {
    "id": "an id for the record",
    "ts": "when the request arrived (UTC)",
    "key_id": "the id of your proxy key (never the key itself)",
    "owner": "the owner name on your key",
    "team": "the team on your key",
    "work_item": "the work item the request was billed to",
    "attribution_source": "how the work item was given: header, body, branch or binding",
    "route": "the API route called, e.g. /v1/chat/completions",
    "model": "the model your client asked for",
    "upstream_model": "the model name sent to the provider",
    "provider": "the provider kind (openai, anthropic, ...)",
    "status": "the HTTP status of the answer",
    "attempt": "1 for your request; 2, 3, ... for fallback models tried after it",
    "error": "what went wrong, if anything (upstream_error, upstream_timeout, client_disconnected, proxy_shutdown)",
    "provider_error": "the provider's own error type, when it failed in the middle of a streamed answer",
    "stream": "whether the answer was streamed",
    "prompt_tokens": "tokens in the prompt",
    "completion_tokens": "tokens in the answer",
    "total_tokens": "prompt plus answer tokens",
    "cached_tokens": "prompt tokens read from the provider's cache",
    "cache_write_tokens": "prompt tokens written to the provider's cache",
    "reasoning_tokens": "reasoning tokens the provider reported",
    "est_prompt_tokens": "the proxy's own estimate of the prompt's tokens",
    "usage_source": "provider (exact), estimated (some figure the provider did not report) or deferred (a background response, billed by a later event when read finished)",
    "estimated_fields": "which figures were estimated by the proxy, when the provider did not report them",
    "cost_usd": "the cost from the provider's list prices (empty when the price is unknown)",
    "latency_ms": "how long the request took, in milliseconds",
    "ttfb_ms": "time to the first byte of the answer, in milliseconds",
    "prompt_hash": "a SHA-256 hash of the prompt, to spot identical prompts sent again: it holds no text, though a guessed "
    "prompt can be checked against it",
    "user_agent": "your client's User-Agent header",
}

_MONEY = ("cost_usd", "usd")
_TIMES = ("ts", "first", "last", "first_used", "last_used", "completed_at", "created_at", "expires_at")
_SHARES = ("share", "key_share", "ai_assisted_share")


def field_value(value: Any, name: str = "") -> str:
    """A field's value as text: money for *_usd, readable times, shares as percentages, else numbers or text."""
    if value is None:
        return fmt.NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name.endswith(_MONEY) and isinstance(value, int | float):
        return fmt.money(value)
    if name in _SHARES and isinstance(value, int | float):
        return fmt.share(value)
    if name in _TIMES and isinstance(value, str):
        try:
            return fmt.when(value)
        except ValueError:
            return value
    if name.endswith("_ms") and isinstance(value, int | float):
        return f"{value:,.0f} ms"
    if name.endswith("_seconds") and isinstance(value, int | float):
        return f"{value:,.1f} s"
    if isinstance(value, int | float):
        return fmt.number(value) if isinstance(value, int) or value.is_integer() or abs(value) >= 100 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(field_value(v) for v in value) if value else fmt.NONE
    if isinstance(value, dict):
        return ", ".join(f"{fmt.label(k)} {field_value(v, k)}" for k, v in value.items()) if value else fmt.NONE
    return str(value)
