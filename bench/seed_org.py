"""A large synthetic organisation in PostgreSQL, for the scale benchmark, built resumably:

    python bench/seed_org.py [--postgres URL] [--schema NAME] [--keys 85000] [--teams 5000]
                             [--items 2000000] [--events 100000000] [--days 90] [--drop]

Defaults: the database at `TASKPROXY_BENCH_POSTGRES_URL` (else
`postgresql://postgres@127.0.0.1:5432/taskproxy_bench`; created if missing, the database `test` is
refused), schema `bench_seed` (created if missing; `--drop` drops it first). The tables are made by the
real migrations (`upgrade_schema`); the rows are generated in SQL by INSERT ... SELECT over
generate_series, as bench/reports_scale.py does; usage_events' primary key and indexes are dropped for
the load and rebuilt after it; the rollups are filled by `rollup.backfill` and the spend counters by
migration 0004's two statements.

Resumable: each step (keys, items, history, links, each chunk of 1,000,000 events `events:000012`,
indexes, rejections, rollups, spend_counters, analyze) commits a row of `bench_progress` in its own
transaction, and a rerun skips the steps done. A chunk is deterministic (ids md5('event' || i), a
random seed per chunk, times from the period fixed by the first run's `plan` row), so a chunk cut short
is made again the same. A rerun with other sizes than the first is refused (use --drop).

The organisation, over the `days` days that end at the UTC midnight before the first run:

- keys `key_000123` (sha256 hashes), 1.05 keys a person (`person-N`, N = key % (0.95 * keys)), a
  person's keys in one team (`team-N`, 5% of the people in none), 2% service keys; adoption grows over
  the period: the keys are created one after another over the days, and the events of a day come from
  the keys that exist by then (so the number of events a day grows linearly with the keys);
- work items `PROJ-N` created one after another over the period: 55% done and 10% closed 1-14 days
  after creation (those not finished by the end are in progress), 20% open, 10% in progress, 5%
  auto-registered (unverified); 5% with a token budget; their status history; a fifth of the done ones
  linked to a merged pull request `acme/repo-N#J` (itself a done work item, merged before the ticket),
  and a fifth of the open and in-progress ones too (merged two days after the ticket was created,
  the ticket worked on after it);
- usage: each key works for three days at a time on an item among those created in the last three
  days (and, for a fifth of its requests, on a second one), 85% of the requests in a 10-hour working
  day, on its main model (85%) or a side one, among six (one unpriced); 3% failed requests, 5%
  count_tokens calls (nothing billed), 1% fallback attempts; prompt hashes from a pool of 200,000;
- rejections (a row per minute of refusals), 1 for 100 events.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url

from taskproxy.storage import distribution, partitions, rollup
from taskproxy.storage.db import make_engine, upgrade_schema
from taskproxy.storage.models import UsageEvent

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/taskproxy_bench"
DEFAULT_SCHEMA = "bench_seed"
CHUNK = 1_000_000
PROMPTS = 200_000  # the pool prompt hashes are drawn from
ITEM_DAYS = 3  # a key works on items created in the last three days, three days at a time

# model, $ per input token, $ per output token (NULL: no known price), provider (as bench/reports_scale.py)
MODELS = [("gpt-4o-mini", "0.15e-6", "0.6e-6", "openai"), ("gpt-4.1", "2e-6", "8e-6", "openai"),
          ("claude-sonnet", "3e-6", "15e-6", "anthropic"), ("claude-haiku", "0.8e-6", "4e-6", "anthropic"),
          ("o3", "2e-6", "8e-6", "openai"), ("local-llama", "NULL", "NULL", "local")]  # fmt: skip
USER_AGENTS = ["claude-cli/2.0.14 (external, cli)", "codex_cli_rs/0.46.0", "cursor/1.7.2", "python-httpx/0.28.1"]

Log = Callable[[str], None]


class Refused(Exception):
    """A database, schema or rerun this script will not touch."""


def schema_url(url: str, schema: str) -> str:
    """`url` whose connections see `schema` first (as tests/conftest.py's postgres_schema)."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def _admin_engine(url: str, database: str | None = None) -> Engine:
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    if database is not None:
        parsed = parsed.set(database=database)
    return create_engine(parsed, isolation_level="AUTOCOMMIT")


def _ensure_database(url: str, log: Log) -> None:
    name = make_url(url).database
    server = _admin_engine(url, "postgres")
    try:
        with server.connect() as connection:
            if connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).first() is None:
                log(f"creating the database {name}")
                connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        server.dispose()


