"""OpenTelemetry export, end to end: a real `taskproxy serve` configured only by the standard
OTEL_EXPORTER_OTLP_* variables sends its spans and GenAI metrics to an OTLP/HTTP receiver on
loopback, which decodes the protobuf it gets. Without an endpoint nothing is sent, and OpenTelemetry's
SDK is not even imported."""

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

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, running_server, wait_until, write_config

pytestmark = pytest.mark.serve


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
    models = [{"name": "gpt-4o-mini", "base_url": f"{upstream.url}/v1"}, {"name": "fake-500", "base_url": f"{upstream.url}/v1"}]
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
    assert not any("owner" in name or "key" in name or "user" in name for name in found), "the person left the proxy"
    assert (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6 == pytest.approx(event["latency_ms"], abs=0.01)
    assert {"service.name": "taskproxy"}.items() <= receiver.resources[-1].items()

    usage = wait_until(lambda: receiver.metrics.get("gen_ai.client.token.usage", []), bool, 10)
    points = [p for metric in usage for p in metric.histogram.data_points]
    types = {attributes(p)["gen_ai.token.type"] for p in points}
    assert types == {"input", "output"} and all("taskproxy.work_item" not in attributes(p) for p in points)
    assert wait_until(lambda: receiver.metrics.get("gen_ai.client.operation.duration", []), bool, 10)[0].unit == "s"


def test_a_failed_attempt_is_an_error_span(server: ServerProcess, receiver: Receiver) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "PROJ-72"})
    with pytest.raises(Exception):
        client.chat.completions.create(model="fake-500", messages=[{"role": "user", "content": "hi"}])
    [span] = spans_of(receiver, "PROJ-72", 1)
    assert span.status.code == span.status.STATUS_CODE_ERROR and attributes(span)["error.type"] == "500"


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
from taskproxy.settings import settings_from_mapping
settings = settings_from_mapping({"database_url": "sqlite:///%s"}, {})
app = create_app(settings)
async def main():
    async with app.router.lifespan_context(app):
        pass
asyncio.run(main())
print(settings.telemetry.enabled, "opentelemetry.sdk" in sys.modules)
""" % (tmp_path / "t.db")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]
