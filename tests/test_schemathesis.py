"""schemathesis against /api/openapi.json on a real `taskproxy serve`: generated and mutated requests
to every admin and self-service route never give a 5xx, and every error has the one JSON shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, running_server, write_config
from taskproxy.routes.openapi import openapi_document

pytestmark = pytest.mark.serve
schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("schemathesis")
    with running_server(write_config(folder, upstream.url), folder / "server.log") as running:
        running.http.post("/api/work-items", json={"id": "SEED-1", "title": "seed"}, headers=running.admin_headers)
        yield running


def test_the_served_document_is_the_one_tested(server: ServerProcess) -> None:
    assert server.http.get("/api/openapi.json").json() == openapi_document()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_errors_have_one_shape(case: schemathesis.Case, server: ServerProcess) -> None:
    response = case.call(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} == set(body["error"]), body
    assert server.process.poll() is None
