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
from starlette.routing import Route

from taskproxy.metering.usage import estimate_prompt_tokens
from taskproxy.routes.pipeline import Endpoint, proxy
from taskproxy.services import Services
from taskproxy.settings import ANTHROPIC, ModelSettings
from taskproxy.upstream import observe
from taskproxy.upstream.passthrough import UpstreamReply
from taskproxy.upstream.relay import anthropic_error_event

ANTHROPIC_VERSION = (("anthropic-version", "2023-06-01"),)  # sent when the client sent none
MESSAGE_TYPES: dict[str, tuple[type, ...]] = {"messages": (list,), "system": (str, list), "tools": (list,), "max_tokens": (int,)}


async def _count_locally(svc: Services, model: ModelSettings, body: dict, stream: bool) -> UpstreamReply:
    """count_tokens for a model Anthropic does not serve: tiktoken's estimate, counted off the event loop."""
    tokens = await anyio.to_thread.run_sync(estimate_prompt_tokens, svc.counter, model.target_model, body)
    return UpstreamReply(200, {"content-type": "application/json"}, body=orjson.dumps({"input_tokens": tokens}))


MESSAGES = Endpoint(
    "/v1/messages", "/v1/messages", ANTHROPIC, observe.anthropic_body, observe.anthropic_stream,
    required=("messages",), types=MESSAGE_TYPES, auth_header="x-api-key", default_headers=ANTHROPIC_VERSION,
    error_event=anthropic_error_event,
)  # fmt: skip
COUNT_TOKENS = Endpoint(
    "/v1/messages/count_tokens", "/v1/messages/count_tokens", ANTHROPIC, lambda body: observe.NOT_BILLED, lambda chunks: observe.NOT_BILLED,
    required=("messages",), types=MESSAGE_TYPES, streams=False, auth_header="x-api-key", default_headers=ANTHROPIC_VERSION,
    error_event=anthropic_error_event, translate=_count_locally,
)  # fmt: skip


async def messages(request: Request) -> Response:
    return await proxy(request, MESSAGES)


async def count_tokens(request: Request) -> Response:
    return await proxy(request, COUNT_TOKENS)


routes = [
    Route(MESSAGES.path, messages, methods=["POST"]),
    Route(COUNT_TOKENS.path, count_tokens, methods=["POST"]),
]
