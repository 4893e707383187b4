"""Shared fixtures: the proxy app in-process (httpx ASGI transport) on a fake provider.

The provider is the only thing faked: either `FakeProvider` (an OpenAI- and Anthropic-compatible ASGI
app, reached in-process through `MockProvider.asgi`) or a `MockProvider` handler, injected through
`create_app(provider=...)`; the relay code is the one production runs.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import openai
import pytest
from starlette.applications import Starlette

from taskproxy.app import create_app
from taskproxy.fake_provider import FakeProvider
from taskproxy.config import settings_from_mapping
from taskproxy.settings import Settings
from taskproxy.upstream.mock import MockProvider
from taskproxy.upstream.provider import ProviderClient

if TYPE_CHECKING:
    from serve_helpers import FakeUpstream

ADMIN_KEY = "tp-test-admin-key-0123456789"
PROVIDER_KEY = "sk-provider-secret"
PROVIDER_URL = "http://provider.test/v1"


def bundled_price_table() -> dict:
    """litellm's whole price table, parsed in full: the oracle for pricing.py's reader, which reads only the entries it needs."""
    import orjson

    from taskproxy.metering.pricing import bundled_price_file

    path = bundled_price_file()
    assert path is not None, "litellm's price table is not installed"
    return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def _locks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder all of a run's test processes share (pytest-xdist gives each a base folder below one root)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(autouse=True)
def _exclusive_or_shared(request: pytest.FixtureRequest, _locks: Path) -> Iterator[None]:
    """Tests marked `exclusive` (they measure latency) run with no other test beside them in the run's
    other processes; the rest share. A turnstile lets an exclusive test in before new shared ones."""
    import fcntl

    exclusive = request.node.get_closest_marker("exclusive") is not None
    with (_locks / "turnstile.lock").open("a") as turnstile, (_locks / "room.lock").open("a") as room:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if exclusive:
            fcntl.flock(room, fcntl.LOCK_EX)
        else:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(room, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(tmp_path: Path, provider_url: str = PROVIDER_URL, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'taskproxy.db'}",
        "models": [
            {"name": "gpt-4o-mini", "base_url": provider_url, "api_key_env": "TEST_PROVIDER_KEY"},
            {"name": "team-model", "base_url": provider_url, "api_key_env": "TEST_PROVIDER_KEY", "upstream_model": "gpt-4.1"},
            {"name": "unpriced", "base_url": provider_url, "upstream_model": "some-local-model"},
            {"name": "fake-500", "base_url": provider_url},
            {"name": "fake-cut", "base_url": provider_url},
            {"name": "fake-slow", "base_url": provider_url, "read_timeout_seconds": 0.3},
        ],
        "recording": {"spool_path": str(tmp_path / "spool.jsonl"), "flush_interval_seconds": 0.05, "refusals_interval_seconds": 0.05},
    }
    data.update(overrides)
    return settings_from_mapping(data, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TASKPROXY_ADMIN_KEY": ADMIN_KEY})


@dataclass
class Proxy:
    """A running app and clients for it."""

    app: Any
    http: httpx.AsyncClient
    fake: FakeProvider | None
    settings: Settings
    admin_headers: dict[str, str] = field(default_factory=lambda: {"authorization": f"Bearer {ADMIN_KEY}"})

    async def new_key(self, owner: str = "dana", team: str | None = "payments", role: str = "developer") -> str:
        response = await self.http.post("/api/keys", json={"owner": owner, "team": team, "role": role}, headers=self.admin_headers)
        assert response.status_code == 201, response.text
        return response.json()["key"]

    def openai(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url="http://proxy.test/v1", http_client=self.http, max_retries=0, **kwargs)

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.http.get(path, params=params, headers=self.admin_headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def events(self, expected: int, timeout: float = 3.0, **params: Any) -> list[dict]:
        """Poll the events API until `expected` events are visible (the writer commits in the background)."""
        return await wait_until(lambda: self.get("/api/usage/events", **params), lambda events: len(events) >= expected, timeout)

    async def item(self, item_id: str, requests: int, timeout: float = 3.0) -> dict:
        """Poll `GET /api/work-items/{id}` until it counts `requests` requests."""
        path = "/api/work-items/" + quote(item_id, safe="")

        async def fetch() -> dict:
            response = await self.http.get(path, headers=self.admin_headers)
            return response.json() if response.status_code == 200 else {"requests": 0}

        found = await wait_until(fetch, lambda i: i["requests"] >= requests, timeout)
        assert found["requests"] == requests, found
        return found

    @property
    def received(self) -> list[dict]:
        assert self.fake is not None
        return self.fake.received


async def wait_until(fetch: Callable[[], Any], done: Callable[[Any], bool] = bool, timeout: float = 3.0, what: str = "") -> Any:
    """Await `fetch()` until `done(value)`, and return that value; fail the test when `timeout` runs out first."""
    import anyio

    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'the awaited condition'} not reached within {timeout} s; last value: {value!r:.1000}")
        await anyio.sleep(0.02)


@contextlib.asynccontextmanager
async def in_process(app: Starlette, timeout: float = 10) -> AsyncIterator[httpx.AsyncClient]:
    """A client for `app` with its lifespan run as a server runs it: each request sees (a copy of) the
    state the lifespan yielded, as uvicorn gives it."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            await app({**scope, "state": dict(state or {})}, receive, send)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(with_state), base_url="http://proxy.test", timeout=timeout) as http:
            yield http


