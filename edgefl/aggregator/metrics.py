"""Prometheus exposition of the aggregator's figures (its own registry, never the global one).

The figures of :class:`~edgefl.aggregator.stats.AggregatorStatistics` are exported at scrape time
from the service's latest snapshot (the collector never touches live service state, so a scrape
from the HTTP thread is safe), plus the ingest latency histogram (receive -> durable ack)
observed by the service, ``edgefl_build_info`` and the standard ``process_*`` metrics.

Names follow https://prometheus.io/docs/practices/naming/: base units in the name (``_seconds``,
``_bytes``, ``_ratio``), ``_total`` on every counter, nothing precomputed that PromQL can derive
(rates are ``rate(..._total[5m])``), and labels only with a small closed set of values (a
:class:`~edgefl.errors.RejectReason`, a FedAvg round status), never a device id. :data:`METRICS`
is the catalogue (docs/MONITOR.md documents the same list; a test checks they agree).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import edgefl
from edgefl.aggregation.fedavg import RoundStatus
from edgefl.aggregator.stats import AggregatorStatistics
from edgefl.errors import RejectReason
from edgefl.participation import LeaseVerdict

__all__ = ["METRICS", "MetricSpec", "MetricType", "PrometheusExporter", "stats_families"]

_P = "edgefl_aggregator"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class MetricType(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family. ``name`` is the name as scraped (counters end in ``_total``;
    a histogram's samples add ``_bucket``, ``_sum`` and ``_count``)."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()


BUILD_INFO = MetricSpec(
    "edgefl_build_info",
    MetricType.GAUGE,
    "Always 1; the edgefl and Python versions",
    ("version", "python"),
)
MODEL_VERSION = MetricSpec(f"{_P}_model_version", MetricType.GAUGE, "Current model version")
BUFFERED = MetricSpec(
    f"{_P}_buffered_updates", MetricType.GAUGE, "Updates in the buffer (k; FedAvg: this round)"
)
BUFFER_CAPACITY = MetricSpec(
    f"{_P}_buffer_capacity_updates", MetricType.GAUGE, "Updates per server step (K)"
)
HELD_CHUNKS = MetricSpec(
    f"{_P}_held_chunk_packets",
    MetricType.GAUGE,
    "Chunk packets held unacknowledged until their update is complete",
)
CONNECTED = MetricSpec(f"{_P}_connected", MetricType.GAUGE, "1 while connected to the broker")
ACCURACY = MetricSpec(
    f"{_P}_accuracy_ratio",
    MetricType.GAUGE,
    "Held-out accuracy (0..1) of the last evaluated model version",
)
RECEIVED = MetricSpec(
    f"{_P}_received_updates_total", MetricType.COUNTER, "Complete updates received"
)
APPLIED = MetricSpec(
    f"{_P}_applied_updates_total", MetricType.COUNTER, "Updates accepted into the buffer"
)
REJECTED = MetricSpec(
    f"{_P}_rejected_updates_total", MetricType.COUNTER, "Rejected updates by reason", ("reason",)
)
DISCARDED = MetricSpec(
    f"{_P}_discarded_updates_total",
    MetricType.COUNTER,
    "Accepted updates dropped with a failed FedAvg round",
)
INGESTED = MetricSpec(
    f"{_P}_ingested_bytes_total", MetricType.COUNTER, "MQTT payload bytes of update packets"
)
STEPS = MetricSpec(f"{_P}_steps_total", MetricType.COUNTER, "Server steps (model versions created)")
ROUNDS = MetricSpec(
    f"{_P}_rounds_total", MetricType.COUNTER, "Closed FedAvg rounds by status", ("status",)
)
COMMITS = MetricSpec(f"{_P}_commits_total", MetricType.COUNTER, "Group commits to the state store")
ACKED = MetricSpec(
    f"{_P}_acked_packets_total",
    MetricType.COUNTER,
    "Update packets acknowledged to the broker (after their commit)",
)
RECEIPTS_SENT = MetricSpec(
    f"{_P}_receipts_sent_total",
    MetricType.COUNTER,
    "Receipts published to devices (after their batch committed)",
)
RECEIPTS_DROPPED = MetricSpec(
    f"{_P}_receipts_dropped_total",
    MetricType.COUNTER,
    "Receipts dropped from the full send queue (each costs the device a resend)",
)
RECONNECTS = MetricSpec(f"{_P}_reconnects_total", MetricType.COUNTER, "Reconnections to the broker")
STALENESS = MetricSpec(
    f"{_P}_staleness_versions",
    MetricType.HISTOGRAM,
    "Staleness of accepted updates (model versions behind)",
)
LATENCY = MetricSpec(
    f"{_P}_ingest_latency_seconds",
    MetricType.HISTOGRAM,
    "Receive to durable acknowledgement of one update packet",
)
# participation (PROTOCOL.md 4.7): only exported while it is on; (name, type, help, labels)
_G, _C = MetricType.GAUGE, MetricType.COUNTER
_LEASE_ROWS: tuple[tuple[str, MetricType, str, tuple[str, ...]], ...] = (
    ("leases_in_flight", _G, "Training leases held (devices training now)", ()),
    ("lease_concurrency", _G, "Leases held at most at once (C)", ()),
    ("lease_candidates", _G, "Devices checked in and waiting for a lease", ()),
    ("staleness_reference_versions", _G, "C / K: the staleness FedBuff expects", ()),
    ("leases_granted_total", _C, "Leases granted", ()),
    ("leases_ended_total", _C, "Leases ended, by how (completed, released, expired)", ("how",)),
    ("lease_verdicts_total", _C, "Lease checks of delivered updates, by verdict", ("verdict",)),
    (
        "checkins_total",
        _C,
        "Check-ins by outcome (available, withdrawn, or why refused)",
        ("outcome",),
    ),
)
LEASES_IN_FLIGHT, LEASE_CONCURRENCY, LEASE_CANDIDATES, STALENESS_REFERENCE = (
    MetricSpec(f"{_P}_{name}", kind, help_, labels) for name, kind, help_, labels in _LEASE_ROWS[:4]
)
LEASES_GRANTED, LEASES_ENDED, LEASE_VERDICTS, CHECKINS = (
    MetricSpec(f"{_P}_{name}", kind, help_, labels) for name, kind, help_, labels in _LEASE_ROWS[4:]
)
# central differential privacy (docs/PRIVACY.md): only exported while it is on
_DP_ROWS: tuple[tuple[str, str], ...] = (
    ("dp_epsilon_spent_max", "Largest epsilon spent by a device (at dp_delta; the accountant's)"),
    ("dp_delta", "The delta of the reported epsilon"),
    ("dp_noise_multiplier", "Noise multiplier z: noise std z*C on the buffer sum"),
    ("dp_clip_norm", "Clip norm C of every update (L2, after decoding)"),
    ("dp_participation_cap", "Flushes a device may take part in"),
    ("dp_participations_max", "Most flushes one device took part in"),
)
DP_EPSILON, DP_DELTA, DP_NOISE, DP_CLIP, DP_CAP, DP_MAX = (
    MetricSpec(f"{_P}_{name}", MetricType.GAUGE, help_) for name, help_ in _DP_ROWS
)

#: Every edgefl metric family of the endpoint, in exposition order (``process_*`` not included).
METRICS: tuple[MetricSpec, ...] = (
    BUILD_INFO,
    MODEL_VERSION,
    BUFFERED,
    BUFFER_CAPACITY,
    HELD_CHUNKS,
    CONNECTED,
    ACCURACY,
    RECEIVED,
    APPLIED,
    REJECTED,
    DISCARDED,
    INGESTED,
    STEPS,
    ROUNDS,
    COMMITS,
    ACKED,
    RECEIPTS_SENT,
    RECEIPTS_DROPPED,
    RECONNECTS,
    STALENESS,
    LATENCY,
    LEASES_IN_FLIGHT,
    LEASE_CONCURRENCY,
    LEASE_CANDIDATES,
    STALENESS_REFERENCE,
    LEASES_GRANTED,
    LEASES_ENDED,
    LEASE_VERDICTS,
    CHECKINS,
    DP_EPSILON,
    DP_DELTA,
    DP_NOISE,
    DP_CLIP,
    DP_CAP,
    DP_MAX,
)


def _gauge(spec: MetricSpec, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.help, value=value)


def _counter(spec: MetricSpec, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.help, value=value)


def _labelled_counter(
    spec: MetricSpec, counts: Mapping[str, int], known: Iterable[str]
) -> CounterMetricFamily:
    """One sample per known label value (0 until it happens, so ``rate()`` sees the first one),
    plus any other value present in ``counts``."""
    family = CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    for value in sorted(set(known) | set(counts)):
        family.add_metric([value], counts.get(value, 0))
    return family


def _staleness(spec: MetricSpec, staleness: Mapping[int, int]) -> HistogramMetricFamily:
    buckets = [
        (str(float(bound)), float(sum(n for tau, n in staleness.items() if tau <= bound)))
        for bound in STALENESS_BUCKETS
    ]
    buckets.append(("+Inf", float(sum(staleness.values()))))
    tau_sum = sum(tau * n for tau, n in staleness.items())
    return HistogramMetricFamily(spec.name, spec.help, buckets=buckets, sum_value=tau_sum)


def stats_families(s: AggregatorStatistics) -> list[Metric]:
    """The metric families of one statistics snapshot (pure; ``accuracy_ratio`` only once a
    version was evaluated)."""
    families: list[Metric] = [
        _gauge(MODEL_VERSION, s.version),
        _gauge(BUFFERED, s.buffer_fill),
        _gauge(BUFFER_CAPACITY, s.buffer_size),
        _gauge(HELD_CHUNKS, s.commits.pending_acks),
        _gauge(CONNECTED, 1 if s.link.connected else 0),
    ]
    if s.last_accuracy is not None:
        families.append(_gauge(ACCURACY, s.last_accuracy))
    families += [
        _counter(RECEIVED, s.received),
        _counter(APPLIED, s.applied),
        _labelled_counter(REJECTED, s.rejected, (r.value for r in RejectReason)),
        _counter(DISCARDED, s.rounds.discarded),
        _counter(INGESTED, s.bytes_ingested),
        _counter(STEPS, s.steps),
        _labelled_counter(ROUNDS, s.rounds.by_status, (r.value for r in RoundStatus)),
        _counter(COMMITS, s.commits.batches),
        _counter(ACKED, s.commits.acked),
        _counter(RECEIPTS_SENT, s.receipts.sent),
        _counter(RECEIPTS_DROPPED, s.receipts.dropped),
        _counter(RECONNECTS, s.link.reconnects),
        _staleness(STALENESS, s.staleness),
    ]
    return families + _participation_families(s) + _privacy_families(s)


def _participation_families(s: AggregatorStatistics) -> list[Metric]:
    """The lease figures (none while participation is off)."""
    p = s.participation
    if p is None:
        return []
    return [
        _gauge(LEASES_IN_FLIGHT, p.in_flight),
        _gauge(LEASE_CONCURRENCY, p.concurrency),
        _gauge(LEASE_CANDIDATES, p.candidates),
        _gauge(STALENESS_REFERENCE, p.concurrency / max(1, s.buffer_size)),
        _counter(LEASES_GRANTED, p.granted),
        _labelled_counter(LEASES_ENDED, p.ended, ("completed", "released", "expired")),
        _labelled_counter(LEASE_VERDICTS, p.verdicts, (v.value for v in LeaseVerdict)),
        _labelled_counter(CHECKINS, p.checkins, ("available", "withdrawn")),
    ]


def _privacy_families(s: AggregatorStatistics) -> list[Metric]:
    """The central DP figures (none while DP is off)."""
    p = s.privacy
    if p is None:
        return []
    values = (
        p.epsilon,
        p.delta,
        p.noise_multiplier,
        p.clip_norm,
        p.participation_cap,
        p.participation_max,
    )
    specs = (DP_EPSILON, DP_DELTA, DP_NOISE, DP_CLIP, DP_CAP, DP_MAX)
    return [_gauge(spec, value) for spec, value in zip(specs, values, strict=True)]


def build_info() -> GaugeMetricFamily:
    family = GaugeMetricFamily(BUILD_INFO.name, BUILD_INFO.help, labels=list(BUILD_INFO.labels))
    family.add_metric([edgefl.__version__, platform.python_version()], 1)
    return family


def _without_created(family: Metric) -> Metric:
    """``family`` without its ``_created`` sample (the text format would show it as a separate
    gauge family carrying the histogram's help; the process start time covers it)."""
    family.samples = [s for s in family.samples if not s.name.endswith("_created")]
    return family


class _Collector(Collector):
    def __init__(
        self, provider: Callable[[], AggregatorStatistics | None], latency: Histogram
    ) -> None:
        self._provider = provider
        self._latency = latency

    def collect(self) -> Iterator[Any]:
        yield build_info()
        s = self._provider()
        if s is not None:
            yield from stats_families(s)
        for family in self._latency.collect():
            yield _without_created(family)


class PrometheusExporter:
    """Serves ``/metrics`` on ``port`` from a private :class:`CollectorRegistry`: the families
    of :data:`METRICS` and the standard ``process_*`` metrics of this process."""

    def __init__(self, provider: Callable[[], AggregatorStatistics | None]) -> None:
        self.latency = Histogram(
            LATENCY.name, LATENCY.help, buckets=LATENCY_BUCKETS, registry=None
        )  # thread-safe: observed on the event loop, collected from the HTTP thread
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(provider, self.latency))
        ProcessCollector(registry=self.registry)
        self._server: Any = None
        self.port: int | None = None

    def start(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP server (``port=0``: a free port); returns the port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