def _check(url: str, schema: str) -> None:
    database = make_url(url).database
    if not database:
        raise Refused(f"the URL {make_url(url).render_as_string()} names no database")
    if database == "test":
        raise Refused("refusing the database 'test' (the tests' own): give the benchmark a database of its own")
    if (
        not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema)
        or schema.startswith("pg_")
        or schema in {"public", "information_schema"}
    ):
        raise Refused(f"refusing the schema name {schema!r}: give a lower-case identifier of a schema of its own (not public)")


# -- steps ------------------------------------------------------------------------------------------


class Steps:
    """Runs each step once: in its own transaction, which also inserts the step's bench_progress row."""

    def __init__(self, engine: Engine, log: Log) -> None:
        self.engine, self.log = engine, log
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE IF NOT EXISTS bench_progress (step text PRIMARY KEY, done_at timestamptz NOT NULL)")
            )
            self.finished = set(connection.execute(text("SELECT step FROM bench_progress")).scalars())

    def done(self, step: str) -> bool:
        return step in self.finished

    def run(self, step: str, work: Callable[[Connection], Any], *, rows: int | None = None, quiet: bool = False) -> float:
        """Runs `step` unless done; returns the seconds it took (0 if skipped)."""
        if self.done(step):
            return 0.0
        began = time.perf_counter()
        with self.engine.begin() as connection:
            _load_settings(connection)
            work(connection)
            connection.execute(text("INSERT INTO bench_progress (step, done_at) VALUES (:step, now())"), {"step": step})
        seconds = time.perf_counter() - began
        self.finished.add(step)
        if not quiet:
            rate = f", {rows / seconds:,.0f} rows/s" if rows else ""
            self.log(f"{step}: {seconds:.1f} s{rate}")
        return seconds


def _load_settings(connection: Connection) -> None:
    connection.execute(text("SET LOCAL synchronous_commit = off"))
    connection.execute(text("SET LOCAL maintenance_work_mem = '1GB'"))
    connection.execute(text("SET LOCAL work_mem = '256MB'"))


# -- the organisation, in SQL ------------------------------------------------------------------------


def _people(keys: int) -> int:
    return max(1, int(keys * 0.95))


def _key_sql(k: str, width: int) -> dict[str, str]:
    """A key's id, owner and team from its number `k` (a person's keys share a team)."""
    person = f"({k} % :people)"
    return {
        "id": f"'key_' || lpad({k}::text, {width}, '0')",
        "owner": f"'person-' || {person}",
        "team": f"CASE WHEN {person} % 20 = 19 THEN NULL ELSE 'team-' || ({person} % :teams) END",
    }


def _keys(connection: Connection, p: dict[str, Any], width: int) -> None:
    key = _key_sql("k", width)
    # Key k is created at the start of day floor(k * days / keys): an event of day d uses a key below
    # ceil(keys * (d + 1) / days), so never one created after it.
    connection.execute(text(f"""
        INSERT INTO api_keys (id, key_hash, prefix, owner, person, team, role, created_at)
        SELECT {key['id']}, encode(sha256(convert_to('taskproxy-seed-key-' || k, 'UTF8')), 'hex'), 'tp-' || left(md5('prefix' || k), 8),
               {key['owner']}, {key['owner']}, {key['team']}, CASE WHEN k % 50 = 1 THEN 'service' ELSE 'developer' END,
               CAST(:start AS timestamp) + (k::bigint * :days / :keys) * interval '1 day'
        FROM generate_series(0, :keys - 1) AS k"""), p)  # fmt: skip


