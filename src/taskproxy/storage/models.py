"""The tables. Times are naive UTC datetimes (SQLite keeps no zone); the API renders them with `Z`.

They are SQLAlchemy Core tables, and every query is Core: the ORM and SQLModel cost a serving
process 8.7 MiB of resident memory for mapping rows to objects nothing needed (docs/scale-runs.md). Each
table is also reachable by a name that reads as its rows (`ApiKey`), whose attributes are its columns
(`ApiKey.id == key_id`) and whose `__table__` is the table.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()


class Rows:
    """A table's columns as attributes, as the queries name them; `__table__` is the table."""

    def __init__(self, table: Table) -> None:
        self.__table__ = table
        for column in table.columns:
            setattr(self, column.name, column)

    def __clause_element__(self) -> Table:  # select(ApiKey), update(ApiKey), select_from(ApiKey): the table
        return self.__table__

    def __getattr__(self, name: str) -> Column[Any]:  # for type checkers: the columns set above
        raise AttributeError(f"table {self.__table__.name} has no column {name!r}")


def _text(name: str, length: int, *, null: bool = False, **kwargs: Any) -> Column[Any]:
    return Column(name, String(length), nullable=null, **kwargs)


def _time(name: str, *, null: bool = False, **kwargs: Any) -> Column[Any]:
    return Column(name, DateTime(), nullable=null, **kwargs)


def _big(name: str, *, null: bool = False, default: int | None = None) -> Column[Any]:
    return Column(name, BigInteger(), nullable=null, default=default)


def _int(name: str, *, null: bool = False, default: int | None = None) -> Column[Any]:
    return Column(name, Integer(), nullable=null, default=default)


def _float(name: str, *, null: bool = False) -> Column[Any]:
    return Column(name, Float(), nullable=null)


ApiKey = Rows(Table(
    "api_keys", metadata,
    _text("id", 32, primary_key=True),
    _text("key_hash", 64, index=True, unique=True),
    _text("prefix", 16),  # first characters of the key, to recognise it in lists
    _text("owner", 200),  # in one form: privacy.owner_name
    _text("person", 800),  # the person it names, case aside (privacy.person_of: folding can triple a name): what the privacy floor counts
    _text("team", 200, null=True),
    _text("role", 16),  # developer | service | admin
    _time("created_at"),
    _time("revoked_at", null=True),
    _text("bound_work_item", 200, null=True),
    _time("bound_until", null=True),
    Index("ix_api_keys_team", "team"),  # a team's people are recounted when one of its keys changes
))  # fmt: skip

WorkItem = Rows(Table(
    "work_items", metadata,
    _text("id", 200, primary_key=True),
    _text("source", 16),  # jira | github | linear | manual | auto
    Column("title", Text, nullable=True),
    Column("url", Text, nullable=True),
    _text("team", 200, null=True),
    _text("status", 16, index=True),  # open | in_progress | done | closed | unverified
    _time("created_at"),  # when the work was opened (the tracker's time if known)
    # When the item reached done or closed (cleared if it is reopened); cycle time = completed_at - created_at.
    _time("completed_at", null=True, index=True),
    _big("budget_tokens", null=True),
    _float("budget_usd", null=True),
    _time("updated_at", null=True, index=True),  # the last change, by anyone (a process starts with the latest)
    # The tracker that last changed the item and the time its event carried: a tracker's events are
    # ordered only against that same tracker's earlier events (a local edit never makes one stale).
    _text("tracker", 16, null=True),
    _time("tracker_event_at", null=True),
    _time("merged_at", null=True),  # a merged PR: its status is final
    # A pull request's source branch, and the branch it was merged into when that is not its repository's
    # default one (a stacked pull request: a step of the work, which lands with the pull request of that
    # branch; stacks.py). Both are matched within the pull request's repository (0023).
    _text("branch", 200, null=True, index=True),
    _text("merged_into", 200, null=True, index=True),
    # The size of the work, as its tracker last said (history in work_item_sizes): a PR's lines and files,
    # a ticket's story points (Jira's configured field) or estimate (Linear).
    _int("lines_added", null=True),
    _int("lines_deleted", null=True),
    _int("files_changed", null=True),
    _float("points", null=True),
    # Completed work that did not hold: a merged PR reverted within reports.rework_days, or an item reopened or closed after done.
    _time("reworked_at", null=True, index=True),
    _text("rework_reason", 16, null=True),  # reverted | reopened
    _text("rework_by", 200, null=True),  # the reverting PR, or the delivery that reopened it
    Index("ix_work_items_created_at_id", "created_at", "id"),  # GET /api/work-items: newest first, a page at a time (0018)
))  # fmt: skip

