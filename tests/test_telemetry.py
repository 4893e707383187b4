"""OpenTelemetry export, end to end: a real `taskproxy serve` configured only by the standard
OTEL_EXPORTER_OTLP_* variables sends its spans and GenAI metrics to an OTLP/HTTP receiver on
loopback, which decodes the protobuf it gets. Without an endpoint nothing is sent, and nothing of
OpenTelemetry is even imported; the environment rules that turn it on and off are checked on the settings."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, wait_until, write_config
from taskproxy.fake_provider import OVERLOADED_CACHE_READ
from taskproxy.config import settings_from_mapping
from taskproxy.errors import ConfigError

ENDPOINT = "http://collector.example:4318"


@dataclass
class Receiver:
    url: str
    spans: list[Any] = field(default_factory=list)
    metrics: dict[str, list[Any]] = field(default_factory=dict)
    resources: list[dict] = field(default_factory=list)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(item: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in item.attributes}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    found.resources.append(attributes(resource_spans.resource))
                    for scope in resource_spans.scope_spans:
                        found.spans.extend(scope.spans)
            elif self.path == "/v1/metrics":
                metrics_request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in metrics_request.resource_metrics:
                    for scope in resource_metrics.scope_metrics:
                        for metric in scope.metrics:
                            found.metrics.setdefault(metric.name, []).append(metric)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    found.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield found
    server.shutdown()


def start(upstream: FakeUpstream, folder: Path, **env: str) -> Any:
    models = [
        {"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"}, {"name": "fake-500", "base_url": f"{upstream.url}/v1"},
        {"name": "claude-overloaded", "provider": "anthropic", "base_url": upstream.url, "upstream_model": "fake-overloaded"},
    ]  # fmt: skip
    config = write_config(folder, upstream.url, models=models, privacy={"min_group_size": 1})
    return running_server(config, folder / "server.log", env=child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY, **env))


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
    with start(upstream, tmp_path_factory.mktemp("otel"), **otel) as running:
        yield running


def spans_of(receiver: Receiver, work_item: str, count: int) -> list[Any]:
    return wait_until(lambda: [s for s in receiver.spans if attributes(s).get("taskproxy.work_item") == work_item],
                      lambda found: len(found) >= count, 10)  # fmt: skip


@pytest.mark.serve
def test_each_attempt_is_a_span_with_the_genai_names_and_the_recorded_usage(server: ServerProcess, receiver: Receiver) -> None:
    client = server.openai(server.new_key(owner="dana", team="payments"), default_headers={"X-Work-Item": "PROJ-71"})
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
    [span] = spans_of(receiver, "PROJ-71", 1)
    [event] = server.events("PROJ-71", 1)

    found = attributes(span)
    assert span.name == "chat gpt-4o-mini" and span.kind == span.SPAN_KIND_CLIENT
    assert found["gen_ai.operation.name"] == "chat" and found["gen_ai.provider.name"] == "openai"
    assert found["gen_ai.request.model"] == "gpt-4o-mini" and found["gen_ai.response.model"] == "gpt-4o-mini"
    assert found["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens == event["prompt_tokens"]
    assert found["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens == event["completion_tokens"]
    assert found["gen_ai.usage.cache_read.input_tokens"] == 0 and found["http.response.status_code"] == 200
    assert (found["taskproxy.team"], found["taskproxy.attribution_source"]) == ("payments", "header")
    assert found["taskproxy.cost_usd"] == event["cost_usd"] and found["taskproxy.route"] == "/v1/chat/completions"
    assert "error.type" not in found and span.status.code != span.status.STATUS_CODE_ERROR
    assert not any("owner" in name or "key" in name or "user" in name for name in found), "the person left the proxy"
    assert (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6 == pytest.approx(event["latency_ms"], abs=0.01)
    assert {"service.name": "taskproxy"}.items() <= receiver.resources[-1].items()

    usage = wait_until(lambda: receiver.metrics.get("gen_ai.client.token.usage", []), bool, 10)
    points = [p for metric in usage for p in metric.histogram.data_points]
    types = {attributes(p)["gen_ai.token.type"] for p in points}
    assert types == {"input", "output"} and all("taskproxy.work_item" not in attributes(p) for p in points)
    assert wait_until(lambda: receiver.metrics.get("gen_ai.client.operation.duration", []), bool, 10)[0].unit == "s"


@pytest.mark.serve
def test_a_failed_attempt_is_an_error_span(server: ServerProcess, receiver: Receiver) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "PROJ-72"})
    with pytest.raises(Exception):
        client.chat.completions.create(model="fake-500", messages=[{"role": "user", "content": "hi"}])
    [span] = spans_of(receiver, "PROJ-72", 1)
    assert span.status.code == span.status.STATUS_CODE_ERROR and attributes(span)["error.type"] == "500"


@pytest.mark.serve
def test_an_anthropic_attempt_carries_its_cache_reads_inside_the_input_tokens(server: ServerProcess, receiver: Receiver) -> None:
    key, ask = server.new_key(), [{"role": "user", "content": "hi"}]
    client = anthropic.Anthropic(base_url=server.url, api_key=key, default_headers={"X-Work-Item": "PROJ-74"}, max_retries=0)
    with pytest.raises(anthropic.APIStatusError):  # the fake streams message_start (with cache reads), then overloaded_error
        with client.messages.stream(model="claude-overloaded", max_tokens=20, messages=ask) as stream:
            stream.get_final_message()
    [span] = spans_of(receiver, "PROJ-74", 1)
    [event] = server.events("PROJ-74", 1)

    found = attributes(span)
    assert span.name == "chat claude-overloaded" and found["gen_ai.operation.name"] == "chat"
    assert found["gen_ai.provider.name"] == "anthropic" and found["gen_ai.response.model"] == "fake-overloaded"
    assert found["gen_ai.usage.cache_read.input_tokens"] == event["cached_tokens"] == OVERLOADED_CACHE_READ
    assert found["gen_ai.usage.input_tokens"] == event["prompt_tokens"] > OVERLOADED_CACHE_READ  # cache reads included
    assert found["gen_ai.usage.cache_creation.input_tokens"] == 0 and found["gen_ai.request.stream"] is True
    assert found["error.type"] == event["error"] == "upstream_error" and span.status.code == span.status.STATUS_CODE_ERROR


@pytest.mark.serve
def test_a_refusal_is_counted_and_has_no_span(server: ServerProcess, receiver: Receiver) -> None:
    client = server.openai(server.new_key())
    with pytest.raises(openai.BadRequestError) as refused_with:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "no ticket"}])
    assert refused_with.value.code == "work_item_required"

    expected = {"taskproxy.refusal.reason": "work_item_required", "taskproxy.route": "/v1/chat/completions"}

    def refused() -> int:
        points = [p for metric in receiver.metrics.get("taskproxy.refusals", []) for p in metric.sum.data_points]
        return sum(p.as_int for p in points if attributes(p) == expected)

    assert wait_until(refused, bool, 10) >= 1
    assert receiver.metrics["taskproxy.refusals"][-1].unit == "{request}"


@pytest.mark.serve
def test_the_person_is_sent_only_when_an_admin_turns_it_on(upstream: FakeUpstream, receiver: Receiver, tmp_path: Path) -> None:
    folder = tmp_path / "person"
    folder.mkdir()
    config = write_config(folder, upstream.url, models=[{"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"}],
                          telemetry={"include_person": True, "service_name": "proxy-eu"})  # fmt: skip
    env = child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100")
    with running_server(config, folder / "server.log", env=env) as server:
        client = server.openai(server.new_key(owner="lee"), default_headers={"X-Work-Item": "PROJ-73"})
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        [span] = spans_of(receiver, "PROJ-73", 1)
    assert attributes(span)["taskproxy.owner"] == "lee"


def test_without_an_endpoint_nothing_is_sent_and_the_sdk_is_not_loaded(tmp_path: Path) -> None:
    code = """
