"""OpenAI-compatible routes: chat completions, completions, embeddings, the Responses API, models.

To a model whose provider is OpenAI-compatible the body goes unchanged except for the model name,
the work item in `metadata` (removed) and, for chat and completion streams,
`stream_options.include_usage` (always on; the extra chunk is withheld from a client that did not
ask for it). Chat and embeddings requests for other providers are translated by litellm.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskproxy.error_shapes import ApiFormat
from taskproxy.guard.auth import KeyStore
from taskproxy.routes.endpoint import Endpoint, Translation
from taskproxy.routes.proxy import proxy_route
from taskproxy.settings import OPENAI_COMPATIBLE, ModelSettings, Settings
from taskproxy.upstream import observe
from taskproxy.upstream.provider import ProviderReply


async def _translate_chat(translation: Translation, model: ModelSettings, body: dict, stream: bool) -> ProviderReply:
    return await translation.translator.chat(model, body, stream)


async def _translate_embeddings(translation: Translation, model: ModelSettings, body: dict, stream: bool) -> ProviderReply:
    return await translation.translator.embeddings(model, body, stream)


CHAT = Endpoint(
    "/v1/chat/completions", "/chat/completions", OPENAI_COMPATIBLE, ApiFormat.OPENAI, observe.openai_body, observe.openai_stream, observe.openai_usage,
    required=("messages",), types={"messages": (list,), "tools": (list,), "stream_options": (dict,)},
    usage_chunk_opt_in=True, translate=_translate_chat,
)  # fmt: skip
COMPLETIONS = Endpoint(
    "/v1/completions", "/completions", OPENAI_COMPATIBLE, ApiFormat.OPENAI, observe.openai_body, observe.openai_stream, observe.openai_usage,
    required=("prompt",), types={"prompt": (str, list), "stream_options": (dict,)}, usage_chunk_opt_in=True,
)  # fmt: skip
EMBEDDINGS = Endpoint(
    "/v1/embeddings", "/embeddings", OPENAI_COMPATIBLE, ApiFormat.OPENAI, observe.openai_body, observe.openai_stream, observe.openai_usage,
    required=("input",), types={"input": (str, list)}, streams=False, translate=_translate_embeddings,
)  # fmt: skip
RESPONSES = Endpoint(
    "/v1/responses", "/responses", OPENAI_COMPATIBLE, ApiFormat.OPENAI, observe.responses_body, observe.responses_stream, observe.openai_usage,
    types={"input": (str, list), "instructions": (str,), "tools": (list,)},
)  # fmt: skip


async def list_models(request: Request) -> Response:
    keys: KeyStore = request.state.keys
    settings: Settings = request.state.settings
    await keys.authenticate(request.headers)
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.provider} for m in settings.models]
    return JSONResponse({"object": "list", "data": data})


routes = [
    *(proxy_route(endpoint) for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)),
    Route("/v1/models", list_models, methods=["GET"]),
]
