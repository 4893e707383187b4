"""The one settings object: what every key of the config means, its default and its bounds, frozen.

Everything the process needs to know about its configuration is in `Settings`. config.py reads it
from a YAML file and the environment, once, at the edge; nothing else reads the environment.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from taskproxy.money import MAX_BUDGET_TOKENS, MAX_BUDGET_USD

# Held in memory, each entry a few hundred bytes: ten million is already gigabytes per process.
MAX_CACHE_SIZE = 10_000_000
# A span of days the reports count back or forward with: a century; a longer one reaches past the calendar.
MAX_DAYS = 36_500
MAX_WORKERS = 256  # `server.workers`, `serve --workers`: processes on one host

DEFAULT_PROXY_URL = "http://127.0.0.1:8080"

DEFAULT_ID_PATTERNS = (
    r"[A-Z][A-Z0-9_]*-[0-9]+",  # Jira and Linear keys: PROJ-123, ENG-7
    r"[a-z0-9_.-]+/[a-z0-9_.-]+#[0-9]+",  # GitHub issues and PRs: owner/repo#123
    r"[a-z0-9_.-]+(?:/[a-z0-9_.-]+)+[#!][0-9]+",  # GitLab issues and merge requests: group/sub/project#7, !7
)
DEFAULT_BRANCH_PATTERNS = (r"(?i)(?:^|[/_.-])([a-z][a-z0-9_]*-[0-9]+)(?=$|[-_/])",)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Pricing(_Frozen):
    """Prices in USD per million tokens; overrides the bundled price table for one model."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)


# Providers whose API taskproxy relays byte for byte. Any other `provider` is one of litellm's
# provider names (azure, bedrock, vertex_ai, ollama, ...) and requests to it are translated.
OPENAI_COMPATIBLE = "openai"
ANTHROPIC = "anthropic"


