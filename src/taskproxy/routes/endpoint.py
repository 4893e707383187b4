"""What a proxied route is: its path, the provider kind that takes its body as it is, the API it speaks
(the shape of its errors and stream error events), how usage is read from its answers, and the fields
its body must have."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from anyio import CapacityLimiter
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.error_shapes import ApiFormat, error_event
from taskproxy.errors import ApiError, InvalidRequest
from taskproxy.metering.observed import ProviderUsage
from taskproxy.metering.tokens import TokenCounter
from taskproxy.routes.common import ApiRoute
from taskproxy.settings import ModelSettings
from taskproxy.upstream.observe import Observer
from taskproxy.upstream.provider import ProviderReply
from taskproxy.upstream.translate import Translator

_JSON_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean", int: "an integer", float: "a number"}


class Translation(NamedTuple):
    """What answering for a provider of another kind takes: litellm, or tiktoken for count_tokens
    (`counting`: the few threads local counts take, not the pool every other worker-thread task shares)."""

    translator: Translator
    counter: TokenCounter
    counting: CapacityLimiter


# Reaches a model whose provider does not speak the endpoint's API: (translation, model, body, stream).
Translate = Callable[[Translation, ModelSettings, dict, bool], Awaitable[ProviderReply]]


@dataclass(frozen=True)
class Endpoint:
    path: str
    upstream_path: str  # appended to the model's base_url when relaying
    native_provider: str  # the provider kind that takes the body as it is
    api: ApiFormat  # the shape of its errors and stream error events
    observe_body: Observer
    observe_stream: Observer
    usage_of: Callable[[Any], ProviderUsage | None]  # the provider's usage object, normalized
    required: tuple[str, ...] = ()
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)
    streams: bool = True
    usage_chunk_opt_in: bool = False  # OpenAI's stream_options.include_usage
    auth_header: str = "authorization"
    default_headers: tuple[tuple[str, str], ...] = ()
    translate: Translate | None = None
    model_optional: bool = False  # the Responses API: without `model`, responses.default_model applies

    def validate(self, body: dict) -> None:
        """Refuse missing fields and fields of the wrong JSON type (the provider would, later and less clearly)."""
        for name in ("model", *self.required):
            if body.get(name) is None:  # null is no value: `"model": null` reached the lookup and was a 500
                raise InvalidRequest(f"'{name}' is required." if name not in body else f"'{name}' is required; it was null.", param=name)
        expected = {"model": (str,), "stream": (bool,), "metadata": (dict,), **self.types}
        for name, types in expected.items():
            if name in body and body[name] is not None and not isinstance(body[name], types):
                wanted = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)
                raise InvalidRequest(f"'{name}' must be {wanted}.", param=name)

    def reaches(self, model: ModelSettings) -> bool:
        return model.provider == self.native_provider or self.translate is not None

    def error_event(self, error: ApiError) -> bytes:
        return error_event(error, self.api)

    def route(self, handler: Callable[[Request], Awaitable[Response]]) -> ApiRoute:
        """POST on the endpoint's path (routes/proxy.py `proxy_route` gives the handler)."""
        return ApiRoute(self.path, handler, methods=["POST"], api_format=self.api)
