"""Liveness for fleets smaller than ``K``: when a partly filled buffer steps (sans-IO).

FedBuff steps when ``K`` updates are buffered. With leases, a device is granted a new lease
after each update, so even one device fills a buffer eventually (``K`` sequential trainings on
the same version); a flush deadline bounds that wait: a buffer holding at least one update steps
``flush_after_s`` after its first update arrived.

Consequences (AGGREGATOR.md, "Participation"): a flushed buffer averages fewer updates, so the
step is noisier (under ``mean`` normalisation its size is unchanged; under ``sum`` it shrinks by
``count / K``); staleness is unaffected (it counts versions, and versions come no faster than
one per ``flush_after_s`` from a quiet fleet).
"""

from __future__ import annotations

__all__ = ["flush_due"]


def flush_due(
    *, buffer_fill: int, first_buffered_at: float | None, now: float, flush_after_s: float | None
) -> bool:
    """Whether a buffer that is not full must step now: it holds an update that has waited at
    least ``flush_after_s`` (never when ``flush_after_s`` is None)."""
    if flush_after_s is None or buffer_fill == 0 or first_buffered_at is None:
        return False
    return now - first_buffered_at >= flush_after_s
