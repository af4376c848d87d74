"""The aggregator's durable counters, typed: rejections keyed by ``RejectReason``, staleness by int.

The state store keeps counters as ``name -> value`` rows (``store.py``: ``received``, ``applied``,
``bytes``, ``steps``, ``checkpoints``, ``rejected:<reason>``, ``staleness:<tau>``). :class:`Tally`
is the one place that spells those names: :meth:`Tally.from_rows` parses the rows a restart
loads, :meth:`Tally.to_rows` gives the rows one batch adds. Everything else counts with typed
keys, as :class:`~edgefl.aggregation.FedBuff` does. Sans-IO.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefl.errors import RejectReason

__all__ = ["Tally"]

log = logging.getLogger("edgefl.aggregator")

_REJECTED = "rejected:"
_STALENESS = "staleness:"
_PLAIN = ("received", "applied", "bytes", "steps", "checkpoints")


@dataclass
class Tally:
    """Counts of one batch, or (summed) of a whole state dir."""

    received: int = 0  # complete updates (accepted + rejected), not chunk packets
    applied: int = 0  # updates accepted into the buffer
    bytes: int = 0  # MQTT payload bytes of update packets
    steps: int = 0  # versions created
    checkpoints: int = 0  # buffer checkpoints stored instead of encoded updates
    rejected: Counter[RejectReason] = field(default_factory=Counter)
    staleness: Counter[int] = field(default_factory=Counter)  # accepted updates by staleness

    def reject(self, reason: RejectReason) -> None:
        """Count one refused update (a complete update or a given-up chunked message)."""
        self.received += 1
        self.rejected[reason] += 1

    def accept(self, staleness: int) -> None:
        """Count one accepted update of this staleness."""
        self.received += 1
        self.applied += 1
        self.staleness[staleness] += 1

    def add(self, other: Tally) -> None:
        """Add another tally's counts to this one (a batch's into the totals)."""
        for name in _PLAIN:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rejected.update(other.rejected)
        self.staleness.update(other.staleness)

    def to_rows(self) -> dict[str, int]:
        """The store's counter rows of the non-zero counts (what ``BatchRecord.counters``
        holds)."""
        rows = {name: getattr(self, name) for name in _PLAIN if getattr(self, name)}
        rows.update({f"{_REJECTED}{r.value}": n for r, n in self.rejected.items() if n})
        rows.update({f"{_STALENESS}{tau}": n for tau, n in self.staleness.items() if n})
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, int]) -> Tally:
        """Parse the store's counter rows. A row this release does not know (a reason that no
        longer exists) is logged and left out of the typed counts; the store keeps it."""
        tally = cls()
        for name, value in rows.items():
            prefix, _, key = name.partition(":")
            try:
                if name in _PLAIN:
                    setattr(tally, name, int(value))
                elif f"{prefix}:" == _REJECTED:
                    tally.rejected[RejectReason(key)] += int(value)
                elif f"{prefix}:" == _STALENESS:
                    tally.staleness[int(key)] += int(value)
                else:
                    raise ValueError(name)
            except ValueError:
                log.warning("ignoring unknown counter %r in the state store", name)
        return tally

    def rejected_by_value(self) -> dict[str, int]:
        """Rejections keyed by reason value (the public shape of statistics and messages)."""
        return {r.value: n for r, n in self.rejected.items() if n}
