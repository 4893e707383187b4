"""The tables. Times are naive UTC datetimes (SQLite keeps no zone); the API renders them with `Z`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, LargeBinary, PrimaryKeyConstraint, Text
from sqlmodel import Field, SQLModel


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_team", "team"),)  # a team's people are recounted when one of its keys changes

    id: str = Field(primary_key=True, max_length=32)
    key_hash: str = Field(index=True, unique=True, max_length=64)
    prefix: str = Field(max_length=16)  # first characters of the key, to recognise it in lists
    owner: str = Field(max_length=200)
    team: str | None = Field(default=None, max_length=200)
    role: str = Field(max_length=16)  # developer | service | admin
    created_at: datetime = Field(sa_type=DateTime())
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime())
    bound_work_item: str | None = Field(default=None, max_length=200)
    bound_until: datetime | None = Field(default=None, sa_type=DateTime())


class WorkItem(SQLModel, table=True):
    __tablename__ = "work_items"

    id: str = Field(primary_key=True, max_length=200)
    source: str = Field(max_length=16)  # jira | github | linear | manual | auto
    title: str | None = Field(default=None, sa_column=Column(Text))
    url: str | None = Field(default=None, sa_column=Column(Text))
    team: str | None = Field(default=None, max_length=200)
    status: str = Field(max_length=16, index=True)  # open | in_progress | done | closed | unverified
    created_at: datetime = Field(sa_type=DateTime())  # when the work was opened (the tracker's time if known)
    # When the item reached done or closed (cleared if it is reopened); cycle time = completed_at - created_at.
    completed_at: datetime | None = Field(default=None, sa_type=DateTime(), index=True)
    budget_tokens: int | None = Field(default=None, sa_type=BigInteger())
    budget_usd: float | None = None
    updated_at: datetime | None = Field(default=None, sa_type=DateTime(), index=True)  # the last change, by anyone (a process starts with the latest)
    # The tracker that last changed the item and the time its event carried: a tracker's events are
    # ordered only against that same tracker's earlier events (a local edit never makes one stale).
    tracker: str | None = Field(default=None, max_length=16)
    tracker_event_at: datetime | None = Field(default=None, sa_type=DateTime())
    merged_at: datetime | None = Field(default=None, sa_type=DateTime())  # a merged PR: its status is final
    # The size of the work, as its tracker last said (history in work_item_sizes): a PR's lines and files,
    # a ticket's story points (Jira's configured field) or estimate (Linear).
    lines_added: int | None = None
    lines_deleted: int | None = None
    files_changed: int | None = None
    points: float | None = None
    # Completed work that did not hold: a merged PR reverted within reports.rework_days, or an item reopened after done.
    reworked_at: datetime | None = Field(default=None, sa_type=DateTime(), index=True)
    rework_reason: str | None = Field(default=None, max_length=16)  # reverted | reopened
    rework_by: str | None = Field(default=None, max_length=200)  # the reverting PR, or the delivery that reopened it


class WorkItemSize(SQLModel, table=True):
    """Each size a tracker reported for a work item, in order (the item keeps the latest)."""

    __tablename__ = "work_item_sizes"

    id: str = Field(primary_key=True, max_length=32)
    work_item: str = Field(index=True, max_length=200)
    ts: datetime = Field(sa_type=DateTime())
    source: str = Field(max_length=16)
    delivery_id: str | None = Field(default=None, max_length=200)
    lines_added: int | None = None
    lines_deleted: int | None = None
    files_changed: int | None = None
    points: float | None = None


class WorkItemChange(SQLModel, table=True):
    """The status history of a work item: one row per change, whoever made it."""

    __tablename__ = "work_item_changes"

    id: str = Field(primary_key=True, max_length=32)
    work_item: str = Field(index=True, max_length=200)
    ts: datetime = Field(sa_type=DateTime(), index=True)  # the items changed since a moment (the adoption report)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str = Field(max_length=16)
    source: str = Field(max_length=16)  # api | cli | github | jira | linear
    delivery_id: str | None = Field(default=None, max_length=200)
    note: str | None = Field(default=None, sa_column=Column(Text))  # e.g. a tracker time in the future, clamped


class WorkItemLink(SQLModel, table=True):
    """A merged PR that names a ticket in its branch or title: the ticket's spend led to that PR."""

    __tablename__ = "work_item_links"

    work_item: str = Field(primary_key=True, max_length=200)  # the ticket, e.g. PROJ-123
    linked: str = Field(primary_key=True, max_length=200)  # the PR, e.g. acme/web#12
    kind: str = Field(max_length=16)  # merged_pr
    ts: datetime = Field(sa_type=DateTime())


