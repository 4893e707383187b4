"""Requests to providers that speak another API than the client's, translated by litellm.

litellm takes seconds to import and fetches a price table from the network unless told not to, so
it is imported once, in a worker thread, and only if a configured model needs it. Its exceptions
become taskproxy's in `map_litellm_errors`, the one boundary for them. Translated replies are
rendered in OpenAI's format, so metering reads them like any OpenAI response.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import anyio
import orjson

from taskproxy.errors import ApiError, ProviderError, UpstreamError, UpstreamTimeout
from taskproxy.settings import ModelSettings
from taskproxy.upstream.provider import ProviderReply

JSON_HEADERS = ((b"content-type", b"application/json"),)
SSE_HEADERS = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
# The only request fields passed on to litellm. litellm takes any keyword (api_base, fallbacks,
# extra_headers, mock_response, ...), so an unknown field from a client must never reach it: it could
# send the configured provider key elsewhere.
CHAT_PARAMETERS = frozenset({
    "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
    "logit_bias", "logprobs", "top_logprobs", "user", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "seed", "reasoning_effort", "modalities", "audio", "prediction", "service_tier", "web_search_options",
})  # fmt: skip
EMBEDDING_PARAMETERS = frozenset({"dimensions", "encoding_format", "user"})


def _caused_by_connection_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ConnectionError | OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _nothing() -> None:
    return None


class Translator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        """Import litellm (blocking; call it from a thread). Safe to call from several threads."""
        with self._lock:
            if self._module is None:
                # litellm reads this at import: use the price table in its package, never fetch one.
                os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                import litellm

                litellm.suppress_debug_info = True
                litellm.telemetry = False
                litellm.drop_params = True  # a parameter the target provider lacks is dropped, not an error
                self._module = litellm
            return self._module

    async def litellm(self) -> ModuleType:
        return self._module if self._module is not None else await anyio.to_thread.run_sync(self.load)

    @contextmanager
    def map_litellm_errors(self, model: ModelSettings) -> Iterator[None]:
        try:
            yield
        except ApiError:
            raise
        except Exception as exc:
            litellm = self._module
            where = f"the provider '{model.provider}' of the model '{model.name}'"
            if litellm is not None and isinstance(exc, litellm.Timeout):
                raise UpstreamTimeout(f"Timed out waiting for {where}.") from None
            if (litellm is not None and isinstance(exc, litellm.APIConnectionError)) or _caused_by_connection_failure(exc):
                raise UpstreamError(f"Could not reach {where} ({exc.__class__.__name__}).") from None
            status = getattr(exc, "status_code", None)
            if isinstance(status, int) and 400 <= status < 600:
                raise ProviderError(f"{where[4:].capitalize()} answered {status}: {str(exc)[:600]}", status=status) from None
            raise UpstreamError(f"{where[4:].capitalize()} failed: {exc.__class__.__name__}: {str(exc)[:300]}") from None

    def _common(self, model: ModelSettings, body: dict, allowed: frozenset[str]) -> dict[str, Any]:
        params = {k: v for k, v in body.items() if k in allowed}
        return {
            **params,
            "model": f"{model.provider}/{model.target_model}",
            "api_base": model.base_url,
            "api_key": model.api_key.get_secret_value() if model.api_key else None,
            "timeout": model.read_timeout_seconds,
            "num_retries": 0,  # fallbacks are taskproxy's, configured per model
            **model.extra,
        }

    async def chat(self, model: ModelSettings, body: dict, stream: bool) -> ProviderReply:
        litellm = await self.litellm()
        kwargs = self._common(model, body, CHAT_PARAMETERS)
        with self.map_litellm_errors(model):
            if not stream:
                result = await litellm.acompletion(messages=body["messages"], **kwargs)
                return ProviderReply.of_body(200, JSON_HEADERS, result.model_dump_json(exclude_none=True).encode())
            result = await litellm.acompletion(messages=body["messages"], stream=True, stream_options={"include_usage": True}, **kwargs)
        close = getattr(result, "aclose", None)  # a client hanging up must stop the provider's generation too
        return ProviderReply(200, list(SSE_HEADERS), self._openai_stream(model, result), close or _nothing)

    async def _openai_stream(self, model: ModelSettings, result: Any) -> AsyncIterator[bytes]:
        """litellm's chunks as OpenAI's SSE, usage in its own chunk with empty choices (as OpenAI sends it)."""
        usage: dict | None = None
        last: dict = {}
        with self.map_litellm_errors(model):
            async for chunk in result:
                data = chunk.model_dump(exclude_none=True)
                usage = data.pop("usage", None) or usage
                last = data
                choices = [c for c in data.get("choices") or () if c.get("delta") or c.get("finish_reason")]
                if choices:
                    yield b"data: " + orjson.dumps({**data, "choices": choices}) + b"\n\n"
        if usage:
            envelope = {k: last[k] for k in ("id", "created", "model", "object") if k in last}
            yield b"data: " + orjson.dumps({**envelope, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def embeddings(self, model: ModelSettings, body: dict, stream: bool) -> ProviderReply:
        litellm = await self.litellm()
        with self.map_litellm_errors(model):
            result = await litellm.aembedding(input=body["input"], **self._common(model, body, EMBEDDING_PARAMETERS))
        data = result.model_dump(exclude_none=True)
        data.setdefault("created", int(time.time()))
        return ProviderReply.of_body(200, JSON_HEADERS, orjson.dumps(data))
