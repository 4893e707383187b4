"""OpenAI-compatible routes: chat completions, completions, embeddings, the Responses API (create,
compact, input_tokens; reading a stored response back is routes/stored.py), models.

To a model whose provider is OpenAI-compatible the body goes unchanged except for the model name,
the work item in `metadata` (removed) and, for chat and completion streams,
`stream_options.include_usage` (always on; the extra chunk is withheld from a client that did not
ask for it). Chat and embeddings requests for other providers are translated by litellm.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from taskproxy.error_shapes import ApiFormat
from taskproxy.errors import MethodNotAllowed, ModelNotFound, NotFound
from taskproxy.metering.observed import NOT_BILLED
from taskproxy.routes.common import ApiRoute
from taskproxy.guard.auth import KeyStore
from taskproxy.routes.endpoint import Endpoint, Translation
from taskproxy.routes.proxy import proxy_route
from taskproxy.routes.responses_socket import responses_socket
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
RESPONSE_TYPES: dict[str, tuple[type, ...]] = {"input": (str, list), "instructions": (str,), "tools": (list,)}
RESPONSES = Endpoint(
    "/v1/responses", "/responses", OPENAI_COMPATIBLE, ApiFormat.OPENAI, observe.responses_body, observe.responses_stream, observe.openai_usage,
    types=RESPONSE_TYPES, model_optional=True,
)  # fmt: skip
# Codex's remote compaction: the model reads the conversation and writes its summary, so it is billed.
COMPACT = Endpoint(
    "/v1/responses/compact", "/responses/compact", OPENAI_COMPATIBLE, ApiFormat.OPENAI, observe.responses_body, observe.responses_body,
    observe.openai_usage, types=RESPONSE_TYPES, streams=False, model_optional=True,
)  # fmt: skip
# The counterpart of Anthropic's count_tokens: answered by the provider, nothing generated.
INPUT_TOKENS = Endpoint(
    "/v1/responses/input_tokens", "/responses/input_tokens", OPENAI_COMPATIBLE, ApiFormat.OPENAI, lambda capture: NOT_BILLED,
    lambda capture: NOT_BILLED, lambda usage: None, types=RESPONSE_TYPES, streams=False, model_optional=True,
)  # fmt: skip


async def list_models(request: Request) -> Response:
    keys: KeyStore = request.state.keys
    settings: Settings = request.state.settings
    await keys.authenticate(request.headers)
    data = [_model_entry(m) for m in settings.models]
    return JSONResponse({"object": "list", "data": data})


def _model_entry(model: ModelSettings) -> dict:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": model.provider}


async def get_model(request: Request) -> Response:
    keys: KeyStore = request.state.keys
    settings: Settings = request.state.settings
    await keys.authenticate(request.headers)
    name = request.path_params["model"]
    model = settings.model(name)
    if model is None:
        known = ", ".join(m.name for m in settings.models) or "none"
        raise ModelNotFound(f"The model '{name[:100]}' is not configured on this proxy. Configured models: {known}.", param="model")
    return JSONResponse(_model_entry(model))


STORED_COMPLETIONS = ("taskproxy does not serve stored chat completions (listing, reading, updating or deleting them): read them "
                      "from the provider directly. Create completions with POST /v1/chat/completions.")


async def stored_completions(request: Request) -> Response:
    if request.url.path.rstrip("/") == "/v1/chat/completions":
        raise MethodNotAllowed(f"{request.method} is not allowed on /v1/chat/completions. {STORED_COMPLETIONS}", allow="POST")
    raise NotFound(STORED_COMPLETIONS)


async def responses_over_websocket(websocket: WebSocket) -> None:
    await responses_socket(websocket, RESPONSES)


routes = [
    *(proxy_route(endpoint) for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, COMPACT, INPUT_TOKENS)),
    WebSocketRoute("/v1/responses", responses_over_websocket),
    Route("/v1/models", list_models, methods=["GET"]),
    ApiRoute("/v1/models/{model:path}", get_model, methods=["GET"]),
    ApiRoute("/v1/chat/completions", stored_completions, methods=["GET"]),
    ApiRoute("/v1/chat/completions/{rest:path}", stored_completions, methods=["GET", "POST", "DELETE"]),
]
