"""Prometheus metrics at /metrics: requests, tokens and cost by model and team (never by person),
refusals by reason, upstream latency and time to first byte, the writer's queue and spool.

Everything is counted from the records the writer builds, in the writer thread, so metrics cost the
request path nothing. Teams with fewer people than `privacy.min_group_size` are counted together
under one label, and the endpoint (routes/metrics.py) needs an admin key. Each process keeps its own registry: with `serve --workers N`, a scrape sees
the worker that answered it (run one scrape target per process, or one worker per replica).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from taskproxy.money import usd
from taskproxy.storage.batch import Record
from taskproxy.storage.writer import BatchWriter

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


SMALL_TEAMS = "(teams below the privacy floor)"


class _CountedElsewhere(Collector):
    """A counter whose count another part keeps (read at each scrape): exposed as `<name>_total`, so
    that rate() and increase() apply as to any counter."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation, value=self._read())]


class Metrics:
    def __init__(self, writer: BatchWriter, team_label: Callable[[str | None], str] = lambda team: team or "",
                 settlements_dropped: Callable[[], int] = lambda: 0) -> None:  # fmt: skip
        self._team_label = team_label
        self._children: dict[tuple, object] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("taskproxy_requests", "Proxied requests by route, model and status (each attempt: fallbacks count again)", ["route", "model", "status"], registry=r)
        self.tokens = Counter("taskproxy_tokens", "Tokens by model, team and kind (prompt, completion, cached)", ["model", "team", "kind"], registry=r)
        self.cost = Counter("taskproxy_cost_usd", "Cost in USD by model and team (priced events only)", ["model", "team"], registry=r)
        self.unpriced = Counter("taskproxy_unpriced_attempts", "Attempts whose model has no known price", ["model"], registry=r)
        self.rejections = Counter("taskproxy_rejections", "Requests refused before forwarding, by reason", ["reason"], registry=r)
        self.latency = Histogram("taskproxy_upstream_latency_seconds", "Time from arrival to the end of the response", ["route"], buckets=_SECONDS, registry=r)
        self.ttfb = Histogram("taskproxy_time_to_first_byte_seconds", "Time from arrival to the provider's first byte", ["route"], buckets=_SECONDS, registry=r)
        Gauge("taskproxy_writer_queue_depth", "Usage records waiting for the writer", registry=r).set_function(lambda: writer.queue_depth)
        Gauge("taskproxy_spool_bytes", "Bytes of usage waiting in spool files for the database", registry=r).set_function(lambda: writer.spool_bytes)
        Gauge("taskproxy_set_aside_rows", "Rows the database refused for themselves, kept in the set-aside file (since start)",
              registry=r).set_function(lambda: writer.set_aside)  # fmt: skip
        Gauge("taskproxy_unrecorded_held", "Usage records held in memory because neither the database nor the spool takes them",
              registry=r).set_function(lambda: writer.held_rows)  # fmt: skip
        r.register(_CountedElsewhere("taskproxy_budget_settlements_dropped", "Budget slices (or spend) this process could not settle "
                                     "with the database: more than 20,000 budgets waited during an outage", settlements_dropped))  # fmt: skip

        self.snapshot_computed = Gauge("taskproxy_report_snapshot_computed_timestamp_seconds",
                                       "When the latest snapshot of each report was computed (reports.snapshot_minutes), as the last look found it",
                                       ["report"], registry=r)  # fmt: skip
        self.snapshot_seconds = Gauge("taskproxy_report_snapshot_compute_seconds", "How long the latest snapshot of each report took to compute",
                                      ["report"], registry=r)  # fmt: skip

    def snapshot_seen(self, name: str, computed_at: datetime | None, seconds: float | None) -> None:
        """A report snapshot's state (the keeper's look, about once a minute): `name` is its stored
        name ('adoption:<digest>'), labelled by the report's part. Nothing before the first is stored."""
        if computed_at is None:
            return
        report = name.partition(":")[0]
        self.snapshot_computed.labels(report).set(computed_at.replace(tzinfo=UTC).timestamp())
        if seconds is not None:
            self.snapshot_seconds.labels(report).set(seconds)

    def _child(self, metric: Counter | Histogram, *labels: str):  # type: ignore[no-untyped-def]
        """`metric.labels(*labels)`, looked up once: labels() validates and locks on every call, and
        this runs for every request in the writer thread, which shares the GIL with the event loop."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, record: Record) -> None:
        """Count one record (called by the writer thread)."""
        row = record.row
        if record.kind == "rejection":
            self._child(self.rejections, row["reason"]).inc(row.get("count", 1))
            return
        if record.kind != "event":
            return
        route, model, team = row["route"], row["model"], self._team_label(row["team"])
        self._child(self.requests, route, model, str(row["status"])).inc()
        for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens"), ("cached", "cached_tokens")):
            if row[field]:
                self._child(self.tokens, model, team, kind).inc(row[field])
        if row["cost_nanos"] is None:
            self._child(self.unpriced, model).inc()
        elif row["cost_nanos"]:
            self._child(self.cost, model, team).inc(usd(row["cost_nanos"]))
        self._child(self.latency, route).observe(row["latency_ms"] / 1000)
        if row["ttfb_ms"] is not None:
            self._child(self.ttfb, route).observe(row["ttfb_ms"] / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
