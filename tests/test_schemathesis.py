"""schemathesis against /api/openapi.json on a real `taskproxy serve`: generated and mutated requests
to every admin and self-service route never give a 5xx, and every error has the one JSON shape."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

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


OPERATIONS = [result.ok() for result in schema.get_all_operations()]


def _cases(operation: Any) -> st.SearchStrategy[schemathesis.Case]:
    """Requests as the document describes them, and mutated ones that break it."""
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        with contextlib.suppress(Exception):  # an operation with nothing to break has no negative cases
            strategies.append(operation.as_strategy(generation_mode=mode))
    return st.one_of(strategies)


# One test per operation, named after it (`GET /api/keys`): ids that differ, so that a parallel run
# schedules each one.
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.label)
def test_api_never_fails_and_errors_have_one_shape(operation: Any, server: ServerProcess) -> None:
    @given(case=_cases(operation))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and {"message", "type", "param", "code"} == set(body["error"]), body
        assert server.process.poll() is None

    check()
