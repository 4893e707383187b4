"""The one exception tree of taskproxy, and how an error is rendered for its route.

    TaskproxyError
    ├── ConfigError                 bad configuration, raised at start (one line: key and problem)
    ├── SchemaBehind                the database was made by an older version: run `taskproxy db upgrade`
    ├── MigrationBlocked            `db upgrade` waited too long for a lock (a long report on the table): rolled back
    ├── TrackerUnavailable          a tracker's REST API cannot answer (`items sync`: nothing is changed)
    ├── ItemElsewhere               a tracker says one item moved or was deleted (`items sync` notes it, goes on)
    └── ApiError                    anything a client is answered with (status + code)
        ├── InvalidApiKey           401 invalid_api_key
        ├── InvalidSignature        401 invalid_signature  (a webhook delivery not signed with the secret)
        ├── Forbidden               403 forbidden
        ├── NotFound                404 not_found          (admin API: unknown key, item, route)
        ├── MethodNotAllowed        405 method_not_allowed
        ├── WorkItemRequired        400 work_item_required
        ├── WorkItemInvalid         400 work_item_invalid
        ├── WorkItemUnknown         403 work_item_unknown
        ├── WorkItemClosed          403 work_item_closed
        ├── BudgetExceeded          429 budget_exceeded
        ├── RateLimited             429 rate_limited       (limits.requests_per_minute; Retry-After)
        ├── ModelNotFound           404 model_not_found
        ├── InvalidRequest          400 invalid_request
        ├── RequestTimeout          408 request_timeout    (headers or body not delivered in time: the connection is closed)
        ├── RequestTooLarge         413 request_too_large
        ├── HeadersTooLarge         431 request_header_too_large
        ├── UpstreamError           502 upstream_error
        ├── ProviderError           the provider's status, provider_error (a translated provider refused)
        ├── UpstreamTimeout         504 upstream_timeout
        ├── ServiceUnavailable      503 service_unavailable (usage cannot be recorded; the proxy is stopping; /readyz)
        ├── ClientGone              499 client_disconnected (the client hung up first: recorded, never sent)
        └── InternalError           500 internal_error     (a bug; logged with its traceback)

Errors of other libraries are translated at exactly one boundary each: aiohttp's in
`upstream.aiohttp_client.map_aiohttp_errors`, litellm's in `upstream.translate.Translator.map_litellm_errors`,
httpx's (a tracker's API) in `trackers.sync.Fetcher._answer`,
the database's in `storage.failures` (the writer spools what the database cannot take; a route answers
503 for what a retry may cure, and 500 for the rest). This module is the
tree and its data only; `error_shapes.py` is the one place an error becomes a route's JSON body or
stream event.
"""

from __future__ import annotations

from typing import ClassVar


class TaskproxyError(Exception):
    """Root of every error taskproxy raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its attributes, not by calling its constructor again with `args` alone: an error
        # raised in a report's process is sent to the serving process (reports/runner.py), keyword-only
        # arguments (a status, a parameter's name) and notes included.
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[TaskproxyError], args: tuple[object, ...], state: dict[str, object]) -> TaskproxyError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(TaskproxyError):
    """The configuration cannot be used. The message names the key and the problem."""


class SchemaBehind(TaskproxyError):
    """The database lacks tables or columns this version needs."""


class MigrationBlocked(TaskproxyError):
    """A migration waited longer than allowed for a lock another session held; the upgrade was rolled back."""


class TrackerUnavailable(TaskproxyError):
    """A tracker's REST API could not answer (rate limited, token refused, down). The message says which and why."""


class ItemElsewhere(TaskproxyError):
    """A tracker's REST API says one item moved (a redirect within the API) or was deleted (410)."""


class ApiError(TaskproxyError):
    default_status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid_request"
    # OpenAI's `type` field: what family of error this is.
    openai_type: ClassVar[str] = "invalid_request_error"
    # Anthropic's error `type` for the same status.
    anthropic_type: ClassVar[str] = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status or self.default_status


class InvalidApiKey(ApiError):
    default_status, code = 401, "invalid_api_key"
    openai_type = "authentication_error"
    anthropic_type = "authentication_error"


class InvalidSignature(ApiError):
    default_status, code = 401, "invalid_signature"
    openai_type = anthropic_type = "authentication_error"


class Forbidden(ApiError):
    default_status, code = 403, "forbidden"
    openai_type = "permission_error"
    anthropic_type = "permission_error"


class NotFound(ApiError):
    default_status, code = 404, "not_found"
    openai_type = "not_found_error"
    anthropic_type = "not_found_error"


class MethodNotAllowed(ApiError):
    default_status, code = 405, "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow  # the methods the route takes, for the `Allow` header a 405 must carry (RFC 9110)


class WorkItemRequired(ApiError):
    default_status, code = 400, "work_item_required"


class WorkItemInvalid(ApiError):
    default_status, code = 400, "work_item_invalid"


class WorkItemUnknown(ApiError):
    default_status, code = 403, "work_item_unknown"
    openai_type = anthropic_type = "permission_error"


class WorkItemClosed(ApiError):
    default_status, code = 403, "work_item_closed"
    openai_type = anthropic_type = "permission_error"


class BudgetExceeded(ApiError):
    default_status, code = 429, "budget_exceeded"
    openai_type = "insufficient_quota"
    anthropic_type = "rate_limit_error"


class RateLimited(ApiError):
    default_status, code = 429, "rate_limited"
    openai_type = anthropic_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotFound(ApiError):
    default_status, code = 404, "model_not_found"
    openai_type = anthropic_type = "not_found_error"


class InvalidRequest(ApiError):
    default_status, code = 400, "invalid_request"


class RequestTimeout(ApiError):
    default_status, code = 408, "request_timeout"


class RequestTooLarge(ApiError):
    default_status, code = 413, "request_too_large"
    anthropic_type = "request_too_large"


class HeadersTooLarge(ApiError):
    default_status, code = 431, "request_header_too_large"


class UpstreamError(ApiError):
    default_status, code = 502, "upstream_error"
    openai_type = "api_error"
    anthropic_type = "api_error"


class UpstreamTimeout(ApiError):
    default_status, code = 504, "upstream_timeout"
    openai_type = "timeout_error"
    anthropic_type = "timeout_error"


class ProviderError(ApiError):
    """A provider reached through litellm answered with an error: its status, our shape."""

    code = "provider_error"
    openai_type = "api_error"
    anthropic_type = "api_error"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, status=status)  # whatever the provider said


class ServiceUnavailable(ApiError):
    default_status, code = 503, "service_unavailable"
    openai_type = "api_error"
    anthropic_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, when it is known to pass soon (Retry-After)


class ClientGone(ApiError):
    default_status, code = 499, "client_disconnected"


class InternalError(ApiError):
    default_status, code = 500, "internal_error"
    openai_type = "api_error"
    anthropic_type = "api_error"
