"""Prometheus exposition of the aggregator's figures (its own registry, never the global one).

Everything in :class:`~edgefl.aggregator.stats.AggregatorStatistics` is exported at scrape time
from the service's latest snapshot (the collector never touches live service state, so a scrape
from the HTTP thread is safe), plus the ingest latency histogram (receive -> durable ack)
observed by the service.

=====================================  =========  ==========================================
metric                                 type       meaning
=====================================  =========  ==========================================
edgefl_aggregator_version              gauge      current model version
edgefl_aggregator_buffer_fill          gauge      k: updates in the buffer
edgefl_aggregator_buffer_size          gauge      K
edgefl_aggregator_received_total       counter    complete updates received
edgefl_aggregator_applied_total        counter    updates accepted into the buffer
edgefl_aggregator_rejected_total       counter    rejections, label ``reason``
edgefl_aggregator_bytes_ingested_total counter    MQTT payload bytes of update packets
edgefl_aggregator_updates_per_second   gauge      over the last metrics period
edgefl_aggregator_staleness            histogram  staleness of accepted updates
edgefl_aggregator_accuracy             gauge      held-out accuracy of the last evaluated version
edgefl_aggregator_ingest_latency_seconds histogram receive -> durable ack, per message
=====================================  =========  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from edgefl.aggregator.stats import AggregatorStatistics

__all__ = ["PrometheusExporter"]

_PREFIX = "edgefl_aggregator"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class _StatsCollector(Collector):
    def __init__(self, provider: Callable[[], AggregatorStatistics | None]) -> None:
        self._provider = provider

    def collect(self) -> Iterator[Any]:
        s = self._provider()
        if s is None:
            return
        yield GaugeMetricFamily(f"{_PREFIX}_version", "Current model version", value=s.version)
        yield GaugeMetricFamily(f"{_PREFIX}_buffer_fill", "Updates in the buffer", s.buffer_fill)
        yield GaugeMetricFamily(f"{_PREFIX}_buffer_size", "Updates per server step", s.buffer_size)
        yield CounterMetricFamily(f"{_PREFIX}_received", "Complete updates received", s.received)
        yield CounterMetricFamily(f"{_PREFIX}_applied", "Updates accepted", s.applied)
        rejected = CounterMetricFamily(
            f"{_PREFIX}_rejected", "Rejected updates by reason", labels=["reason"]
        )
        for reason, n in sorted(s.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(
            f"{_PREFIX}_bytes_ingested", "MQTT payload bytes of update packets", s.bytes_ingested
        )
        yield GaugeMetricFamily(
            f"{_PREFIX}_updates_per_second", "Accepted updates per second", s.updates_per_s
        )
        yield GaugeMetricFamily(f"{_PREFIX}_steps", "Versions created", s.steps)
        buckets: list[tuple[str, float]] = []
        total = 0
        tau_sum = 0
        for bound in STALENESS_BUCKETS:
            buckets.append(
                (str(float(bound)), float(sum(n for t, n in s.staleness.items() if t <= bound)))
            )
        for tau, n in s.staleness.items():
            total += n
            tau_sum += tau * n
        buckets.append(("+Inf", float(total)))
        yield HistogramMetricFamily(
            f"{_PREFIX}_staleness",
            "Staleness of accepted updates",
            buckets=buckets,
            sum_value=tau_sum,
        )
        if s.last_accuracy is not None:
            yield GaugeMetricFamily(
                f"{_PREFIX}_accuracy",
                "Held-out accuracy of the last evaluated version",
                s.last_accuracy,
            )


class PrometheusExporter:
    """Serves ``/metrics`` on ``port`` from a private :class:`CollectorRegistry`."""

    def __init__(self, provider: Callable[[], AggregatorStatistics | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatsCollector(provider))
        self.latency = Histogram(
            f"{_PREFIX}_ingest_latency_seconds",
            "Receive to durable acknowledgement of one update packet",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
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
