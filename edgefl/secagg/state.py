"""Plain frozen snapshots of both roles: what a service persists (see docs/PRIVACY.md,
"Persistence") so that a crash neither loses nor double-counts an accepted update."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefl.secagg.decision import BufferDecision, UpdateKey

__all__ = ["HeldSeed", "HelperSnapshot", "LeaderSnapshot", "PendingShare"]


@dataclass(frozen=True, slots=True)
class PendingShare:
    """A masked share the leader holds: one row of its share table."""

    key: UpdateKey
    masked: bytes
    weight: int
    arrived: float
    helper_ok: bool


@dataclass(frozen=True)
class LeaderSnapshot:
    """The leader's whole state. ``open_shares`` are the members of ``open_decision``."""

    next_buffer_id: int
    pending: tuple[PendingShare, ...]
    complete: tuple[UpdateKey, ...]
    announced: tuple[tuple[UpdateKey, float], ...]
    closed: tuple[tuple[UpdateKey, str], ...]
    drops: tuple[UpdateKey, ...]
    open_decision: BufferDecision | None
    open_shares: tuple[PendingShare, ...]
    counts: Mapping[str, int] = field(default_factory=dict)
    accepted_total: int = 0
    combined_total: int = 0

    def __post_init__(self) -> None:
        if (self.open_decision is None) != (not self.open_shares):
            raise ValueError("an open decision needs its members' shares, and only then")
        if self.open_decision is not None and self.open_decision.members != tuple(
            s.key for s in self.open_shares
        ):
            raise ValueError("open_shares do not match the open decision's members")


@dataclass(frozen=True, slots=True)
class HeldSeed:
    """A sealed seed the helper holds (kept sealed at rest; reopened on restore)."""

    key: UpdateKey
    sealed: bytes
    arrived: float


@dataclass(frozen=True)
class HelperSnapshot:
    """The helper's whole state: held seeds, answered decisions not yet superseded, the highest
    decision id seen, counters."""

    seeds: tuple[HeldSeed, ...]
    answered: tuple[BufferDecision, ...]
    last_buffer_id: int
    counts: Mapping[str, int] = field(default_factory=dict)
    accepted_total: int = 0