import asyncio, sys
from taskproxy.app import create_app
from taskproxy.config import settings_from_mapping
settings = settings_from_mapping({"database_url": "sqlite:///%s"}, {})
app = create_app(settings)
async def main():
    async with app.router.lifespan_context(app):
        pass
asyncio.run(main())
print(settings.telemetry.enabled, any(name.startswith("opentelemetry") for name in sys.modules))
""" % (tmp_path / "t.db")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]


@pytest.mark.parametrize(
    ("config", "env", "enabled"),
    [
        ({}, {}, False),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, True),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"enabled": True}, {}, True),
        ({"enabled": False}, {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),  # the config's explicit word wins
        ({"enabled": True}, {"OTEL_SDK_DISABLED": "true"}, False),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": " TRUE "}, False),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_the_standard_variables_turn_export_on_and_off(config: dict, env: dict[str, str], enabled: bool) -> None:
    document = {"telemetry": config} if config else {}
    assert settings_from_mapping(document, env).telemetry.enabled is enabled


def test_the_person_is_off_by_default_and_the_service_is_named_by_otel_service_name() -> None:
    telemetry = settings_from_mapping({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}).telemetry
    assert (telemetry.include_person, telemetry.service_name) == (False, "taskproxy")
    named = settings_from_mapping({"telemetry": {"service_name": "proxy-eu"}}, {"OTEL_SERVICE_NAME": "proxy-us"}).telemetry
    assert named.service_name == "proxy-us"
    with pytest.raises(ConfigError, match="telemetry.include_peron: unknown key"):
        settings_from_mapping({"telemetry": {"include_peron": True}}, {})