def _items(connection: Connection, p: dict[str, Any]) -> None:
    # Item j is created spacing * j hours after the start; its kind from j * 31 % 100; done and closed
    # ones finish 1-14 days later, and are still in progress if that is after the end.
    connection.execute(text("""
        INSERT INTO work_items (id, source, title, url, team, status, created_at, completed_at, budget_tokens, updated_at, tracker,
                                tracker_event_at)
        SELECT id, CASE WHEN kind = 'unverified' THEN 'auto' ELSE 'jira' END,
               CASE WHEN kind = 'unverified' THEN NULL ELSE 'Item ' || id END,
               CASE WHEN kind = 'unverified' THEN NULL ELSE 'https://acme.atlassian.net/browse/' || id END,
               'team-' || (j % :teams), CASE WHEN finished IS NULL AND kind IN ('done', 'closed') THEN 'in_progress' ELSE kind END,
               created, finished, CASE WHEN j % 20 = 7 THEN (1 + j % 10) * 1000000 END, coalesce(finished, created),
               CASE WHEN kind = 'unverified' THEN NULL ELSE 'jira' END, CASE WHEN kind = 'unverified' THEN NULL ELSE coalesce(finished, created) END
        FROM (
            SELECT j, id, kind, created, CASE WHEN kind IN ('done', 'closed') AND done_at < CAST(:end AS timestamp) THEN done_at END AS finished
            FROM (
                SELECT j, 'PROJ-' || j AS id, CAST(:start AS timestamp) + j * :spacing * interval '1 hour' AS created,
                       CAST(:start AS timestamp) + j * :spacing * interval '1 hour' + (1 + (j::bigint * 7919) % 13) * interval '1 day'
                           + ((j::bigint * 104729) % 86400) * interval '1 second' AS done_at,
                       CASE WHEN j * 31 % 100 < 55 THEN 'done' WHEN j * 31 % 100 < 65 THEN 'closed' WHEN j * 31 % 100 < 85 THEN 'open'
                            WHEN j * 31 % 100 < 95 THEN 'in_progress' ELSE 'unverified' END AS kind
                FROM generate_series(0, :items - 1) AS j
            ) AS planned
        ) AS dated"""), p)  # fmt: skip


def _history(connection: Connection, p: dict[str, Any]) -> None:
    # Opened (or first seen in a request) at creation; started an hour later; done or closed at completion.
    connection.execute(text("""
        INSERT INTO work_item_changes (id, work_item, ts, from_status, to_status, source)
        SELECT md5('open' || id), id, created_at, NULL, CASE WHEN status = 'unverified' THEN 'unverified' ELSE 'open' END,
               CASE WHEN source = 'auto' THEN 'api' ELSE 'jira' END
        FROM work_items WHERE id LIKE 'PROJ-%'
        UNION ALL
        SELECT md5('start' || id), id, greatest(created_at, least(created_at + interval '1 hour', CAST(:end AS timestamp) - interval '1 second')),
               'open', 'in_progress', 'jira'
        FROM work_items WHERE id LIKE 'PROJ-%' AND (status = 'in_progress' OR completed_at IS NOT NULL)
        UNION ALL
        SELECT md5('end' || id), id, completed_at, 'in_progress', status, 'jira' FROM work_items WHERE id LIKE 'PROJ-%' AND completed_at IS NOT NULL"""), p)  # fmt: skip


