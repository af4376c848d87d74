"""The monitor's view of server-controlled participation (protocol 1.2, PROTOCOL.md §4.7), sans-IO.

FedBuff holds staleness near ``C / K`` when the server keeps ``C`` clients training at once and
steps every ``K`` updates (Nguyen et al., AISTATS 2022). The view puts the figures side by side:

* from the retained ``ServerState.participation``: ``C`` (``concurrency``), leases held
  (``in_flight``) and checked-in devices waiting for one (``candidates``);
* from the device states: how many devices say ``waiting_for_slot``;
* from ``ServerMetrics.staleness`` (the histogram ``{τ: count}`` of accepted updates): its
  mean, p90 and max, against ``C / K`` (``K`` the buffer size).

:func:`participation_view` computes it from plain values; :func:`with_participation` adds it to
an :class:`~.snapshot.AggregatorView`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

from edgefl.protocol.messages import ServerMetrics, ServerState

from .snapshot import AggregatorView, DeviceView, ParticipationView, StalenessSummary

__all__ = [
    "histogram_items",
    "histogram_quantile",
    "participation_view",
    "staleness_summary",
    "with_participation",
]


def histogram_items(histogram: Mapping[int, int]) -> list[tuple[int, int]]:
    """The ``(value, count)`` pairs of a histogram with a positive count, ascending."""
    return sorted((int(v), int(n)) for v, n in histogram.items() if n > 0)


def histogram_quantile(items: Sequence[tuple[int, int]], q: float) -> int:
    """The smallest value with at least ``q`` (0 < q <= 1) of the counts at or below it, over
    non-empty ascending ``items`` (:func:`histogram_items`)."""
    need = math.ceil(q * sum(n for _, n in items))
    running = 0
    for value, n in items:
        running += n
        if running >= need:
            return value
    return items[-1][0]


def staleness_summary(histogram: Mapping[int, int]) -> StalenessSummary | None:
    """Count, mean, p90 (the smallest τ with at least 90 % of the updates at or below it) and
    max of a staleness histogram; None when it is empty."""
    items = histogram_items(histogram)
    total = sum(n for _, n in items)
    if total == 0:
        return None
    mean = sum(t * n for t, n in items) / total
    p90 = histogram_quantile(items, 0.9)
    return StalenessSummary(count=total, mean=mean, p90=p90, max=items[-1][0])


def participation_view(
    state: ServerState | None,
    metrics: ServerMetrics | None,
    devices: Iterable[DeviceView],
) -> ParticipationView | None:
    """The participation figures of a leasing aggregator (None: it grants no leases, or its
    state was not seen). ``buffer_size`` comes from the more recent of state and metrics."""
    if state is None or state.participation is None:
        return None
    p = state.participation
    k = state.buffer_size
    if metrics is not None and metrics.at >= state.at:
        k = metrics.buffer_size
    stale = staleness_summary(metrics.staleness) if metrics is not None else None
    return ParticipationView(
        concurrency=p.concurrency,
        in_flight=p.in_flight,
        candidates=p.candidates,
        lease_s=p.lease_s,
        checkin_ttl_s=p.checkin_ttl_s,
        waiting_for_slot=sum(1 for d in devices if d.waiting_for_slot),
        staleness_target=p.concurrency / k,
        staleness=stale,
    )


def with_participation(
    view: AggregatorView,
    state: ServerState | None,
    metrics: ServerMetrics | None,
    devices: Iterable[DeviceView],
) -> AggregatorView:
    """``view`` with its ``participation`` filled in (see :func:`participation_view`)."""
    participation = participation_view(state, metrics, devices)
    return dataclasses.replace(view, participation=participation)
