"""The monitor's snapshot of a fleet: frozen, JSON-serialisable dataclasses.

``FleetSnapshot.to_json()`` is what ``edgefl monitor --once --json`` prints (one object) and
``--json`` streams (one object per line). Times are Unix seconds (floats); ages are seconds
relative to ``at``; absent figures are ``null``. The layout is documented in ``docs/MONITOR.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from .broker_stats import BrokerStatsView

__all__ = [
    "AggregatorTimes",
    "AggregatorView",
    "ConnectionView",
    "DeviceView",
    "FleetSnapshot",
    "LostReason",
    "ModelView",
    "MonitorCounters",
    "ParticipationView",
    "PrivacyView",
    "StalenessSummary",
    "to_jsonable",
]


_PLAIN = frozenset({str, int, float, bool, type(None)})
INLINE: Mapping[str, object] = {"json": "inline"}
"""Field metadata: the nested record's keys stand in its parent's JSON object, in its place."""


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from dataclasses, enums, tuples and mappings (keys become strings). A
    dataclass field marked :data:`INLINE` contributes its own fields, not an object."""
    if type(value) in _PLAIN:  # exact types: enums (str/int subclasses) go below
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = to_jsonable(getattr(value, f.name))
            if f.metadata.get("json") == "inline":
                out.update(item)
            else:
                out[f.name] = item
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


class LostReason(StrEnum):
    """Why a device is shown as ``lost``."""

    WILL = "will"  # its Last Will (or a state with status lost) arrived
    STALE = "stale"  # no sign of life for longer than the stale timeout


@dataclass(frozen=True)
class DeviceView:
    """One row of the fleet table.

    ``status`` is the effective status: the reported one, except ``lost`` when the device's
    Will arrived (``lost_reason="will"``) or when a connected status (online / idle / training)
    is older than the stale timeout (``lost_reason="stale"``; ``reported_status`` keeps what the
    device last said). ``last_seen`` is the later of the state's ``at`` and the receipt time of
    the device's latest live (non-retained) message. ``model_staleness`` is the current model
    version minus the version the device holds.
    """

    device_id: str
    status: str
    reported_status: str
    lost_reason: LostReason | None
    session: int
    encoding: str
    state_at: float
    last_seen: float
    last_seen_age_s: float
    model_version: int | None
    model_staleness: int | None
    reasons: tuple[str, ...]
    updates_sent: int
    updates_seen: int
    local_accuracy: float | None
    profile: str | None
    spool_depth: int | None = None  # updates in the device's spool (protocol 1.1 devices)
    awaiting_receipt: int | None = None  # of those, sent and waiting for a receipt
    receipt_through: int | None = None  # ``through`` of the last receipt the monitor saw
    waiting_for_slot: bool | None = None  # checked in with a leasing aggregator (protocol 1.2)


@dataclass(frozen=True)
class ModelView:
    """The current model from the retained manifest."""

    version: int
    model: str
    format: str
    size: int
    num_chunks: int
    chunk_size: int
    num_params: int
    sha256: str
    created_at: float
    age_s: float
    chunks_seen: int
    """Retained chunks of this version the monitor received (weights artifact)."""
    onnx: bool


@dataclass(frozen=True)
class StalenessSummary:
    """A staleness histogram in four numbers (``p90``: the smallest τ with at least 90 % of
    the accepted updates at or below it)."""

    count: int
    mean: float
    p90: int
    max: int


@dataclass(frozen=True)
class ParticipationView:
    """Server-controlled participation (protocol 1.2): leases held (``in_flight``) against
    ``concurrency`` (``C``), devices checked in (``candidates``, the aggregator's count) and
    devices whose state says ``waiting_for_slot`` (the monitor's count), and the staleness of
    accepted updates against ``staleness_target = C / K``."""

    concurrency: int
    in_flight: int
    candidates: int
    lease_s: float
    checkin_ttl_s: float
    waiting_for_slot: int
    staleness_target: float
    staleness: StalenessSummary | None = None