# Each size a tracker reported for a work item, in order (the item keeps the latest).
WorkItemSize = Rows(Table(
    "work_item_sizes", metadata,
    _text("id", 32, primary_key=True),
    _text("work_item", 200, index=True),
    _time("ts"),
    _text("source", 16),
    _text("delivery_id", 200, null=True),
    _int("lines_added", null=True),
    _int("lines_deleted", null=True),
    _int("files_changed", null=True),
    _float("points", null=True),
))  # fmt: skip

# The status history of a work item: one row per change, whoever made it.
WorkItemChange = Rows(Table(
    "work_item_changes", metadata,
    _text("id", 32, primary_key=True),
    _text("work_item", 200, index=True),
    _time("ts", index=True),  # the items changed since a moment (the adoption report)
    _text("from_status", 16, null=True),
    _text("to_status", 16),
    _text("source", 16),  # api | cli | github | jira | linear
    _text("delivery_id", 200, null=True),
    Column("note", Text, nullable=True),  # e.g. a tracker time in the future, clamped
))  # fmt: skip

# A merged PR that names a ticket in its branch or title: the ticket's spend led to that PR.
WorkItemLink = Rows(Table(
    "work_item_links", metadata,
    _text("work_item", 200, primary_key=True),  # the ticket, e.g. PROJ-123
    _text("linked", 200, primary_key=True),  # the PR, e.g. acme/web#12
    _text("kind", 16),  # merged_pr; reverted_by (the PR, its revert: a revert that arrived before the merge)
    _time("ts"),
    Index("ix_work_item_links_linked", "linked"),  # the tickets a PR came out of: its revert, its page (0022)
))  # fmt: skip

# Deliveries already applied, by the tracker's delivery id: a redelivery changes nothing.
WebhookDelivery = Rows(Table(
    "webhook_deliveries", metadata,
    _text("tracker", 16, primary_key=True),
    _text("delivery_id", 200, primary_key=True),
    _time("received_at"),
    _text("event", 64),
    _text("outcome", 16),  # applied | ignored
))  # fmt: skip

# An admin read of per-key data.
AuditEntry = Rows(Table(
    "audit_log", metadata,
    _text("id", 32, primary_key=True),
    _time("ts", index=True),
    _text("actor_key_id", 32),
    _text("actor_owner", 200),
    _text("action", 64),  # e.g. "GET /api/usage/events"
    _text("target", 400, null=True),  # the query: which key, item, period
))  # fmt: skip

_HAS_RESPONSE_ID = text("response_id IS NOT NULL")

UsageEvent = Rows(Table(
    "usage_events", metadata,
    _text("id", 32, primary_key=True),  # made on the request path: replays are idempotent
    _time("ts", index=True),  # when the request arrived
    _text("key_id", 32),
    _text("owner", 200),
    _text("team", 200, null=True),
    _text("work_item", 200),
    _text("attribution_source", 16),  # header | body | branch | binding
    _text("route", 64),
    _text("model", 200),  # as the client asked
    _text("upstream_model", 200),
    _text("provider", 64),
    _int("status"),  # HTTP status of this attempt (the client's, for the last attempt)
    _int("attempt", default=1),  # 1 for every client request; 2, 3, ... for the fallbacks tried after it
    _text("error", 64, null=True),  # upstream_error | upstream_timeout | client_disconnected | proxy_shutdown
    Column("stream", Boolean(), nullable=False),
    _big("prompt_tokens", default=0),  # cache reads and writes included
    _big("completion_tokens", default=0),
    _big("total_tokens", default=0),
    _big("cached_tokens", default=0),  # prompt tokens read from the provider's cache
    _big("cache_write_tokens", default=0),  # prompt tokens written to it (Anthropic)
    _big("reasoning_tokens", default=0),
    _big("est_prompt_tokens", default=0),
    _text("usage_source", 16),  # provider | estimated (some field was not reported) | deferred (background: billed when read)
    _text("estimated_fields", 64, null=True),  # which: "completion_tokens", "prompt_tokens,completion_tokens"
    _text("provider_error", 64, null=True),  # the provider's error type, sent inside a stream
    _big("cost_nanos", null=True),  # nano-USD (money.py); None: unknown price
    _float("latency_ms"),
    _float("ttfb_ms", null=True),
    _text("prompt_hash", 64, null=True),
    _text("user_agent", 400, null=True),
    Column("prompt_text", Text, nullable=True),  # only with recording.store_prompts
    Column("completion_text", Text, nullable=True),
    # The Responses API's id of the response this attempt created: a read of it by id goes to the same
    # model, for the same person (routes/stored.py).
    _text("response_id", 200, null=True),
    Index("ix_usage_events_work_item_ts", "work_item", "ts"),
    # Only the events with a response id: the one query on it asks for an id (migration 0016).
    Index("ix_usage_events_response_id", "response_id", postgresql_where=_HAS_RESPONSE_ID, sqlite_where=_HAS_RESPONSE_ID),
    Index("ix_usage_events_key_id_ts", "key_id", "ts"),  # a key's events in a period (its page, the signals' cadence)
))  # fmt: skip


