"""Observable figures of the aggregator: statistics snapshots and per-version history records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefl.aggregator.participation import LeaseDeskStatistics
from edgefl.privacy import PrivacyStatistics

__all__ = [
    "AggregatorStatistics",
    "CommitStatistics",
    "LinkStatistics",
    "ReceiptStatistics",
    "RoundStatistics",
    "VersionRecord",
]


@dataclass(frozen=True)
class CommitStatistics:
    """The group-commit pipeline of this process: batches committed, update packets
    acknowledged to the broker after their commit, chunk packets held until their update
    completes."""

    batches: int = 0
    acked: int = 0
    pending_acks: int = 0


@dataclass(frozen=True)
class LinkStatistics:
    """The broker connection of this process."""

    connected: bool = False
    reconnects: int = 0  # MQTT reconnections


@dataclass(frozen=True)
class ReceiptStatistics:
    """Receipts of this process: published (PUBACKed), and dropped from the full queue (cost:
    a resend)."""

    sent: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class RoundStatistics:
    """FedAvg rounds by status, and the accepted updates dropped with failed rounds (empty and
    0 under FedBuff)."""

    by_status: Mapping[str, int] = field(default_factory=dict)
    discarded: int = 0


@dataclass(frozen=True)
class AggregatorStatistics:
    """A snapshot of the service's counters. Totals (``received``, ``applied``, ``rejected``,
    ``bytes_ingested``, ``staleness``) count since the state dir was created (they are durable,
    committed with the batches); rates are over the last metrics period."""

    version: int
    buffer_fill: int
    buffer_size: int
    received: int  # complete updates (accepted + rejected), not chunk packets
    applied: int  # updates accepted into the buffer
    rejected: Mapping[str, int] = field(default_factory=dict)  # by RejectReason value
    bytes_ingested: int = 0  # MQTT payload bytes of update packets
    updates_per_s: float = 0.0
    bytes_per_s: float = 0.0
    staleness: Mapping[int, int] = field(default_factory=dict)  # accepted updates by staleness
    last_accuracy: float | None = None
    steps: int = 0  # versions created by this state dir
    rounds: RoundStatistics = field(default_factory=RoundStatistics)  # FedAvg
    commits: CommitStatistics = field(default_factory=CommitStatistics)
    link: LinkStatistics = field(default_factory=LinkStatistics)
    session: int = 0
    started_at: float = 0.0
    receipts: ReceiptStatistics = field(default_factory=ReceiptStatistics)
    participation: LeaseDeskStatistics | None = None  # leases (None: participation is off)
    privacy: PrivacyStatistics | None = None  # central DP: epsilon, z, C, counts (None: off)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(frozen=True)
class VersionRecord:
    """One model version: when it was created, updates applied so far, held-out accuracy."""

    version: int
    created_at: float  # wall-clock time
    applied: int
    accuracy: float | None = None
