"""The messages between the two aggregators: the helper's seed report, the leader's membership
decision and the helper's partial sum (plain frozen values; JSON for the coordination topic)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgefl.secagg.errors import SecAggReason

__all__ = ["BufferDecision", "HelperPartial", "SeedReport", "UpdateKey"]

UpdateKey = tuple[str, int]
"""``(device_id, seq)``: one update."""


def _keys(value: Any) -> tuple[UpdateKey, ...]:
    out = []
    for item in value:
        device, seq = item
        if not isinstance(device, str) or isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError(f"bad update key {item!r}")
        out.append((device, seq))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SeedReport:
    """Helper → leader: the sealed seed of ``key`` arrived and opened (``ok``) or not."""

    key: UpdateKey
    ok: bool
    reason: SecAggReason | None = None


@dataclass(frozen=True, slots=True)
class BufferDecision:
    """Leader → helper: buffer ``buffer_id`` is the updates ``members`` with public integer
    ``weights`` (same order); ``dropped`` are updates the helper reported that the leader
    excluded (the helper deletes their seeds)."""

    buffer_id: int
    members: tuple[UpdateKey, ...]
    weights: tuple[int, ...]
    dropped: tuple[UpdateKey, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", _keys(self.members))
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "dropped", _keys(self.dropped))
        if len(self.members) != len(self.weights) or not self.members:
            raise ValueError("a decision needs one weight per member and at least one member")
        if len(set(self.members)) != len(self.members):
            raise ValueError("duplicate member")
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.weights):
            raise ValueError("weights must be integers >= 1")
        if self.buffer_id < 0:
            raise ValueError("buffer_id must be >= 0")

    @property
    def weight_sum(self) -> int:
        return sum(self.weights)

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, compact)."""
        return json.dumps(
            {
                "buffer_id": self.buffer_id,
                "dropped": [list(k) for k in self.dropped],
                "members": [list(k) for k in self.members],
                "weights": list(self.weights),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BufferDecision:
        """Inverse of :meth:`to_json`; ``ValueError`` on anything malformed."""
        try:
            obj: Mapping[str, Any] = json.loads(data)
            return cls(
                buffer_id=int(obj["buffer_id"]),
                members=_keys(obj["members"]),
                weights=tuple(obj["weights"]),
                dropped=_keys(obj.get("dropped", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad decision: {exc}") from None


@dataclass(frozen=True, slots=True)
class HelperPartial:
    """Helper → leader: ``Σ_i w_i m_i mod 2^b`` over the members of ``buffer_id`` (ring bytes)."""

    buffer_id: int
    total: bytes
