"""OpenTelemetry: one span per attempt at a provider, and the GenAI client metrics, sent over OTLP/HTTP.

Platform teams watch AI traffic where they watch everything else. The names are the OpenTelemetry
GenAI semantic conventions' (`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.usage.*`,
`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`), plus taskproxy's own
`taskproxy.work_item`, `taskproxy.team` and `taskproxy.attribution_source`; and `taskproxy.refusals`,
the requests refused before they reached a provider (no span: nothing was called). The person (owner, key)
is left out unless `telemetry.include_person` is set, and a team below `privacy.min_group_size` is
named as the small-teams group, as on /metrics.

Everything is built from the usage records, in the writer's thread (like metrics.py), so the request
path pays nothing; spans and metrics leave in the SDK's own export threads. Off unless configured
(`telemetry.enabled`, or an OTLP endpoint in the environment): then nothing of OpenTelemetry is even
imported. The exporters read the standard `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers,
timeout, compression); nothing is installed as the process's global provider.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from taskproxy import __version__
from taskproxy.errors import ConfigError
from taskproxy.money import usd
from taskproxy.settings import ANTHROPIC, OPENAI_COMPATIBLE, TelemetrySettings
from taskproxy.storage.batch import Record

# The route's operation, by the conventions' well-known values.
OPERATIONS = {
    "/v1/chat/completions": "chat", "/v1/messages": "chat", "/v1/responses": "chat", "/v1/responses/compact": "chat",
    "/v1/completions": "text_completion", "/v1/embeddings": "embeddings",
}  # fmt: skip
# taskproxy's (and litellm's) provider kinds, by the conventions' well-known `gen_ai.provider.name` values.
PROVIDERS = {
    OPENAI_COMPATIBLE: "openai", ANTHROPIC: "anthropic", "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock", "vertex_ai": "gcp.vertex_ai", "gemini": "gcp.gemini", "cohere": "cohere", "mistral": "mistral_ai",
    "groq": "groq", "deepseek": "deepseek", "perplexity": "perplexity", "xai": "x_ai", "watsonx": "ibm.watsonx.ai",
}  # fmt: skip
# Advisory bucket boundaries the conventions give for these two histograms.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
SECOND_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


def _nanos(at: datetime) -> int:
    return int(at.replace(tzinfo=UTC).timestamp() * 1_000_000_000)


class Telemetry:
    """Spans and metrics for every recorded attempt (`record`, a writer listener)."""

    def __init__(self, settings: TelemetrySettings, team_label: Callable[[str | None], str]) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode
        except ImportError as exc:  # installed with --no-deps, or pruned from an image
            raise ConfigError(
                f"OpenTelemetry export is on (telemetry.enabled, or an OTLP endpoint is set) but {exc.name} is not installed: "
                "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http, or set OTEL_SDK_DISABLED=true"
            ) from None

        self._include_person = settings.include_person
        self._team_label = team_label
        self._kind, self._status, self._error = SpanKind.CLIENT, Status, StatusCode.ERROR
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
        self._tracer_provider = TracerProvider(resource=resource)
        self._tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self._tracer_provider.get_tracer("taskproxy", __version__)
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
        meter = self._meter_provider.get_meter("taskproxy", __version__)
        self._tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}", description="Tokens used, by type (input, output)",
                                              explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)  # fmt: skip
        self._duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s", description="Duration of the attempt at the provider",
                                                explicit_bucket_boundaries_advisory=SECOND_BUCKETS)  # fmt: skip
        self._refusals = meter.create_counter(
            "taskproxy.refusals", unit="{request}", description="Requests refused before reaching a provider, by reason and route"
        )

    def record(self, record: Record) -> None:
        """One span, and the metrics, for a recorded attempt; a refusal is counted (called by the writer thread)."""
        row = record.row
        if record.kind == "rejection":  # reasons are error codes and routes the proxy's own: both bounded
            refusal = {"taskproxy.refusal.reason": row["reason"], "taskproxy.route": row["route"]}
            self._refusals.add(row.get("count", 1), refusal)
            return
        if record.kind != "event":
            return
        operation = OPERATIONS.get(row["route"])
        if operation is None:  # count_tokens, input_tokens: nothing generated
            return
        provider = PROVIDERS.get(row["provider"], row["provider"])
        team = self._team_label(row["team"])
        common = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider, "gen_ai.request.model": row["model"],
                  "gen_ai.response.model": row["upstream_model"], "taskproxy.team": team}  # fmt: skip
        failed = row["status"] >= 400 or row["error"] is not None
        error_type = (row["error"] or str(row["status"])) if failed else None
        attributes: dict[str, Any] = {
            **common,
            "gen_ai.request.stream": bool(row["stream"]),
            "gen_ai.usage.input_tokens": row["prompt_tokens"],
            "gen_ai.usage.output_tokens": row["completion_tokens"],
            "gen_ai.usage.cache_read.input_tokens": row["cached_tokens"],
            "gen_ai.usage.cache_creation.input_tokens": row["cache_write_tokens"],
            "gen_ai.usage.reasoning.output_tokens": row["reasoning_tokens"],
            "http.response.status_code": row["status"],
            "taskproxy.work_item": row["work_item"],
            "taskproxy.attribution_source": row["attribution_source"],
            "taskproxy.route": row["route"],
            "taskproxy.attempt": row["attempt"],
            "taskproxy.usage_source": row["usage_source"],
        }
        if row.get("response_id"):
            attributes["gen_ai.response.id"] = row["response_id"]
        if row["ttfb_ms"] is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = row["ttfb_ms"] / 1000
        if row["cost_nanos"] is not None:
            attributes["taskproxy.cost_usd"] = usd(row["cost_nanos"])
        if error_type is not None:
            attributes["error.type"] = error_type
        if self._include_person:
            attributes["taskproxy.owner"], attributes["taskproxy.key_id"] = row["owner"], row["key_id"]
        start = _nanos(row["ts"])
        span = self._tracer.start_span(f"{operation} {row['model']}", kind=self._kind, start_time=start, attributes=attributes)
        if error_type is not None:
            span.set_status(self._status(self._error, error_type))
        span.end(end_time=start + int(row["latency_ms"] * 1_000_000))
        # Metrics carry low-cardinality attributes only: never the work item (one series per item would grow without bound).
        self._tokens.record(row["prompt_tokens"], {**common, "gen_ai.token.type": "input"})
        self._tokens.record(row["completion_tokens"], {**common, "gen_ai.token.type": "output"})
        self._duration.record(row["latency_ms"] / 1000, {**common, "error.type": error_type} if error_type else common)

    def close(self) -> None:
        """Send what is still buffered, then stop the export threads."""
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