def _links(connection: Connection, p: dict[str, Any]) -> None:
    # A fifth of the done tickets (j % 5 = 0: 11 of the 55 'done' residues of j * 31 % 100) led to a
    # pull request, opened two hours after the ticket and merged an hour before it was done. So did a
    # fifth of the tickets left open or in progress (the umbrella ticket, still being worked on after its
    # PR merged two days in): the adoption report counts their usage up to the merge in the PR's cost.
    connection.execute(text("""
        CREATE TEMPORARY TABLE seed_prs ON COMMIT DROP AS
        SELECT ticket, team, pr, url, opened, merged FROM (
            SELECT id AS ticket, team, 'acme/repo-' || (j % :repos) || '#' || j AS pr,
                   'https://github.com/acme/repo-' || (j % :repos) || '/pull/' || j AS url, created_at + interval '2 hours' AS opened,
                   CASE WHEN status = 'done' THEN completed_at - interval '1 hour' ELSE created_at + interval '2 days' END AS merged
            FROM (SELECT id, team, status, created_at, completed_at, substr(id, 6)::int AS j FROM work_items
                  WHERE id LIKE 'PROJ-%' AND ((status = 'done' AND completed_at IS NOT NULL) OR status IN ('open', 'in_progress'))) AS ticket
            WHERE j % 5 = 0) AS planned
        WHERE merged < CAST(:end AS timestamp)"""), p)  # fmt: skip
    connection.execute(text("""
        INSERT INTO work_items (id, source, title, url, team, status, created_at, completed_at, updated_at, tracker, tracker_event_at, merged_at)
        SELECT pr, 'github', 'Fix ' || ticket, url, team, 'done', opened, merged, merged, 'github', merged, merged FROM seed_prs"""))  # fmt: skip
    connection.execute(text("""
        INSERT INTO work_item_changes (id, work_item, ts, from_status, to_status, source)
        SELECT md5('open' || pr), pr, opened, NULL, 'open', 'github' FROM seed_prs
        UNION ALL
        SELECT md5('merged' || pr), pr, merged, 'open', 'done', 'github' FROM seed_prs"""))  # fmt: skip
    connection.execute(
        text("INSERT INTO work_item_links (work_item, linked, kind, ts) SELECT ticket, pr, 'merged_pr', merged FROM seed_prs")
    )


def _models_sql(index: str) -> dict[str, str]:
    """CASE expressions of model number `index`: its name, prices and provider."""

    def case(column: int, quote: bool) -> str:
        return (
            "CASE "
            + " ".join(f"WHEN {index} = {n} THEN {repr(m[column]) if quote else m[column]}" for n, m in enumerate(MODELS))
            + " END"
        )

    return {"name": case(0, True), "price_in": case(1, False), "price_out": case(2, False), "provider": case(3, True)}


