"""The monitor's view of central differential privacy (``ServerState.privacy``), sans-IO.

An aggregator with central DP on (``edgefl aggregator --dp central:...``, docs/PRIVACY.md)
carries its figures in the retained server state: ε at δ (the largest a device spent), the
noise multiplier ``z``, the clip ``C``, the participation cap and the participation histogram
(participations -> devices). :func:`privacy_view` turns them into a
:class:`~.snapshot.PrivacyView` with the distribution summarised (median, p90, mean, devices at
the cap); :func:`compact_histogram` folds a long histogram into a few ranges for one text line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from edgefl.protocol.messages import ServerState

from .participation import histogram_items, histogram_quantile
from .snapshot import PrivacyView

__all__ = ["compact_histogram", "privacy_view"]


def privacy_view(state: ServerState | None) -> PrivacyView | None:
    """The central DP figures of ``state`` (None: no state seen, or DP is off): the fields
    :class:`~.snapshot.PrivacyView` shares with ``CentralPrivacy``, and the distribution."""
    if state is None or state.privacy is None:
        return None
    p = state.privacy
    items = histogram_items(p.participation_histogram)
    total = sum(n for _, n in items)
    derived: dict[str, Any] = {
        "participation_histogram": dict(items),
        "p50": histogram_quantile(items, 0.5) if total else None,
        "p90": histogram_quantile(items, 0.9) if total else None,
        "mean": sum(k * n for k, n in items) / total if total else None,
        "at_cap": sum(n for k, n in items if k >= p.participation_cap),
        "budget_used": p.participation_max / p.participation_cap,
    }
    same = {f.name: getattr(p, f.name) for f in fields(PrivacyView) if f.name not in derived}
    return PrivacyView(**same, **derived)


def compact_histogram(histogram: Mapping[int, int], bins: int = 8) -> list[tuple[int, int, int]]:
    """``(low, high, devices)`` ranges of a participation histogram, ascending, at most ``bins``
    of them: each distinct count on its own while there are at most ``bins``, else ``1..max``
    cut into ``bins`` ranges of equal width (empty ranges left out)."""
    if bins < 1:
        raise ValueError("bins must be >= 1")
    items = histogram_items(histogram)
    if len(items) <= bins:
        return [(k, k, n) for k, n in items]
    low, top = items[0][0], items[-1][0]
    width = math.ceil((top - low + 1) / bins)
    out: dict[int, int] = {}
    for k, n in items:
        start = low + (k - low) // width * width
        out[start] = out.get(start, 0) + n
    return [(start, min(start + width - 1, top), n) for start, n in sorted(out.items())]
