"""Anthropic's Messages API (Claude Code and the `anthropic` SDK).

Requests for models whose provider is `anthropic` are relayed byte for byte, the client's
`x-api-key`/`Authorization` replaced by the configured key, `anthropic-version` and `anthropic-beta`
kept. Its `base_url` is the host root (`https://api.anthropic.com`), as in Anthropic's SDK. Errors
take Anthropic's shape. count_tokens for a model at another provider is answered from tiktoken.
"""

from __future__ import annotations

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.error_shapes import ApiFormat
from taskproxy.errors import NotFound
from taskproxy.routes.common import ApiRoute
from taskproxy.metering.observed import NOT_BILLED
from taskproxy.metering.usage import estimate_prompt_tokens
from taskproxy.routes.endpoint import Endpoint, Translation
from taskproxy.routes.proxy import proxy_route
from taskproxy.settings import ANTHROPIC, ModelSettings
from taskproxy.upstream import observe
from taskproxy.upstream.provider import ProviderReply

ANTHROPIC_VERSION = (("anthropic-version", "2023-06-01"),)  # sent when the client sent none
MESSAGE_TYPES: dict[str, tuple[type, ...]] = {"messages": (list,), "system": (str, list), "tools": (list,), "max_tokens": (int,)}


async def _count_locally(translation: Translation, model: ModelSettings, body: dict, stream: bool) -> ProviderReply:
    """count_tokens for a model Anthropic does not serve: tiktoken's estimate, counted off the event loop
    in threads of its own (40 requests of 3 MiB each took the shared pool: admin calls and large bodies
    waited seconds), as much text as a usage record counts (metering/tokens.py, COUNT_EXACT_CHARS)."""
    tokens = await anyio.to_thread.run_sync(estimate_prompt_tokens, translation.counter, model.target_model, body, limiter=translation.counting)
    return ProviderReply.of_body(200, [(b"content-type", b"application/json")], orjson.dumps({"input_tokens": tokens}))


MESSAGES = Endpoint(
    "/v1/messages", "/v1/messages", ANTHROPIC, ApiFormat.ANTHROPIC, observe.anthropic_body, observe.anthropic_stream, observe.anthropic_usage,
    required=("messages",), types=MESSAGE_TYPES, auth_header="x-api-key", default_headers=ANTHROPIC_VERSION,
)  # fmt: skip
COUNT_TOKENS = Endpoint(
    "/v1/messages/count_tokens", "/v1/messages/count_tokens", ANTHROPIC, ApiFormat.ANTHROPIC, lambda capture: NOT_BILLED,
    lambda capture: NOT_BILLED, lambda usage: None,
    required=("messages",), types=MESSAGE_TYPES, streams=False, auth_header="x-api-key", default_headers=ANTHROPIC_VERSION,
    translate=_count_locally,
)  # fmt: skip


async def unknown(request: Request) -> Response:
    raise NotFound(f"There is no route {request.url.path[:200]!r} in Anthropic's Messages API; taskproxy serves /v1/messages and /v1/messages/count_tokens.")


routes = [
    proxy_route(MESSAGES),
    proxy_route(COUNT_TOKENS),
    # Everything else under /v1/messages is Anthropic's too: a wrong path gets Anthropic's error shape.
    ApiRoute("/v1/messages/{rest:path}", unknown, api_format=MESSAGES.api),
]