class ModelSettings(_Frozen):
    name: str = Field(min_length=1)
    provider: str = OPENAI_COMPATIBLE
    base_url: str
    api_key_env: str | None = None
    upstream_model: str | None = None
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Longest silence allowed between two reads from the provider (first byte included).
    read_timeout_seconds: float = Field(default=600.0, gt=0)
    # Longest a stream may last in all, however steadily it trickles: then it ends with upstream_timeout.
    max_stream_seconds: float = Field(default=1800.0, gt=0)
    # Longest a non-streamed answer may take in all, from sending the request to its last byte.
    max_response_seconds: float = Field(default=600.0, gt=0)
    pricing: Pricing | None = None
    # Other configured models to try, in order, when this one fails before the first byte is sent
    # (connection error, timeout, 429, 5xx).
    fallbacks: tuple[str, ...] = ()
    # Extra keyword arguments for litellm when the request is translated (api_version, aws_region_name, ...).
    extra: dict[str, Any] = Field(default_factory=dict)
    # Filled from the environment variable named by api_key_env; never written in the file.
    api_key: SecretStr | None = Field(default=None, exclude=True)

    @property
    def target_model(self) -> str:
        return self.upstream_model or self.name

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class WorkItemSettings(_Frozen):
    mode: Literal["open", "known", "active"] = "open"
    patterns: tuple[str, ...] = DEFAULT_ID_PATTERNS
    branch_patterns: tuple[str, ...] = DEFAULT_BRANCH_PATTERNS
    binding_ttl_hours: float = Field(default=12.0, gt=0, le=MAX_DAYS * 24)
    # How often each process reads the change feed for items changed by other processes (statuses, budgets).
    refresh_seconds: float = Field(default=5.0, gt=0)
    # Work items each process holds in memory (the most recently used); others are looked up by id.
    cache_size: int = Field(default=20_000, gt=0, le=MAX_CACHE_SIZE)
    # The team of each tracker project's items, for the reports and signals: a Jira or Linear project
    # key (`PROJ`), a GitHub or GitLab repository (`acme/web`), case-insensitive. An item's team is the
    # one its tracker or an admin set, else its project's here, else the team that spent most on it.
    teams: dict[str, str] = Field(default_factory=dict)

    @field_validator("teams")
    @classmethod
    def _projects(cls, value: dict[str, str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for project, team in value.items():
            key = project.strip().casefold()
            if not key or not team.strip():
                raise ValueError("each project and its team must be named")
            if key in found:  # PAY and pay are one project: which team would it be?
                raise ValueError(f"the project {project.strip()!r} is named twice (names are case-insensitive)")
            found[key] = team.strip()
        return dict(sorted(found.items()))  # in one order: the reports' snapshots are named after their options

    @field_validator("patterns", "branch_patterns")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
        return value


class LimitSettings(_Frozen):
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    # All request headers together (names and values); larger gets 431 request_header_too_large.
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    # Proxied requests per key and calendar minute, across every process and replica (guard/ratelimit.py:
    # at most one tenth more per process); None: no limit.
    requests_per_minute: int | None = Field(default=None, gt=0)
    # A provider's non-streamed answer up to this size is kept whole (and sent with its length); a larger
    # one is relayed as it arrives, keeping only its ends for accounting, so no answer costs more memory.
    max_buffered_response_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # JSON values (objects, arrays, strings, numbers...) one request body may hold; more: 413. Decoding costs
    # memory per value, not per byte: 29 MiB of empty arrays took 1 GiB.
    max_json_nodes: int = Field(default=1_000_000, gt=0)
    # Bodies over 1 MiB are read and decoded at most this many at a time (the others wait their turn).
    max_concurrent_large_bodies: int = Field(default=2, gt=0)
    # Responses API WebSockets one key may have open at once; the next upgrade is refused with 429
    # rate_limited. Each open socket may hold a conversation and messages sent ahead (up to max_body_bytes
    # each), so this bounds what one key's sockets hold; None: only server.max_connections limits them.
    max_sockets_per_key: int | None = Field(default=8, gt=0)


class RecordingSettings(_Frozen):
    store_prompts: bool = False
    flush_interval_seconds: float = Field(default=0.25, gt=0, le=1.0)
    batch_size: int = Field(default=500, gt=0)
    spool_path: str = "taskproxy-spool.jsonl"
    # While neither the database nor the spool takes usage (a full disk during an outage), records are
    # held in memory; beyond this many, new requests are refused (503) rather than answered unrecorded.
    max_held_records: int = Field(default=100_000, gt=0)
    # Refused requests are counted in memory per minute, key, reason and route, and written this often
    # (one row per group each time): a flood of refusals costs the database a few rows a second.
    refusals_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # PostgreSQL: raw events (usage_events' monthly partitions) older than this many full months are
    # dropped; the rollups keep every report's sums. None: keep them all. SQLite keeps everything.
    retention_months: int | None = Field(default=None, ge=1)
    # A background response (Responses API, `background: true`) that no client has read back this long
    # after its create is read by the proxy itself, and billed once finished (background.py); then again
    # after twice as long each time it is unfinished, for up to a day. None: only clients' reads bill them.
    collect_background_after_seconds: float | None = Field(default=120.0, gt=0)


class AuthSettings(_Frozen):
    # How often each process reads the change feed for keys revoked or bound by other processes.
    key_refresh_seconds: float = Field(default=5.0, gt=0)
    # Keys each process holds in memory (the most recently used); others are looked up by their hash.
    key_cache_size: int = Field(default=20_000, gt=0, le=MAX_CACHE_SIZE)


class TrackerSettings(_Frozen):
    # The name of the environment variable holding the webhook secret. Unset: the webhook is off (404).
    secret_env: str | None = None
    secret: SecretStr | None = Field(default=None, exclude=True)
    # `taskproxy items sync`: the environment variable holding an API token (Jira: `email:api_token`, or a
    # personal access token), and the API's address (GitHub Enterprise, self-hosted GitLab; Jira: your site).
    token_env: str | None = None
    token: SecretStr | None = Field(default=None, exclude=True)
    api_url: str | None = None

    @field_validator("api_url")
    @classmethod
    def _over_tls(cls, value: str | None) -> str | None:
        """The token goes with every request: https, but to this machine (a tunnel, a test)."""
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1].rsplit(":", 1)[0].strip("[]").lower()
        if scheme.lower() == "https" or scheme.lower() == "http" and host in ("localhost", "127.0.0.1", "::1"):
            return value
        raise ValueError("must be an https:// URL (the API token is sent with every request), or http:// to this machine")


class JiraSettings(TrackerSettings):
    # The issue field holding story points (Jira Cloud: often customfield_10016); unset: no size from Jira.
    story_points_field: str | None = None


class LinearSettings(TrackerSettings):
    # Deliveries whose webhookTimestamp is further than this from now are refused (replays).
    timestamp_tolerance_seconds: float = Field(default=60.0, gt=0)


class TrackersSettings(_Frozen):
    # Branches besides a repository's default one whose merges count as completed work (shell patterns:
    # `develop`, `release/*`): a merge into any other branch is a stacked pull request, a step of the
    # work that lands with that branch's own pull request (README, "Stacked pull requests").
    landing_branches: tuple[str, ...] = ()
    github: TrackerSettings = TrackerSettings()

    @field_validator("landing_branches", mode="before")
    @classmethod
    def _patterns(cls, value: object) -> object:
        """One pattern is a list of one; a blank one, or one with spaces around it, would never match."""
        patterns = [value] if isinstance(value, str) else value
        if isinstance(patterns, (list, tuple)):
            for pattern in patterns:
                if isinstance(pattern, str) and (not pattern.strip() or pattern != pattern.strip()):
                    raise ValueError(f"{pattern!r} is not a branch pattern: give names such as develop or 'release/*', without spaces around them")
        return patterns
    gitlab: TrackerSettings = TrackerSettings()  # secret_env: the webhook's secret token
    jira: JiraSettings = JiraSettings()
    linear: LinearSettings = LinearSettings()


class TeamBudget(_Frozen):
    """A team's budget per calendar month (UTC)."""

    tokens: int | None = Field(default=None, ge=0, le=MAX_BUDGET_TOKENS)
    usd: float | None = Field(default=None, ge=0, le=MAX_BUDGET_USD)


class BudgetSettings(_Frozen):
    # Defaults for every work item without a budget of its own (set per item through the API).
    work_item_tokens: int | None = Field(default=None, ge=0, le=MAX_BUDGET_TOKENS)
    work_item_usd: float | None = Field(default=None, ge=0, le=MAX_BUDGET_USD)
    teams: dict[str, TeamBudget] = Field(default_factory=dict)
    # How often each process reads the spend counters changed since its last read (spend by other replicas).
    refresh_seconds: float = Field(default=10.0, gt=0)


class PrivacySettings(_Frozen):
    # Team figures are shown only for teams of at least this many people.
    min_group_size: int = Field(default=5, ge=1)


class SizeBands(_Frozen):
    """The adoption report's size bands: each list holds the bands' upper bounds (inclusive), in
    increasing order; above the last bound is one more band. An empty list is one band for all."""

    lines: tuple[int, ...] = (50, 200, 1000)  # lines changed (added + deleted) of a pull request
    points: tuple[float, ...] = (1, 3, 8)  # story points (Jira) or estimate (Linear) of a ticket

    @field_validator("lines", "points")
    @classmethod
    def _increasing(cls, bounds: tuple[float, ...]) -> tuple[float, ...]:
        if any(b < 0 for b in bounds) or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError("the bounds must be non-negative and strictly increasing, e.g. [50, 200, 1000]")
        return bounds


class ReportSettings(_Frozen):
    # An item still open this many days after it was created counts as spend without outcome.
    stale_after_days: float = Field(default=14.0, gt=0, le=MAX_DAYS)
    # A merged PR reverted within this many days of its merge is rework (marked on the item).
    rework_days: float = Field(default=14.0, gt=0, le=MAX_DAYS)
    # Bands of the adoption report's cost per completed item by size.
    size_bands: SizeBands = Field(default_factory=SizeBands)
    # Every this many minutes the serving processes compute the adoption report, the signals and the
    # dashboard's overview over the last 30 days, one process at a time, and keep the answers for
    # `?snapshot=latest` and the overview of the default period (0: off).
    snapshot_minutes: float = Field(default=0, ge=0)
    # PostgreSQL: the memory each sort or hash of a report's query may use before it spills to disk
    # (`SET LOCAL work_mem` in the report's own transaction; 0: the server's setting). The period
    # reports group millions of rollup rows; at the server's default 4 MB they spill. A hash may take
    # `hash_mem_multiplier` (2) times it, per step of a query, per report running (at most two per
    # process): the database server needs that room. PostgreSQL's own bound is 2,097,151 MB.
    work_mem_mb: int = Field(default=256, ge=0, le=2_097_151)
    # PostgreSQL: how long one query of a report may run (0: no limit). A report's transactions set
    # their own, whatever the server's or the role's `statement_timeout` (a DBA's guard for the serving
    # connections would end every report at an organisation's size), and are exempt from
    # `idle_in_transaction_session_timeout`: a report does its arithmetic between its queries.
    statement_timeout_seconds: float = Field(default=0, ge=0, le=2_147_483)  # PostgreSQL's bound (milliseconds in an int)


class TelemetrySettings(_Frozen):
    # OpenTelemetry spans and GenAI metrics over OTLP/HTTP (README, "OpenTelemetry"). Also on when
    # OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (and OTEL_SDK_DISABLED is not true).
    enabled: bool = False
    include_person: bool = False  # adds taskproxy.owner and taskproxy.key_id to spans
    service_name: str = "taskproxy"  # OTEL_SERVICE_NAME overrides


class ResponsesSettings(_Frozen):
    # The model a Responses API request without `model` goes to (the spec allows leaving it out, e.g.
    # with a stored `prompt`); unset, such a request is refused with a message naming what to send.
    default_model: str | None = None


class SignalSettings(_Frozen):
    """Gaming-signal thresholds (docs/signals.md)."""

    repeated_prompt_min_requests: int = Field(default=20, ge=1)
    after_completion_grace_hours: float = Field(default=1.0, ge=0, le=MAX_DAYS * 24)
    after_completion_min_requests: int = Field(default=10, ge=1)
    heavy_spend_min_usd: float = Field(default=50.0, ge=0)
    heavy_spend_max_completed_share: float = Field(default=0.1, ge=0, le=1)
    cadence_min_requests: int = Field(default=50, ge=3)
    cadence_max_cv: float = Field(default=0.2, ge=0)
    around_clock_min_hours: int = Field(default=20, ge=1, le=24)
    around_clock_min_days: int = Field(default=3, ge=1)
    cost_min_items: int = Field(default=5, ge=3)
    cost_min_z: float = Field(default=3.5, ge=0)
    cost_min_ratio: float = Field(default=3.0, ge=0)
    cost_min_key_share: float = Field(default=0.25, gt=0, le=1)
    unverified_min_share: float = Field(default=0.6, gt=0, le=1)
    unverified_min_usd: float = Field(default=10.0, ge=0)
    trivial_max_minutes: float = Field(default=10.0, ge=0)  # created (or first used by the key) to done within this: trivial
    trivial_max_lines: int = Field(default=10, ge=0)  # or a known size of at most this many changed lines
    trivial_max_tokens: int = Field(default=100, ge=0)  # or the key's AI use of it, all its tokens, at most this many (a tag); 0: off
    # or the item's AI use in all (every key's spend on it in the period) at most this share of the median cost of the
    # others' items completed in the period (the team's, given cost_min_items of them, else all teams'); 0: off
    trivial_max_cost_share: float = Field(default=0.01, ge=0, le=1)
    trivial_min_items: int = Field(default=5, ge=1)
    trivial_min_share: float = Field(default=0.6, gt=0, le=1)
    split_window_hours: float = Field(default=8.0, gt=0, le=MAX_DAYS * 24)  # small items completed this close together form a burst
    split_min_items: int = Field(default=4, ge=2)
    split_max_item_share: float = Field(default=0.5, gt=0, le=1)  # small: at most this share of the team's median size
    split_min_team_items: int = Field(default=5, ge=3)  # sized items the team needs for a median
    flag_service_keys: bool = False
    max_examples: int = Field(default=5, ge=1)


class ServerSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    # A connection must deliver a request's headers within this (from opening, or from starting its next
    # request), and the whole body within body_timeout_seconds after them; else 408 and it is closed.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    # A kept-alive connection idle this long after a response is closed.
    keep_alive_seconds: float = Field(default=5.0, gt=0)
    # A connection whose client reads nothing of its answer for this long (what was written stays
    # unsent) is cut, and the answer recorded as client_disconnected; a slow reader is waited for.
    send_timeout_seconds: float = Field(default=60.0, gt=0)
    # Open client connections per process; past it a new one gets 503 and is closed. None: half the
    # open-file limit (raised to its hard limit at start) after 128 kept for the proxy's own use.
    max_connections: int | None = Field(default=None, gt=0)
    # Connections open to one provider (host and port) per process; a request past it waits for one, up
    # to the model's connect_timeout_seconds (then 504). Each provider has its own: one that hangs holds
    # its own connections, not the others' (all providers shared one pool of 1,000 before).
    max_connections_per_provider: int = Field(default=1000, gt=0)
    # On SIGTERM: stop accepting, give answers in flight this long, then end the streams still open with
    # the route's error event, record them, drain the writer and exit.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)


class Settings(_Frozen):
    database_url: str = "sqlite:///taskproxy.db"

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        from sqlalchemy.engine import make_url  # the parser `make_engine` reads it with
        from sqlalchemy.exc import ArgumentError

        try:
            driver = make_url(value).drivername
        except ArgumentError:
            driver = None
        if driver not in ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg"):  # the drivers installed
            raise ValueError("taskproxy runs on SQLite (sqlite:///path.db) or PostgreSQL (postgresql://user@host:5432/name)")
        if driver.startswith("sqlite") and make_url(value).database in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite database is private to one connection: the proxy's writer, its workers and the "
                             "CLI would each see an empty one. Use a file: sqlite:///path.db")  # fmt: skip
        return value

    admin_key: SecretStr | None = Field(default=None, exclude=True)
    models: tuple[ModelSettings, ...] = ()
    work_items: WorkItemSettings = WorkItemSettings()
    limits: LimitSettings = LimitSettings()
    recording: RecordingSettings = RecordingSettings()
    auth: AuthSettings = AuthSettings()
    trackers: TrackersSettings = TrackersSettings()
    budgets: BudgetSettings = BudgetSettings()
    privacy: PrivacySettings = PrivacySettings()
    reports: ReportSettings = ReportSettings()
    signals: SignalSettings = SignalSettings()
    server: ServerSettings = ServerSettings()
    responses: ResponsesSettings = ResponsesSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        seen: set[str] = set()
        for index, model in enumerate(self.models):
            if model.name in seen:
                raise ValueError(f"models[{index}].name: {model.name!r} is configured twice")
            seen.add(model.name)
        for index, model in enumerate(self.models):
            for fallback in model.fallbacks:
                if fallback == model.name or fallback not in seen:
                    raise ValueError(f"models[{index}].fallbacks: {fallback!r} is not another configured model")
        default = self.responses.default_model
        if default is not None and (self.model(default) is None or self.model(default).provider != OPENAI_COMPATIBLE):  # type: ignore[union-attr]
            raise ValueError(f"responses.default_model: {default!r} is not a configured model whose provider is {OPENAI_COMPATIBLE!r}")
        return self

    def model(self, name: str) -> ModelSettings | None:
        return next((m for m in self.models if m.name == name), None)