def _events_sql(width: int) -> str:
    key = _key_sql("k", width)
    model = _models_sql("m")
    agents = "ARRAY[" + ", ".join(repr(agent) for agent in USER_AGENTS) + "]"
    # Innermost: event i's day d (events spread so that a day has as many as the keys existing by
    # then: the cumulative share of events by day d grows as (d / days)^2), and a key existing by d.
    # Then the key's item: the days go in stints of ITEM_DAYS (staggered per key), and for a stint the
    # key takes an item among the `window` created last before the stint's first day (`anchor`; on the
    # first day, those created that day), and a second one for a fifth of its requests. Volatile subqueries are not flattened: the random() calls
    # run in the same order on every run, so setseed makes a chunk reproducible.
    return f"""
        INSERT INTO usage_events (id, ts, key_id, owner, team, work_item, attribution_source, route, model, upstream_model, provider,
            status, attempt, error, stream, prompt_tokens, completion_tokens, total_tokens, cached_tokens, cache_write_tokens,
            reasoning_tokens, est_prompt_tokens, usage_source, estimated_fields, provider_error, cost_nanos, latency_ms, ttfb_ms,
            prompt_hash, user_agent)
        SELECT md5('event' || i), ts, {key['id']}, {key['owner']}, {key['team']}, 'PROJ-' || item,
               CASE WHEN k % 10 < 8 THEN 'header' WHEN k % 10 = 8 THEN 'branch' ELSE 'binding' END,
               route, {model['name']}, {model['name']}, {model['provider']}, status, attempt,
               CASE WHEN status = 504 THEN 'upstream_timeout' WHEN status >= 400 THEN 'upstream_error' END, stream,
               p, c, p + c, CASE WHEN m IN (2, 3) THEN p * 6 / 10 ELSE p / 4 END, CASE WHEN m IN (2, 3) THEN p / 10 ELSE 0 END,
               CASE WHEN m = 4 THEN c / 2 ELSE 0 END, est, 'provider', NULL, NULL,
               CASE WHEN {model['price_in']} IS NULL THEN NULL ELSE round(p * {model['price_in']} * 1000000000 + c * {model['price_out']} * 1000000000)::bigint END,
               latency, CASE WHEN stream THEN round((latency / 4)::numeric, 3)::float8 END, md5('prompt' || prompt),
               ({agents})[1 + k % {len(USER_AGENTS)}]
        FROM (
            SELECT i, ts, k, m, status, attempt, stream, latency, prompt, est,
                   CASE WHEN counting THEN '/v1/messages/count_tokens' WHEN m IN (2, 3) THEN '/v1/messages' ELSE '/v1/chat/completions' END AS route,
                   CASE WHEN status >= 400 OR counting THEN 0 ELSE est + est / 20 END AS p,
                   CASE WHEN status >= 400 OR counting THEN 0 ELSE c END AS c,
                   cb - 1 - (k::bigint * 7919 + stint * 104729 + CASE WHEN side THEN 15485863 ELSE 0 END) % least(:window, cb) AS item
            FROM (
                SELECT i, k, stint,
                       CASE WHEN anchor = 0 THEN greatest(1, :items / :days) ELSE anchor::bigint * :items / :days END AS cb,
                       CAST(:start AS timestamp) + d * interval '1 day'
                           + CASE WHEN random() < 0.85 THEN 8 + random() * 10 ELSE random() * 24 END * interval '1 hour' AS ts,
                       CASE WHEN random() < 0.85 THEN k % 6 ELSE (k + 1) % 6 END AS m,
                       random() < 0.2 AS side,
                       random() < 0.05 AS counting,
                       CASE WHEN random() < 0.03 THEN (ARRAY[429, 500, 503, 504])[1 + floor(random() * 4)::int] ELSE 200 END AS status,
                       CASE WHEN random() < 0.01 THEN 2 ELSE 1 END AS attempt,
                       random() < 0.6 AS stream,
                       round((300 + random() * random() * 20000)::numeric, 3)::float8 AS latency,
                       (200 + random() * random() * 40000)::bigint AS est,
                       (20 + random() * 1500)::bigint AS c,
                       floor(random() * {PROMPTS})::int AS prompt
                FROM (
                    SELECT i, d, stint, greatest(0, stint * {ITEM_DAYS} - k % {ITEM_DAYS}) AS anchor, k
                    FROM (SELECT i, d, (d + k % {ITEM_DAYS}) / {ITEM_DAYS} AS stint, k FROM (
                        SELECT i, d, floor(random() * ((CAST(:keys AS bigint) * (d + 1) + :days - 1) / :days))::int AS k
                        FROM (
                            SELECT i, least(:days - 1, floor(:days * sqrt((i + random()) / :events)))::int AS d
                            FROM generate_series(CAST(:low AS bigint), CAST(:high AS bigint) - 1) AS i
                        ) AS dated
                    ) AS keyed) AS stints
                ) AS staged
            ) AS drawn
        ) AS event"""  # fmt: skip