class WebhookDelivery(SQLModel, table=True):
    """Deliveries already applied, by the tracker's delivery id: a redelivery changes nothing."""

    __tablename__ = "webhook_deliveries"

    tracker: str = Field(primary_key=True, max_length=16)
    delivery_id: str = Field(primary_key=True, max_length=200)
    received_at: datetime = Field(sa_type=DateTime())
    event: str = Field(max_length=64)
    outcome: str = Field(max_length=16)  # applied | ignored


class AuditEntry(SQLModel, table=True):
    """An admin read of per-key data."""

    __tablename__ = "audit_log"

    id: str = Field(primary_key=True, max_length=32)
    ts: datetime = Field(index=True, sa_type=DateTime())
    actor_key_id: str = Field(max_length=32)
    actor_owner: str = Field(max_length=200)
    action: str = Field(max_length=64)  # e.g. "GET /api/usage/events"
    target: str | None = Field(default=None, max_length=400)  # the query: which key, item, period


class UsageEvent(SQLModel, table=True):
    __tablename__ = "usage_events"
    __table_args__ = (
        Index("ix_usage_events_work_item_ts", "work_item", "ts"),
        Index("ix_usage_events_team_ts", "team", "ts"),
        Index("ix_usage_events_response_id", "response_id"),
        Index("ix_usage_events_key_id_ts", "key_id", "ts"),  # a key's events in a period (its page, the signals' cadence)
    )

    id: str = Field(primary_key=True, max_length=32)  # made on the request path: replays are idempotent
    ts: datetime = Field(index=True, sa_type=DateTime())  # when the request arrived
    key_id: str = Field(max_length=32)
    owner: str = Field(max_length=200)
    team: str | None = Field(default=None, max_length=200)
    work_item: str = Field(max_length=200)
    attribution_source: str = Field(max_length=16)  # header | body | branch | binding
    route: str = Field(max_length=64)
    model: str = Field(max_length=200)  # as the client asked
    upstream_model: str = Field(max_length=200)
    provider: str = Field(max_length=64)
    status: int  # HTTP status of this attempt (the client's, for the last attempt)
    attempt: int = 1  # 1 for every client request; 2, 3, ... for the fallbacks tried after it
    error: str | None = Field(default=None, max_length=64)  # upstream_error | upstream_timeout | client_disconnected | proxy_shutdown
    stream: bool
    prompt_tokens: int = Field(default=0, sa_type=BigInteger())  # cache reads and writes included
    completion_tokens: int = Field(default=0, sa_type=BigInteger())
    total_tokens: int = Field(default=0, sa_type=BigInteger())
    cached_tokens: int = Field(default=0, sa_type=BigInteger())  # prompt tokens read from the provider's cache
    cache_write_tokens: int = Field(default=0, sa_type=BigInteger())  # prompt tokens written to it (Anthropic)
    reasoning_tokens: int = Field(default=0, sa_type=BigInteger())
    est_prompt_tokens: int = Field(default=0, sa_type=BigInteger())
    usage_source: str = Field(max_length=16)  # provider | estimated (some field was not reported) | deferred (background: billed when read)
    estimated_fields: str | None = Field(default=None, max_length=64)  # which: "completion_tokens", "prompt_tokens,completion_tokens"
    provider_error: str | None = Field(default=None, max_length=64)  # the provider's error type, sent inside a stream
    cost_nanos: int | None = Field(default=None, sa_type=BigInteger())  # nano-USD (money.py); None: unknown price
    latency_ms: float
    ttfb_ms: float | None = None
    prompt_hash: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=400)
    prompt_text: str | None = Field(default=None, sa_column=Column(Text))  # only with recording.store_prompts
    completion_text: str | None = Field(default=None, sa_column=Column(Text))
    # The Responses API's id of the response this attempt created: a read of it by id goes to the same
    # model, for the same person (routes/stored.py).
    response_id: str | None = Field(default=None, max_length=200)