async def start_proxy(settings: Settings, provider: ProviderClient | None, fake: FakeProvider | None = None) -> AsyncIterator[Proxy]:
    app = create_app(settings, provider=provider)
    async with in_process(app) as http:
        yield Proxy(app=app, http=http, fake=fake, settings=settings)


POSTGRES_URL = os.environ.get("TASKPROXY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
HOW_TO_RUN_POSTGRES = (
    f"PostgreSQL is not reachable at {POSTGRES_URL}. Start a server there (trust auth, database 'test') or set "
    "TASKPROXY_TEST_POSTGRES_URL; `bash .ci/run` starts or installs one."
)


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL whose connections see a schema of their own, dropped afterwards.
    Skips (fails under CI, which promises the PostgreSQL suite runs) when no server answers."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1), connect_args={"connect_timeout": 3})
    schema = "tp_" + uuid.uuid4().hex[:12]
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError:
        admin.dispose()
        if os.environ.get("CI"):
            pytest.fail(HOW_TO_RUN_POSTGRES)
        pytest.skip(HOW_TO_RUN_POSTGRES)
    try:
        yield f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def read_only(url: str) -> str:
    """A PostgreSQL `url` whose every transaction is read-only, as on a standby after a failover."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    options = " ".join(filter(None, [parsed.query.get("options"), "-cdefault_transaction_read_only=on"]))  # type: ignore[list-item]
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite by default; `postgres` through indirect parametrization (see BOTH_DATABASES)."""
    if getattr(request, "param", "sqlite") == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'taskproxy.db'}"


# Runs a test on SQLite and on PostgreSQL.
BOTH_DATABASES = pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """The fake provider served on 127.0.0.1, for tests that start real `taskproxy serve` processes."""
    from serve_helpers import fake_upstream

    with fake_upstream() as running:
        yield running


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(slow_seconds=2.0)


@pytest.fixture
async def proxy(tmp_path: Path, fake: FakeProvider, database_url: str) -> AsyncIterator[Proxy]:
    settings = make_settings(tmp_path, database_url=database_url)
    async for running in start_proxy(settings, MockProvider.asgi(fake.app()), fake):
        yield running


@pytest.fixture
async def tracked(tmp_path: Path, fake: FakeProvider, database_url: str) -> AsyncIterator[Proxy]:
    """A proxy with all four trackers' webhooks on, their secrets those of `webhook_payloads`."""
    import webhook_payloads as hooks

    base = make_settings(tmp_path, database_url=database_url).model_dump(mode="json", exclude={"admin_key"})
    for model in base["models"]:
        model.pop("api_key", None)
    base["trackers"] = {"github": {"secret_env": "GH"}, "jira": {"secret_env": "JIRA", "story_points_field": "customfield_10016"}, "linear": {"secret_env": "LINEAR", "timestamp_tolerance_seconds": 60},
                        "gitlab": {"secret_env": "GL"}}  # fmt: skip
    env = {"GH": hooks.GITHUB_SECRET, "JIRA": hooks.JIRA_SECRET, "LINEAR": hooks.LINEAR_SECRET, "GL": hooks.GITLAB_TOKEN, "TASKPROXY_ADMIN_KEY": ADMIN_KEY,
           "TEST_PROVIDER_KEY": PROVIDER_KEY}  # fmt: skip
    async for running in start_proxy(settings_from_mapping(base, env), MockProvider.asgi(fake.app()), fake):
        yield running