def _rejections(connection: Connection, p: dict[str, Any], width: int, rows: int) -> None:
    connection.execute(text("SELECT setseed(0.5)"))
    connection.execute(text(f"""
        INSERT INTO rejections (id, ts, key_id, reason, route, count)
        SELECT md5('rejection' || r), date_trunc('minute', CAST(:start AS timestamp) + d * interval '1 day' + random() * interval '1 day'),
               CASE WHEN reason = 'key_invalid' THEN NULL ELSE 'key_' || lpad(floor(random() * ((CAST(:keys AS bigint) * (d + 1) + :days - 1) / :days))::text, {width}, '0') END,
               reason, '/v1/chat/completions', 1 + floor(random() * random() * 20)::int
        FROM (
            SELECT r, least(:days - 1, floor(:days * sqrt(random())))::int AS d,
                   (ARRAY['work_item_required', 'rate_limited', 'budget_exceeded', 'work_item_unknown', 'key_invalid'])[1 + floor(random() * 5)::int] AS reason
            FROM generate_series(1, :rows) AS r
        ) AS drawn"""), {**p, "rows": rows})  # fmt: skip


def _spend_counters(connection: Connection) -> None:
    # Migration 0004's statements: what has been spent so far, from the daily rollup.
    month = "to_char(bucket, 'YYYY-MM')"
    connection.execute(text(
        "INSERT INTO spend_counters (scope, ref, period, tokens, cost_nanos, updated_at) "
        "SELECT 'item', work_item, '', SUM(total_tokens), COALESCE(SUM(cost_nanos), 0), MAX(last_ts) FROM usage_daily GROUP BY work_item"
    ))  # fmt: skip
    connection.execute(text(
        "INSERT INTO spend_counters (scope, ref, period, tokens, cost_nanos, updated_at) "
        f"SELECT 'team', team, {month}, SUM(total_tokens), COALESCE(SUM(cost_nanos), 0), MAX(last_ts) FROM usage_daily "
        f"WHERE team <> '' GROUP BY team, {month}"
    ))  # fmt: skip


# -- usage_events' keys for the load -------------------------------------------------------------------

EVENTS = UsageEvent.__table__


def _event_partitions(connection: Connection) -> list[str]:
    return list(connection.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = CAST(:table AS regclass) ORDER BY 1"
    ), {"table": EVENTS.name}).scalars())  # fmt: skip


def _prepare_load(connection: Connection, months: list[datetime]) -> None:
    """Before the event chunks (idempotent): the months' partitions, no secondary index, no primary key,
    no autovacuum on the partitions (the analyze step vacuums them once, at the end)."""
    if partitions.is_partitioned(connection):
        made = set(partitions.months(connection))  # the migrations made the current month's (and a run stopped here, others)
        for month in months:
            if month not in made:
                partitions.create_month(connection, month)
    for index in EVENTS.indexes:
        connection.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
    primary = connection.execute(text(
        "SELECT conname FROM pg_constraint WHERE conrelid = CAST(:table AS regclass) AND contype = 'p'"
    ), {"table": EVENTS.name}).scalar()  # fmt: skip
    if primary is not None:
        connection.execute(text(f'ALTER TABLE {EVENTS.name} DROP CONSTRAINT IF EXISTS "{primary}"'))
    for name in _event_partitions(connection) or [EVENTS.name]:
        connection.execute(text(f'ALTER TABLE "{name}" SET (autovacuum_enabled = false)'))


def _primary_key_columns(connection: Connection) -> list[str]:
    """The model's primary key, plus the partition key's columns when usage_events is partitioned
    (PostgreSQL's unique constraints on a partitioned table must hold them: (id, ts), migration 0005),
    plus the column a distributed PostgreSQL would spread it by (migration 0014)."""
    columns = [column.name for column in EVENTS.primary_key.columns]
    partition_key = connection.execute(text(
        "SELECT a.attname FROM pg_partitioned_table p "
        "JOIN LATERAL unnest(CAST(p.partattrs AS int2[])) WITH ORDINALITY AS k(attnum, n) ON true "
        "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.attnum "
        "WHERE p.partrelid = CAST(:table AS regclass) ORDER BY k.n"
    ), {"table": EVENTS.name}).scalars()  # fmt: skip
    columns += [name for name in partition_key if name not in columns]
    return columns + [distribution.DISTRIBUTED[EVENTS.name]]