def _sums(*, bucket: bool = True) -> list[Column[Any]]:
    """The sums every usage rollup holds over the usage_events of its bucket and key columns, kept by the
    writer in the transaction that inserts the events (see storage/rollup.py, docs/reports.md)."""
    return [
        *([_time("bucket")] if bucket else []),  # the hour's or the day's start, naive UTC
        _int("events"),  # attempts, as rows of usage_events
        _int("ok_events"),  # of which status < 400
        # Of those, token counts (count_tokens calls: nothing generated), so that an item is AI-assisted by
        # an answer, not by counting tokens (reports/adoption.py); filled from the raw events by 0017.
        Column("ok_token_counts", Integer(), nullable=False, server_default="0"),
        _int("requests"),  # first attempts, not counting count_tokens calls (what /api/usage calls requests)
        _int("first_attempts"),  # first attempts, count_tokens included (kept up to date; no report reads it now)
        _big("prompt_tokens"),
        _big("completion_tokens"),
        _big("total_tokens"),
        _big("cached_tokens"),
        _big("reasoning_tokens"),
        _big("cost_nanos", null=True),  # sum of the known prices; NULL when none is known, as SUM() answers
        _int("unpriced_events"),  # events whose price is unknown
        _time("first_ts"),  # the earliest and latest event: first/last use stay exact
        _time("last_ts"),
    ]


def _usage_keys() -> list[Column[Any]]:
    """The reports' rollups: per time bucket, work item, team and model."""
    return [
        _text("work_item", 200),
        _text("team", 200),  # '' for events without a team: a key column cannot be NULL
        _text("model", 200),
    ]


# Per UTC hour: the whole hours of a period that does not start or end on a day.
UsageHourly = Rows(Table(
    "usage_hourly", metadata,
    *_sums(), *_usage_keys(),
    PrimaryKeyConstraint("bucket", "work_item", "team", "model"),
    Index("ix_usage_hourly_work_item_bucket", "work_item", "bucket"),
))  # fmt: skip

# Per UTC day, and per person too, so that an item's people are counted from it.
UsageDaily = Rows(Table(
    "usage_daily", metadata,
    *_sums(), *_usage_keys(),
    _text("owner", 200),
    PrimaryKeyConstraint("bucket", "work_item", "team", "model", "owner"),
    Index("ix_usage_daily_work_item_bucket", "work_item", "bucket"),
))  # fmt: skip

# Per UTC day, team and model: what `/api/usage?group_by=team|model` reads for whole days (a few
# rows per team and day, where usage_daily has one per item and person).
UsageTeamDaily = Rows(Table(
    "usage_team_daily", metadata,
    *_sums(),
    _text("team", 200),  # '' for events without a team
    _text("model", 200),
    PrimaryKeyConstraint("bucket", "team", "model"),
))  # fmt: skip

# All time, per work item, team and model: an item's lifetime usage, read by index (the adoption report's
# completed items, an item's spending team) where the daily rollup would be scanned across its history.
UsageItemTotals = Rows(Table(
    "usage_item_totals", metadata,
    *_sums(bucket=False), *_usage_keys(),
    # The first answer that generated something (status < 400, not a token count): when AI use on the
    # item began, which the adoption report compares with its completion (0019; NULL: none, or only in
    # raw partitions dropped before 0019).
    _time("first_answered_ts", null=True),
    PrimaryKeyConstraint("work_item", "team", "model"),
))  # fmt: skip

# Per UTC day, key, work item and team: what the gaming signals read per key (spend per item, a
# completed item's spenders), so that they keep working when raw partitions are dropped.
UsageKeyDaily = Rows(Table(
    "usage_key_daily", metadata,
    *_sums(),
    _text("key_id", 32),
    _text("work_item", 200),
    _text("team", 200),  # '' for events without a team
    # The UTC hours of the day with a request: bit h set for a request in hour h. Kept so that the
    # machine-cadence signal knows a key's quiet hours without reading its events (OR merges it).
    Column("request_hours", Integer(), nullable=False, default=0, server_default="0"),
    PrimaryKeyConstraint("bucket", "key_id", "work_item", "team"),
    Index("ix_usage_key_daily_work_item_bucket", "work_item", "bucket"),
    Index("ix_usage_key_daily_key_id_bucket", "key_id", "bucket"),  # a key's own usage, all time (0020)
))  # fmt: skip

