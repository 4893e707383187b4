"""What the writer writes: a usage record, a batch of them, and one batch's write to the database.

A batch is what one transaction commits (repo.write_batch). It can be split into units of one row each
(to isolate a row the database refuses), merged back, and turned to and from the JSON the spool keeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from sqlalchemy.engine import Engine

from taskproxy.storage import repo

_DATETIME_FIELDS = {"ts", "created_at", "completed_at"}
KINDS = ("events", "rejections", "audit")


@dataclass
class Record:
    """Rows for one usage event, refusal or audit entry, and the work item to register if it is new."""

    kind: Literal["event", "rejection", "audit"]
    row: dict
    new_work_item: dict | None = None
    charged: tuple[int, int] = (0, 0)  # (tokens, nano-USD) the request path already counted against budgets


class Recordable(Protocol):
    def to_record(self) -> Record: ...


class UsageSink(Protocol):
    """Where the request path hands what it observed. Must return at once."""

    def submit(self, item: Recordable) -> None: ...


@dataclass
class Batch:
    events: list[dict] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    items: dict[str, dict] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        {"event": self.events, "rejection": self.rejections, "audit": self.audit}[record.kind].append(record.row)
        if record.new_work_item is not None:
            self.items.setdefault(record.new_work_item["id"], record.new_work_item)

    def __len__(self) -> int:
        return len(self.events) + len(self.rejections) + len(self.audit)

    def as_dict(self) -> dict:
        return {"events": self.events, "rejections": self.rejections, "audit": self.audit, "items": list(self.items.values())}

    @classmethod
    def from_dict(cls, data: dict) -> Batch:
        return cls(
            events=[_revive(r) for r in data.get("events", ())], rejections=[_revive(r) for r in data.get("rejections", ())],
            audit=[_revive(r) for r in data.get("audit", ())], items={r["id"]: _revive(r) for r in data.get("items", ())},
        )  # fmt: skip

    def units(self) -> list[Batch]:
        """One batch per row; an event carries the work item it registers."""
        found = [Batch(events=[row], items={row["work_item"]: self.items[row["work_item"]]} if row["work_item"] in self.items else {})
                 for row in self.events]  # fmt: skip
        found += [Batch(rejections=[row]) for row in self.rejections] + [Batch(audit=[row]) for row in self.audit]
        registered = {row["work_item"] for row in self.events}
        found += [Batch(items={item_id: item}) for item_id, item in self.items.items() if item_id not in registered]
        return found

    @classmethod
    def merged(cls, parts: Iterable[Batch]) -> Batch:
        batch = cls()
        for part in parts:
            batch.events += part.events
            batch.rejections += part.rejections
            batch.audit += part.audit
            batch.items.update(part.items)
        return batch

    def rows(self) -> int:
        return len(self) or len(self.items)


def write(engine: Engine, batch: Batch) -> None:
    repo.write_batch(engine, events=batch.events, rejections=batch.rejections, audit=batch.audit, new_items=batch.items.values())


def _revive(row: dict) -> dict:
    return {k: datetime.fromisoformat(v) if k in _DATETIME_FIELDS and isinstance(v, str) else v for k, v in row.items()}