class _Sums(SQLModel):
    """The sums every usage rollup holds over the usage_events of its bucket and key columns, kept by the
    writer in the transaction that inserts the events (see storage/rollup.py, docs/reports.md)."""

    bucket: datetime = Field(sa_type=DateTime())  # the hour's or the day's start, naive UTC
    events: int  # attempts, as rows of usage_events
    ok_events: int  # of which status < 400
    requests: int  # first attempts, not counting count_tokens calls (what /api/usage calls requests)
    first_attempts: int  # first attempts, count_tokens included (kept up to date; no report reads it now)
    prompt_tokens: int = Field(sa_type=BigInteger())
    completion_tokens: int = Field(sa_type=BigInteger())
    total_tokens: int = Field(sa_type=BigInteger())
    cached_tokens: int = Field(sa_type=BigInteger())
    reasoning_tokens: int = Field(sa_type=BigInteger())
    cost_nanos: int | None = Field(default=None, sa_type=BigInteger())  # sum of the known prices; NULL when none is known, as SUM() answers
    unpriced_events: int  # events whose price is unknown
    first_ts: datetime = Field(sa_type=DateTime())  # the earliest and latest event: first/last use stay exact
    last_ts: datetime = Field(sa_type=DateTime())


class _UsageSums(_Sums):
    """The reports' rollups: per time bucket, work item, team and model."""

    work_item: str = Field(max_length=200)
    team: str = Field(max_length=200)  # '' for events without a team: a key column cannot be NULL
    model: str = Field(max_length=200)


class UsageHourly(_UsageSums, table=True):
    """Per UTC hour: the whole hours of a period that does not start or end on a day."""

    __tablename__ = "usage_hourly"
    __table_args__ = (
        PrimaryKeyConstraint("bucket", "work_item", "team", "model"),
        Index("ix_usage_hourly_work_item_bucket", "work_item", "bucket"),
    )


class UsageDaily(_UsageSums, table=True):
    """Per UTC day, and per person too, so that an item's people are counted from it."""

    __tablename__ = "usage_daily"
    __table_args__ = (
        PrimaryKeyConstraint("bucket", "work_item", "team", "model", "owner"),
        Index("ix_usage_daily_work_item_bucket", "work_item", "bucket"),
    )

    owner: str = Field(max_length=200)


class UsageTeamDaily(_Sums, table=True):
    """Per UTC day, team and model: what `/api/usage?group_by=team|model` reads for whole days (a few
    rows per team and day, where usage_daily has one per item and person)."""

    __tablename__ = "usage_team_daily"
    __table_args__ = (PrimaryKeyConstraint("bucket", "team", "model"),)

    team: str = Field(max_length=200)  # '' for events without a team
    model: str = Field(max_length=200)


class UsageKeyDaily(_Sums, table=True):
    """Per UTC day, key, work item and team: what the gaming signals read per key (spend per item, a
    completed item's spenders), so that they keep working when raw partitions are dropped."""

    __tablename__ = "usage_key_daily"
    __table_args__ = (
        PrimaryKeyConstraint("bucket", "key_id", "work_item", "team"),
        Index("ix_usage_key_daily_work_item_bucket", "work_item", "bucket"),
    )

    key_id: str = Field(max_length=32)
    work_item: str = Field(max_length=200)
    team: str = Field(max_length=200)  # '' for events without a team
    # The UTC hours of the day with a request: bit h set for a request in hour h. Kept so that the
    # machine-cadence signal knows a key's quiet hours without reading its events (OR merges it).
    request_hours: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class Rejection(SQLModel, table=True):
    """Requests refused before anything went upstream: counted, never forwarded. One row stands for
    `count` refusals of one reason, route and key within one minute (`ts`, the minute's start), so a
    flood of refusals writes a row a minute, not a row each."""

    __tablename__ = "rejections"

    id: str = Field(primary_key=True, max_length=32)
    ts: datetime = Field(index=True, sa_type=DateTime())
    key_id: str | None = Field(default=None, max_length=32)  # None when the key itself was refused
    reason: str = Field(max_length=32)  # the error code the client got
    route: str = Field(max_length=64)
    count: int = 1


