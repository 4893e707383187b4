"""Ids for the rows written at a request's rate (usage events), ordered by time.

A random id (uuid4) lands on a random page of the primary key's index, so every insert into a table of
many millions of rows reads and dirties a page of its own, and after each checkpoint writes it whole to
the WAL. An id that starts with its time lands where the previous ones did: the index grows at one
edge, as for a sequence, while the ids are still made on the request path with no database round trip
(a replayed event keeps its id, so a replay is still written once). bench/scale.py measures the writer
with these ids into the seeded organisation (docs/scale-runs.md).

The layout is UUIDv7's (RFC 9562) without the version bits, in the 32 hex digits the `id` columns
hold: 48 bits of milliseconds since the Unix epoch, then 80 random bits.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1)
_MILLISECOND = timedelta(milliseconds=1)


def time_ordered_id(ts: datetime) -> str:
    """32 hex digits: `ts` in milliseconds (naive: UTC), then 80 random bits."""
    naive = ts if ts.tzinfo is None else ts.astimezone(UTC).replace(tzinfo=None)
    millis = (naive - _EPOCH) // _MILLISECOND  # integer arithmetic: no float rounding across a millisecond
    return f"{millis & 0xFFFF_FFFF_FFFF:012x}{secrets.randbits(80):020x}"