def _rebuild_keys(connection: Connection) -> None:
    columns = ", ".join(_primary_key_columns(connection))
    connection.execute(text(f"ALTER TABLE {EVENTS.name} ADD PRIMARY KEY ({columns})"))
    for index in EVENTS.indexes:
        index.create(connection)


# -- the whole -------------------------------------------------------------------------------------


def seed(
    url: str, schema: str, *, keys: int, teams: int, items: int, events: int, days: int, log: Log = print, drop: bool = False
) -> str:
    """Build, or finish building, the organisation in `schema` of the database at `url` (a
    postgresql:// URL); returns the URL whose connections see that schema."""
    _check(url, schema)
    if min(keys, teams, items, days) < 1 or events < 0:
        raise Refused("keys, teams, items and days must be at least 1, events at least 0")
    began = time.perf_counter()

    def say(message: str) -> None:
        log(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - began:7.1f} s] {message}")

    _ensure_database(url, say)
    admin = _admin_engine(url)
    try:
        with admin.connect() as connection:
            if drop:
                say(f"dropping the schema {schema}")
                connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    finally:
        admin.dispose()
    scoped = schema_url(url, schema)
    engine = make_engine(scoped)
    try:
        upgrade_schema(engine)
        steps = Steps(engine, say)
        end = _plan(engine, steps, keys=keys, teams=teams, items=items, events=events, days=days)
        start = end - timedelta(days=days)
        say(f"schema {schema}: {keys:,} keys, {teams:,} teams, {items:,} work items, {events:,} events from {start:%Y-%m-%d} to {end:%Y-%m-%d}"
            f" ({len(steps.finished) - 1} steps done before)")  # fmt: skip
        width = max(5, len(str(keys - 1)))
        p = {"start": start, "end": end, "keys": keys, "teams": teams, "items": items, "days": days, "people": _people(keys),
             "spacing": days * 24.0 / items, "window": max(1, items * ITEM_DAYS // days), "repos": max(10, teams // 10)}  # fmt: skip
        steps.run("keys", lambda c: _keys(c, p, width), rows=keys)
        steps.run("items", lambda c: _items(c, p), rows=items)
        steps.run("history", lambda c: _history(c, p))
        steps.run("links", lambda c: _links(c, p))

        chunks = [(n, low, min(low + CHUNK, events)) for n, low in enumerate(range(0, events, CHUNK))]
        if not steps.done("indexes"):
            months, month = [], partitions.month_start(start)
            while month <= partitions.month_start(end, 2):
                months.append(month)
                month = partitions.month_start(month, 1)
            with engine.begin() as connection:
                _prepare_load(connection, months)
            todo = [chunk for chunk in chunks if not steps.done(f"events:{chunk[0]:06d}")]
            say(f"usage_events without primary key and indexes; {len(todo)} of {len(chunks)} chunks of events to make")
        statement = text(_events_sql(width))
        loaded = time.perf_counter()
        made = 0
        for n, low, high in chunks:

            def load(connection: Connection, n: int = n, low: int = low, high: int = high) -> None:
                connection.execute(text("SELECT setseed(:seed)"), {"seed": ((n * 7919) % 1_000_003 + 1) / 1_000_004})
                connection.execute(statement, {**p, "low": low, "high": high, "events": events})

            if steps.done(f"events:{n:06d}"):
                continue
            seconds = steps.run(f"events:{n:06d}", load, quiet=True)
            made += high - low
            elapsed = time.perf_counter() - loaded
            say(
                f"events:{n:06d}: {seconds:.1f} s, {(high - low) / seconds:,.0f} rows/s; events {high:,} of {events:,} "
                f"({made / elapsed:,.0f} rows/s over the {made:,} made this run)"
            )
        steps.run("indexes", _rebuild_keys)
        steps.run("rejections", lambda c: _rejections(c, p, width, max(1, events // 100)), rows=max(1, events // 100))
        steps.run("rollups", rollup.backfill)
        steps.run("spend_counters", _spend_counters)
        if not steps.done("analyze"):
            # VACUUM cannot run in a transaction: it runs first (again, if a run stops before the row).
            analyzed = time.perf_counter()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                for name in _event_partitions(connection) or [EVENTS.name]:
                    connection.execute(text(f'ALTER TABLE "{name}" RESET (autovacuum_enabled)'))
                tables = connection.execute(text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1"
                ), {"schema": schema}).scalars().all()  # fmt: skip
                connection.execute(text("SET maintenance_work_mem = '1GB'"))
                connection.execute(text("VACUUM (ANALYZE) " + ", ".join(f'"{name}"' for name in tables)))  # this schema's only
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO bench_progress (step, done_at) VALUES ('analyze', now())"))
            steps.finished.add("analyze")
            say(f"analyze: {time.perf_counter() - analyzed:.1f} s (VACUUM (ANALYZE) of the schema)")
        _summary(engine, schema, say)
    finally:
        engine.dispose()
    return scoped


def _plan(engine: Engine, steps: Steps, **sizes: int) -> datetime:
    """The first run's `plan` row: its sizes (a rerun must ask the same) and its time, whose UTC midnight
    ends the period (naive UTC, as the tables store times)."""
    name = "plan " + " ".join(f"{key}={value}" for key, value in sizes.items())
    with engine.begin() as connection:
        row = connection.execute(text("SELECT step, done_at FROM bench_progress WHERE step LIKE 'plan %'")).first()
        if row is None:
            at = connection.execute(
                text("INSERT INTO bench_progress (step, done_at) VALUES (:step, now()) RETURNING done_at"), {"step": name}
            ).scalar_one()
            steps.finished.add(name)
        elif row.step != name:
            raise Refused(
                f"the schema was begun with `{row.step}`, not `{name}`: rerun with those sizes, or --drop to start again"
            )
        else:
            at = row.done_at
    return at.astimezone(UTC).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)


def _summary(engine: Engine, schema: str, say: Log) -> None:
    tables = ["api_keys", "work_items", "work_item_changes", "work_item_links", "usage_events", "usage_daily", "usage_hourly",
              "rejections", "spend_counters"]  # fmt: skip
    with engine.connect() as connection:
        size = connection.execute(text(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relkind IN ('r', 'm')"
        ), {"schema": schema}).scalar_one()  # fmt: skip
        counts = {table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() for table in tables}
    say(f"schema {schema}: {int(size) / 2**30:.2f} GiB ({int(size):,} bytes) in its tables and their indexes")
    for table, count in counts.items():
        say(f"  {table:<18} {count:>14,} rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--postgres", default=os.environ.get("TASKPROXY_BENCH_POSTGRES_URL", DEFAULT_POSTGRES), help="a postgresql:// URL"
    )
    parser.add_argument("--schema", default=DEFAULT_SCHEMA)
    parser.add_argument("--keys", type=int, default=85_000)
    parser.add_argument("--teams", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--events", type=int, default=100_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--drop", action="store_true", help="drop the schema first and build it anew")
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # psycopg then cancels the running statement: its step rolls back at once

    signal.signal(signal.SIGTERM, interrupted)
    try:
        seed(args.postgres, args.schema, keys=args.keys, teams=args.teams, items=args.items, events=args.events, days=args.days,
             drop=args.drop, log=lambda message: print(message, flush=True))  # fmt: skip
    except Refused as refused:
        print(f"bench/seed_org.py: {refused}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench/seed_org.py: interrupted; run it again (without --drop) to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
