"""`/v1/responses/input_tokens` is a token count, as `/v1/messages/count_tokens` is: it generates
nothing and costs nothing, yet each call was a request and an answer, so calls of it alone made an item
AI-assisted (a ticket done by hand, tagged with one free call). The rollups' rows holding such calls are
corrected from the raw events: `ok_token_counts` counts them, `requests` no longer does, a key's
`request_hours` and an item's `first_answered_ts` are worked out again without them.

The raw events are read once (writers wait meanwhile, as in 0017; readers do not). Calls in raw
partitions dropped before this migration (`recording.retention_months`) are not known: their rows stay
as they were.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0021'
down_revision: str | None = '0020'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLLUPS = ('usage_hourly', 'usage_daily', 'usage_key_daily', 'usage_team_daily', 'usage_item_totals')
# Each rollup's key, as the columns of the per-hour counts below (frozen here, as in 0017).
KEYS = {
    'usage_hourly': ('hour', 'work_item', 'team', 'model'),
    'usage_daily': ('day', 'work_item', 'team', 'model', 'owner'),
    'usage_key_daily': ('day', 'key_id', 'work_item', 'team'),
    'usage_team_daily': ('day', 'team', 'model'),
    'usage_item_totals': ('work_item', 'team', 'model'),
}
# Frozen: what is not a token count, as this revision's writer and as 0020's counted it.
NOT_A_TOKEN_COUNT = "route NOT IN ('/v1/messages/count_tokens', '/v1/responses/input_tokens')"
NOT_A_TOKEN_COUNT_0020 = "route <> '/v1/messages/count_tokens'"
COUNTS = 'input_tokens_0021'


def upgrade() -> None:
    _recount(+1, NOT_A_TOKEN_COUNT)


def downgrade() -> None:
    """The rows as 0020 kept them: the calls counted as requests and answers again."""
    _recount(-1, NOT_A_TOKEN_COUNT_0020)


def _recount(sign: int, not_a_token_count: str) -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    if postgres:  # writers wait from here (an event committed meanwhile would be missed); readers do not
        op.execute('LOCK TABLE usage_events IN SHARE MODE')
    hour = "date_trunc('hour', ts)" if postgres else "substr(ts, 1, 13) || ':00:00.000000'"
    day = "date_trunc('day', ts)" if postgres else "substr(ts, 1, 10) || ' 00:00:00.000000'"
    op.execute(  # the one pass over the events for the calls
        f"CREATE TEMPORARY TABLE {COUNTS} AS SELECT {hour} AS hour, {day} AS day, work_item, coalesce(team, '') AS team, model, owner, "
        "key_id, sum(CASE WHEN status < 400 THEN 1 ELSE 0 END) AS answered, sum(CASE WHEN attempt = 1 THEN 1 ELSE 0 END) AS first "
        f"FROM usage_events WHERE route = '/v1/responses/input_tokens' GROUP BY {hour}, {day}, work_item, coalesce(team, ''), model, owner, key_id"
    )
    for name in ROLLUPS:
        keys = KEYS[name]
        stored = ['bucket' if key in ('hour', 'day') else key for key in keys]
        match = ' AND '.join(f'{name}.{column} = counted.{key}' for column, key in zip(stored, keys))
        op.execute(
            f"UPDATE {name} SET ok_token_counts = ok_token_counts + {sign} * counted.answered, requests = requests - {sign} * counted.first "
            f"FROM (SELECT {', '.join(keys)}, sum(answered) AS answered, sum(first) AS first FROM {COUNTS} GROUP BY {', '.join(keys)}) "
            f"AS counted WHERE {match}"
        )
    _request_hours(postgres, not_a_token_count)
    _first_answers(not_a_token_count)
    op.execute(f'DROP TABLE {COUNTS}')


def _request_hours(postgres: bool, not_a_token_count: str) -> None:
    """The hours of the key's day with a request, again, for the rows with such calls (as in 0012)."""
    request = f"attempt = 1 AND {not_a_token_count}"
    touched = (f"EXISTS (SELECT 1 FROM {COUNTS} AS c WHERE c.day = usage_key_daily.bucket AND c.key_id = usage_key_daily.key_id "
               "AND c.work_item = usage_key_daily.work_item AND c.team = usage_key_daily.team)")  # fmt: skip
    if postgres:
        op.execute(
            "UPDATE usage_key_daily SET request_hours = COALESCE((SELECT bit_or(1 << CAST(extract(hour FROM e.ts) AS integer)) "
            "FROM usage_events AS e WHERE e.key_id = usage_key_daily.key_id AND e.work_item = usage_key_daily.work_item "
            "AND COALESCE(e.team, '') = usage_key_daily.team AND date_trunc('day', e.ts) = usage_key_daily.bucket "
            f"AND {request}), 0) WHERE {touched}"
        )
        return
    op.execute(  # no bitwise aggregate in SQLite: the sum of distinct powers of two is their OR
        "UPDATE usage_key_daily SET request_hours = COALESCE((SELECT sum(DISTINCT 1 << CAST(strftime('%H', e.ts) AS INTEGER)) "
        "FROM usage_events AS e WHERE e.key_id = usage_key_daily.key_id AND e.work_item = usage_key_daily.work_item "
        "AND COALESCE(e.team, '') = usage_key_daily.team AND substr(e.ts, 1, 10) = substr(usage_key_daily.bucket, 1, 10) "
        f"AND {request}), 0) WHERE {touched}"
    )


def _first_answers(not_a_token_count: str) -> None:
    """Each touched item's first answer that generated something, by 0019's rule: its first event stands
    in where the raw events no longer hold all its answers; NULL where it never had one."""
    touched = (f"EXISTS (SELECT 1 FROM {COUNTS} AS c WHERE c.work_item = usage_item_totals.work_item "
               "AND c.team = usage_item_totals.team AND c.model = usage_item_totals.model)")  # fmt: skip
    op.execute(f"UPDATE usage_item_totals SET first_answered_ts = NULL WHERE {touched}")
    op.execute(
        "UPDATE usage_item_totals SET first_answered_ts = answered.first FROM (SELECT work_item, coalesce(team, '') AS team, model, "
        f"min(ts) AS first, count(*) AS n FROM usage_events WHERE status < 400 AND {not_a_token_count} "
        f"AND work_item IN (SELECT work_item FROM {COUNTS}) GROUP BY work_item, coalesce(team, ''), model) AS answered "
        "WHERE usage_item_totals.work_item = answered.work_item AND usage_item_totals.team = answered.team "
        f"AND usage_item_totals.model = answered.model AND usage_item_totals.ok_events - usage_item_totals.ok_token_counts <= answered.n AND {touched}"
    )
    op.execute(
        "UPDATE usage_item_totals SET first_answered_ts = first_ts "
        f"WHERE first_answered_ts IS NULL AND ok_events - ok_token_counts > 0 AND {touched}"
    )