@dataclass(frozen=True)
class PrivacyView:
    """Central differential privacy of the aggregator (retained ``ServerState.privacy``,
    docs/PRIVACY.md): ``epsilon`` at ``delta`` is what the device with the most participations
    spent (``participation_max`` flushes out of ``participation_cap``), with noise multiplier
    ``noise_multiplier`` (std ``z * C`` per flush) and clip ``clip_norm`` (``C``).

    The distribution of participations over the ``devices`` that took part at least once:
    ``participation_histogram`` (participations -> devices, ascending), its median ``p50`` and
    ``p90`` (the smallest count with at least 50 % / 90 % of the devices at or below it), its
    ``mean``, and ``at_cap``, the devices whose updates are now refused
    (``dp_budget_exhausted``). ``budget_used`` is ``participation_max / participation_cap``."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    participation_cap: int
    participation_max: int
    devices: int
    accountant: str
    participation_histogram: Mapping[int, int] = field(default_factory=dict)
    p50: int | None = None
    p90: int | None = None
    mean: float | None = None
    at_cap: int = 0
    budget_used: float = 0.0


@dataclass(frozen=True)
class AggregatorTimes:
    """When the aggregator's state dir started (``ServerState.started_at``) and when its latest
    ``server/state`` and ``server/metrics`` were sent (None: not seen)."""

    started_at: float | None = None
    state_at: float | None = None
    metrics_at: float | None = None


@dataclass(frozen=True)
class AggregatorView:
    """Aggregator figures: ``server/state`` (retained) merged with the latest ``server/metrics``.

    Buffer fill, version and rejections come from whichever of the two is more recent.
    ``observed_updates_per_s`` is the monitor's own count of update packets seen on the broker
    over the last minute (first chunks and single-packet updates), independent of the server.
    """

    status: str | None = None
    session: int | None = None
    features: tuple[str, ...] = ()  # ServerState.features, e.g. ("receipts",)
    version: int | None = None
    buffer_fill: int | None = None
    buffer_size: int | None = None
    applied: int | None = None
    received: int | None = None
    rejected: Mapping[str, int] = field(default_factory=dict)
    updates_per_s: float | None = None
    bytes_per_s: float | None = None
    bytes_ingested: int | None = None
    staleness: Mapping[int, int] = field(default_factory=dict)
    accuracy: float | None = None
    accuracy_history: tuple[tuple[int, float], ...] = ()
    """``(version, accuracy)`` pairs, oldest first, one per version (bounded)."""
    times: AggregatorTimes = field(default_factory=AggregatorTimes, metadata=INLINE)
    """In JSON, its keys stand in this object (``started_at``, ``state_at``, ``metrics_at``)."""
    observed_updates_per_s: float = 0.0
    participation: ParticipationView | None = None  # a leasing aggregator (protocol 1.2)
    privacy: PrivacyView | None = None  # central differential privacy on (protocol 1.2)


@dataclass(frozen=True)
class ConnectionView:
    """The monitor's own MQTT connection (filled by the asyncio shell)."""

    broker: str
    client_id: str
    protocol: str | None
    connected: bool
    subscriptions: tuple[str, ...] = ()
    dropped: int = 0
    """Inbound messages the monitor's transport discarded (queue full)."""
    last_error: str | None = None
    """The transport's last connection error (refused, unreachable, TLS, ...)."""
    broker_stats: BrokerStatsView = field(default_factory=BrokerStatsView)


@dataclass(frozen=True)
class MonitorCounters:
    """What the fold saw: messages and bytes, observations by kind, undecodable messages by
    ``RejectReason`` value, and device states ignored under the presence (session) rule."""

    messages: int = 0
    bytes: int = 0
    by_kind: Mapping[str, int] = field(default_factory=dict)
    rejected: Mapping[str, int] = field(default_factory=dict)
    superseded_states: int = 0


@dataclass(frozen=True)
class FleetSnapshot:
    """Everything the monitor knows at ``at``: connection, devices, model and aggregator."""

    at: float
    fleet: str
    connection: ConnectionView | None
    devices: tuple[DeviceView, ...]
    counts: Mapping[str, int]
    """Devices by effective status."""
    model: ModelView | None
    aggregator: AggregatorView
    monitor: MonitorCounters

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = to_jsonable(self)
        return out

    def device(self, device_id: str) -> DeviceView | None:
        return next((d for d in self.devices if d.device_id == device_id), None)