# Requests refused before anything went upstream: counted, never forwarded. One row stands for
# `count` refusals of one reason, route and key within one minute (`ts`, the minute's start), so a
# flood of refusals writes a row a minute, not a row each.
Rejection = Rows(Table(
    "rejections", metadata,
    _text("id", 32, primary_key=True),
    _time("ts", index=True),
    _text("key_id", 32, null=True),  # None when the key itself was refused
    _text("reason", 32),  # the error code the client got
    _text("route", 64),
    Column("count", Integer(), nullable=False, default=1, server_default="1"),  # as migration 0003 made it
    Index("ix_rejections_key_id_ts", "key_id", "ts"),  # a key's own refusals (0020)
))  # fmt: skip

# The change feed: one row per key or work item changed, written in the change's own transaction.
# Every process reads the rows after the last it has seen (by `seq`) and refreshes just those
# entries of its caches (storage/changes.py); old rows are pruned.
Change = Rows(Table(
    "changes", metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    _text("kind", 8),  # key | item
    _text("ref", 200),  # the key's id or the work item's id
    _time("ts", index=True),
    sqlite_autoincrement=True,  # never reuse a number, even once old rows are pruned
))  # fmt: skip

# Spend per work item (lifetime, `period` '') and per team and calendar month (`period` 'YYYY-MM'),
# kept by the writer in the transaction that inserts the events: budgets read these by index, never
# the events. `updated_at` (the writer's clock) lets each process read only what changed.
SpendCounter = Rows(Table(
    "spend_counters", metadata,
    _text("scope", 8),  # item | team
    _text("ref", 200),
    _text("period", 7),
    _big("tokens", default=0),
    _big("cost_nanos", default=0),
    _time("updated_at"),
    PrimaryKeyConstraint("scope", "ref", "period"),
    Index("ix_spend_counters_updated_at", "updated_at"),
))  # fmt: skip

# What the replicas together have taken of a shared allowance in one window: a key's requests in
# one minute (`scope` 'rate:<key id>', `window` the minute; guard/ratelimit.py), an item's budget
# (`item:<id>`, window '') or a team's in one month (`team:<team>`, 'YYYY-MM'; guard/budgets.py), in
# tokens (`granted`) and nano-USD (`granted_nanos`). A replica takes a slice at a time, so the sum of
# the slices never exceeds the allowance; it gives back what it did not use when it stops.
Lease = Rows(Table(
    "leases", metadata,
    _text("scope", 240),
    _text("window", 32),  # e.g. 2026-12-03T09:41
    _big("granted", default=0),
    _big("granted_nanos", default=0),
    PrimaryKeyConstraint("scope", "window"),
    Index("ix_leases_window", "window"),
))  # fmt: skip

# The background responses (Responses API, `background: true`) whose usage is not recorded yet: the
# writer adds one with its deferred create and removes it with its usage, so this holds only what is
# still owed. The proxy reads each from the provider itself when no client read it back
# (upstream/collector.py); `next_check` is when, and a replica claims one by moving it on.
BackgroundResponse = Rows(Table(
    "background_responses", metadata,
    _text("response_id", 200, primary_key=True),
    _time("created_at"),  # the create's time (its usage is recorded at it)
    _time("next_check", index=True),
    _int("checks", default=0),  # reads so far that found it unfinished
))  # fmt: skip

# The latest computation of a period report (the adoption report, the signals, the dashboard's
# overview) over the default period, kept with `reports.snapshot_minutes` so that reading it costs
# one row, not the report (reports/snapshots.py). One row per report and way of computing it (`name`:
# 'adoption:<digest of the version and options>'); a process claims it (`claimed_until`,
# `claimed_by`) before computing, so one computes at a time.
ReportSnapshot = Rows(Table(
    "report_snapshots", metadata,
    _text("name", 32, primary_key=True),
    _time("since", null=True),  # the period the body covers; None until the first
    _time("until", null=True),
    _time("computed_at", null=True),  # when the computation ended
    _float("seconds", null=True),  # how long it took
    _text("computed_by", 200, null=True),  # host and process id of the replica
    _time("claimed_until", null=True),  # a replica is computing it until then, at most
    _text("claimed_by", 200, null=True),  # which (host and process id)
    Column("body", LargeBinary, nullable=True),  # the route's JSON answer, gzipped
))  # fmt: skip