class Change(SQLModel, table=True):
    """The change feed: one row per key or work item changed, written in the change's own transaction.
    Every process reads the rows after the last it has seen (by `seq`) and refreshes just those
    entries of its caches (storage/changes.py); old rows are pruned."""

    __tablename__ = "changes"
    __table_args__ = {"sqlite_autoincrement": True}  # never reuse a number, even once old rows are pruned

    seq: int | None = Field(default=None, sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True))
    kind: str = Field(max_length=8)  # key | item
    ref: str = Field(max_length=200)  # the key's id or the work item's id
    ts: datetime = Field(index=True, sa_type=DateTime())


class SpendCounter(SQLModel, table=True):
    """Spend per work item (lifetime, `period` '') and per team and calendar month (`period` 'YYYY-MM'),
    kept by the writer in the transaction that inserts the events: budgets read these by index, never
    the events. `updated_at` (the writer's clock) lets each process read only what changed."""

    __tablename__ = "spend_counters"
    __table_args__ = (PrimaryKeyConstraint("scope", "ref", "period"), Index("ix_spend_counters_updated_at", "updated_at"))

    scope: str = Field(max_length=8)  # item | team
    ref: str = Field(max_length=200)
    period: str = Field(max_length=7)
    tokens: int = Field(default=0, sa_type=BigInteger())
    cost_nanos: int = Field(default=0, sa_type=BigInteger())
    updated_at: datetime = Field(sa_type=DateTime())


class Lease(SQLModel, table=True):
    """What the replicas together have taken of a shared allowance in one window: a key's requests in
    one minute (`scope` 'rate:<key id>', `window` the minute; guard/ratelimit.py), an item's budget
    (`item:<id>`, window '') or a team's in one month (`team:<team>`, 'YYYY-MM'; guard/budgets.py), in
    tokens (`granted`) and nano-USD (`granted_nanos`). A replica takes a slice at a time, so the sum of
    the slices never exceeds the allowance; it gives back what it did not use when it stops."""

    __tablename__ = "leases"
    __table_args__ = (PrimaryKeyConstraint("scope", "window"), Index("ix_leases_window", "window"))

    scope: str = Field(max_length=240)
    window: str = Field(max_length=32)  # e.g. 2026-12-03T09:41
    granted: int = Field(default=0, sa_type=BigInteger())
    granted_nanos: int = Field(default=0, sa_type=BigInteger())


class ReportSnapshot(SQLModel, table=True):
    """The latest computation of a period report (the adoption report, the signals, the dashboard's
    overview) over the default period, kept with `reports.snapshot_minutes` so that reading it costs
    one row, not the report (reports/snapshots.py). One row per report and way of computing it (`name`:
    'adoption:<digest of the version and options>'); a process claims it (`claimed_until`,
    `claimed_by`) before computing, so one computes at a time."""

    __tablename__ = "report_snapshots"

    name: str = Field(primary_key=True, max_length=32)
    since: datetime | None = Field(default=None, sa_type=DateTime())  # the period the body covers; None until the first
    until: datetime | None = Field(default=None, sa_type=DateTime())
    computed_at: datetime | None = Field(default=None, sa_type=DateTime())  # when the computation ended
    seconds: float | None = None  # how long it took
    computed_by: str | None = Field(default=None, max_length=200)  # host and process id of the replica
    claimed_until: datetime | None = Field(default=None, sa_type=DateTime())  # a replica is computing it until then, at most
    claimed_by: str | None = Field(default=None, max_length=200)  # which (host and process id)
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary))  # the route's JSON answer, gzipped
