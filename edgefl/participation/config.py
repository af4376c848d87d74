"""The participation settings an aggregator runs with (PROTOCOL.md §4.7, AGGREGATOR.md).

FedBuff's staleness analysis (Nguyen et al., AISTATS 2022) assumes the server keeps a chosen
number ``C`` of clients training at once: staleness then stays around ``C / K`` versions. These
settings are that control, held by the runtime's own lease book (:mod:`.leases`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_CHECKIN_TTL_S",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LEASE_GRACE",
    "DEFAULT_LEASE_S",
    "ParticipationConfig",
]

DEFAULT_CONCURRENCY: Final = 20
DEFAULT_LEASE_S: Final = 600.0
DEFAULT_LEASE_GRACE: Final = 0.1
DEFAULT_CHECKIN_TTL_S: Final = 3600.0


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ParticipationConfig:
    """Server-controlled participation.

    * ``concurrency`` (``C``): at most this many leases are held at once.
    * ``lease_s``: a lease is valid this long after it was granted; a device that vanished frees
      its slot when its lease expires.
    * ``lease_grace``: an update that arrives up to ``lease_grace * lease_s`` after its lease
      expired is still accepted (its training was within the device's own view of the lease,
      which starts when the lease *arrived*); the slot was already re-granted, so this is the
      documented slack above ``C`` (AGGREGATOR.md, "Participation").
    * ``checkin_ttl_s``: a check-in keeps a device a candidate this long; agents check in again
      at half of it.
    * ``flush_after_s``: when set, a buffer holding at least one update steps this long after its
      first update arrived even if it holds fewer than ``K`` (liveness for fleets smaller than
      ``K``); None: only full buffers step.
    """

    concurrency: int = DEFAULT_CONCURRENCY
    lease_s: float = DEFAULT_LEASE_S
    lease_grace: float = DEFAULT_LEASE_GRACE
    checkin_ttl_s: float = DEFAULT_CHECKIN_TTL_S
    flush_after_s: float | None = None

    def __post_init__(self) -> None:
        c = self.concurrency
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {c!r}")
        object.__setattr__(self, "lease_s", _positive(self.lease_s, "lease_s"))
        object.__setattr__(self, "checkin_ttl_s", _positive(self.checkin_ttl_s, "checkin_ttl_s"))
        g = self.lease_grace
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g <= 1:
            raise ValueError(f"lease_grace must be a number in [0, 1], got {g!r}")
        object.__setattr__(self, "lease_grace", float(g))
        if self.flush_after_s is not None:
            object.__setattr__(
                self, "flush_after_s", _positive(self.flush_after_s, "flush_after_s")
            )

    @property
    def grace_s(self) -> float:
        """Seconds after expiry during which a lease's update is still accepted."""
        return self.lease_grace * self.lease_s
