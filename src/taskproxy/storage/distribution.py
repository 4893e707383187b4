"""How taskproxy's tables would spread over a distributed PostgreSQL (Citus), kept next to the schema
so that a migration that breaks it fails a test (tests/test_distribution.py).

The large tables grow with usage and are read per work item, so they are distributed by the work item
and co-located: an item's events, rollups, history, links and spend live on one node, and the reports'
joins of them stay on it. Citus requires every unique key of a distributed table to include its
distribution column (migration 0014 made it so). `usage_team_daily` has no work item and is read per
team. The rest are small, and each is read or locked alone: they stay on the coordinator, apart from
the keys, which reports join and every node may need.

Not run against Citus here (it is not in Debian's or PyPI's packages); what is checked is the schema
condition above, on PostgreSQL.
"""

from __future__ import annotations

DISTRIBUTED: dict[str, str] = {
    # table: its distribution column, all co-located with work_items.id
    "work_items": "id",
    "work_item_changes": "work_item",
    "work_item_sizes": "work_item",
    "work_item_links": "work_item",
    "usage_events": "work_item",
    "usage_hourly": "work_item",
    "usage_daily": "work_item",
    "usage_key_daily": "work_item",
    "usage_item_totals": "work_item",
    "spend_counters": "ref",  # an item's lifetime spend by its id; a team's month by the team's name
}
BY_TEAM: dict[str, str] = {"usage_team_daily": "team"}
REFERENCE = ("api_keys",)
ON_COORDINATOR = ("changes", "leases", "background_responses", "rejections", "audit_log", "webhook_deliveries", "report_snapshots", "alembic_version")

