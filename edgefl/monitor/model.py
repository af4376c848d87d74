"""The monitor's fleet model: a sans-IO fold of decoded messages into a :class:`FleetSnapshot`.

``FleetModel.apply(observation, now=..., retained=...)`` folds one
:mod:`~edgefl.monitor.decode` observation; ``snapshot(now)`` renders the current view. No
clock, no I/O: the shell passes wall-clock ``now`` (Unix seconds).

Rules:

* **Presence (session) rule** (``docs/PROTOCOL.md`` §4.3). Per device the model keeps the highest
  ``session`` it has seen and ignores any state with a lower one (``DeviceState.supersedes``), so
  a late Will of an old connection cannot override the newer connection's state; equal sessions
  apply in arrival order. Ignored states are counted (``superseded_states``). The highest
  session is remembered even after the device's retained state is cleared.
* **Lost.** A device is ``lost`` when its state says so (the Will, ``lost_reason="will"``), or
  when it reported a connected status (online / idle / training) and ``now - last_seen`` exceeds
  ``stale_after`` seconds (``lost_reason="stale"``). ``offline`` (a clean shutdown) never turns
  lost. ``last_seen`` is the later of the state's ``at`` and the receipt time of the latest
  *live* (not retained) message about the device (its state or one of its updates): a retained
  message only says what the device said when it published it.
* **Cleared** retained messages (empty payloads) remove the device / manifest / server state.
* **Server state** follows the same session rule; **metrics** are taken in arrival order and
  their ``accuracy`` is appended to a bounded per-version history (the sparkline). The
  server state's central DP figures (``privacy``) become the aggregator view's ``privacy``
  (:mod:`~edgefl.monitor.privacy`).
* **Updates** seen on the broker are counted per device (distinct ``seq``; a chunked update
  counts once, at its first packet seen) and over a sliding one-minute window
  (``observed_updates_per_s``; over the time since the first observation while that is
  shorter).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, fields
from typing import Any

from edgefl.protocol.messages import (
    DeviceState,
    DeviceStatus,
    ModelManifest,
    ServerMetrics,
    ServerState,
    ServerStatus,
)
from edgefl.protocol.topics import (
    DeviceStateTopic,
    ModelArtifact,
    ModelManifestTopic,
    ServerMetricsTopic,
    ServerStateTopic,
)

from .broker_stats import BrokerStats
from .decode import (
    BrokerStat,
    Cleared,
    DeviceStateSeen,
    ManifestSeen,
    MetricsSeen,
    ModelChunkSeen,
    Observation,
    ReceiptSeen,
    ServerStateSeen,
    StateEncoding,
    Undecodable,
    UpdateSeen,
    observation_kind,
)
from .participation import with_participation
from .privacy import privacy_view
from .snapshot import (
    AggregatorTimes,
    AggregatorView,
    ConnectionView,
    DeviceView,
    FleetSnapshot,
    LostReason,
    ModelView,
    MonitorCounters,
)

__all__ = ["CONNECTED_STATUSES", "FleetModel", "FleetModelConfig"]

CONNECTED_STATUSES = frozenset({DeviceStatus.ONLINE, DeviceStatus.IDLE, DeviceStatus.TRAINING})
"""Statuses that claim a live connection, and can therefore go stale."""

_RATE_WINDOW = 60.0


@dataclass(frozen=True)
class FleetModelConfig:
    """``stale_after``: seconds without a sign of life after which a connected device is shown
    lost (``None``, the default, disables it: the device agent republishes its state only when
    something changes, so a healthy idle device can stay silent for hours).
    ``accuracy_history``: versions kept for the sparkline."""

    stale_after: float | None = None
    accuracy_history: int = 120

    def __post_init__(self) -> None:
        if self.stale_after is not None and self.stale_after <= 0:
            raise ValueError("stale_after must be > 0 (or None to disable)")
        if self.accuracy_history < 1:
            raise ValueError("accuracy_history must be >= 1")


@dataclass
class _Device:
    state: DeviceState
    encoding: StateEncoding
    live_at: float | None = None  # receipt time of the latest live message about the device


@dataclass
class _Counters:
    messages: int = 0
    bytes: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    superseded_states: int = 0


class FleetModel:
    """The fold; see the module docstring."""

    def __init__(self, fleet: str, config: FleetModelConfig | None = None) -> None:
        self.fleet = fleet
        self.config = config or FleetModelConfig()
        self._devices: dict[str, _Device] = {}
        self._sessions: dict[str, int] = {}
        self._manifest: ModelManifest | None = None
        self._chunks_seen: dict[int, set[int]] = {}
        self._server: ServerState | None = None
        self._metrics: ServerMetrics | None = None
        self._accuracy: dict[int, float] = {}
        self._update_times: deque[float] = deque()
        self._updates: dict[str, tuple[int, int]] = {}  # device -> (last seq, distinct seqs)
        self._receipts: dict[str, int | None] = {}  # device -> ``through`` of its last receipt
        self._broker = BrokerStats()
        self._counters = _Counters()
        self._first_at: float | None = None

    # ------------------------------------------------------------------ folding

    def count_message(self, size: int) -> None:
        """Count one received MQTT message of ``size`` payload bytes."""
        self._counters.messages += 1
        self._counters.bytes += size

    def apply(self, obs: Observation, *, now: float, retained: bool = False) -> None:
        """Fold one observation received at ``now``; ``retained``: the broker delivered it as a
        retained message (so it is not a sign that its sender is alive now)."""
        if self._first_at is None:
            self._first_at = now
        self._counters.by_kind[observation_kind(obs)] += 1
        match obs:
            case DeviceStateSeen(state=state, encoding=encoding):
                self._apply_state(state, encoding, now=now, retained=retained)
            case UpdateSeen():
                self._apply_update(obs, now=now, retained=retained)
            case ManifestSeen(manifest=manifest):
                self._manifest = manifest
            case ModelChunkSeen():
                self._apply_chunk(obs)
            case ServerStateSeen(state=server):
                self._apply_server(server)
            case MetricsSeen(metrics=metrics):
                self._apply_metrics(metrics)
            case ReceiptSeen(receipt=receipt):
                self._receipts[receipt.device_id] = receipt.through
                self._bound_receipts()
            case Cleared(topic=topic):
                self._apply_cleared(topic)
            case BrokerStat(name=name, value=value):
                self._broker.add(name, value, now=now)
            case Undecodable(reason=reason):
                self._counters.rejected[reason.value] += 1

    def _apply_state(
        self, state: DeviceState, encoding: StateEncoding, *, now: float, retained: bool
    ) -> None:
        device = state.device_id
        highest = self._sessions.get(device)
        if highest is not None and state.session < highest:
            self._counters.superseded_states += 1
            return
        self._sessions[device] = state.session
        record = self._devices.get(device)
        if record is None:
            record = self._devices[device] = _Device(state, encoding)
        else:
            record.state, record.encoding = state, encoding
        if not retained:
            record.live_at = now

    def _apply_chunk(self, obs: ModelChunkSeen) -> None:
        """Count a weights chunk of its version; forget versions older than the previous one."""
        if obs.artifact is not ModelArtifact.WEIGHTS:
            return
        self._chunks_seen.setdefault(obs.version, set()).add(obs.chunk.index)
        for old in [v for v in self._chunks_seen if v < obs.version - 1]:
            del self._chunks_seen[old]

    def _apply_server(self, server: ServerState) -> None:
        """Keep ``server`` when it supersedes the state held (see ``ServerState.supersedes``)."""
        if server.supersedes(self._server):
            self._server = server

    def _apply_metrics(self, metrics: ServerMetrics) -> None:
        """Keep the latest metrics and the accuracy of the last ``accuracy_history`` versions."""
        self._metrics = metrics
        if metrics.accuracy is not None:
            self._accuracy.pop(metrics.version, None)
            self._accuracy[metrics.version] = metrics.accuracy
            while len(self._accuracy) > self.config.accuracy_history:
                del self._accuracy[min(self._accuracy)]

    def _apply_update(self, obs: UpdateSeen, *, now: float, retained: bool) -> None:
        seen = self._updates.get(obs.device_id)
        if seen is None or seen[0] != obs.seq:
            self._updates[obs.device_id] = (obs.seq, 1 if seen is None else seen[1] + 1)
        record = self._devices.get(obs.device_id)
        if record is not None and not retained:
            record.live_at = now
        first_packet = obs.chunk is None or obs.chunk.index == 0
        if first_packet and not retained:
            self._update_times.append(now)
        self._trim_rate(now)

    def _bound_receipts(self) -> None:
        """Receipts of devices never seen stay bounded (a retained receipt per device id)."""
        if len(self._receipts) > 4 * max(len(self._devices), 1024):
            for device in [d for d in self._receipts if d not in self._devices]:
                del self._receipts[device]

    def _apply_cleared(self, topic: object) -> None:
        match topic:
            case DeviceStateTopic(device_id=device):
                self._devices.pop(device, None)
            case ModelManifestTopic():
                self._manifest = None
            case ServerStateTopic():
                self._server = None
            case ServerMetricsTopic():
                self._metrics = None
            case _:
                pass

    def _trim_rate(self, now: float) -> None:
        while self._update_times and self._update_times[0] < now - _RATE_WINDOW:
            self._update_times.popleft()

    # ------------------------------------------------------------------ queries

    @property
    def broker_stats(self) -> BrokerStats:
        return self._broker

    def device_ids(self) -> list[str]:
        return sorted(self._devices)

    def awaiting_metrics(self) -> bool:
        """The aggregator's retained state says it is online, but no metrics arrived yet."""
        server = self._server
        return server is not None and server.status is ServerStatus.ONLINE and not self._metrics

    def current_version(self) -> int | None:
        """The model version from the manifest, else from the server state or metrics."""
        if self._manifest is not None:
            return self._manifest.version
        versions = [m.version for m in (self._server, self._metrics) if m is not None]
        return max(versions) if versions else None

    def snapshot(self, now: float, *, connection: ConnectionView | None = None) -> FleetSnapshot:
        """The current view at wall time ``now``."""
        self._trim_rate(now)
        current = self.current_version()
        records = sorted(self._devices.items())
        devices = tuple(self._device_view(d, now, current) for _, d in records)
        counts = Counter(d.status for d in devices)
        c = self._counters
        return FleetSnapshot(
            at=now,
            fleet=self.fleet,
            connection=connection,
            devices=devices,
            counts=dict(sorted(counts.items())),
            model=self._model_view(now),
            aggregator=with_participation(
                self._aggregator_view(now), self._server, self._metrics, devices
            ),
            monitor=MonitorCounters(
                messages=c.messages,
                bytes=c.bytes,
                by_kind=dict(sorted(c.by_kind.items())),
                rejected=dict(sorted(c.rejected.items())),
                superseded_states=c.superseded_states,
            ),
        )

    def _device_view(self, record: _Device, now: float, current: int | None) -> DeviceView:
        state = record.state
        last_seen = state.at if record.live_at is None else max(state.at, record.live_at)
        status: str = state.status.value
        lost: LostReason | None = None
        stale_after = self.config.stale_after
        if state.status is DeviceStatus.LOST:
            lost = LostReason.WILL
        elif (
            state.status in CONNECTED_STATUSES
            and stale_after is not None
            and now - last_seen > stale_after
        ):
            status, lost = DeviceStatus.LOST.value, LostReason.STALE
        staleness = None
        if current is not None and state.model_version is not None:
            staleness = current - state.model_version
        return DeviceView(
            device_id=state.device_id,
            status=status,
            reported_status=state.status.value,
            lost_reason=lost,
            session=state.session,
            encoding=record.encoding.value,
            state_at=state.at,
            last_seen=last_seen,
            last_seen_age_s=max(0.0, now - last_seen),
            model_version=state.model_version,
            model_staleness=staleness,
            reasons=state.reasons,
            updates_sent=state.updates_sent,
            updates_seen=self._updates.get(state.device_id, (0, 0))[1],
            local_accuracy=state.local_accuracy,
            profile=state.profile,
            spool_depth=state.spool_depth,
            awaiting_receipt=state.awaiting_receipt,
            receipt_through=self._receipts.get(state.device_id),
            waiting_for_slot=state.waiting_for_slot,
        )

    def _model_view(self, now: float) -> ModelView | None:
        """The manifest's fields of the same name, and what the monitor derives."""
        m = self._manifest
        if m is None:
            return None
        derived: dict[str, Any] = {
            "format": m.format.value,
            "age_s": max(0.0, now - m.created_at),
            "chunks_seen": len(self._chunks_seen.get(m.version, ())),
            "onnx": m.onnx is not None,
        }
        from_manifest = {
            f.name: getattr(m, f.name) for f in fields(ModelView) if f.name not in derived
        }
        return ModelView(**from_manifest, **derived)

    def _aggregator_view(self, now: float) -> AggregatorView:
        state, metrics = self._server, self._metrics
        window = _RATE_WINDOW
        if self._first_at is not None:  # a monitor running for 5 s divides by 5 s, not 60
            window = min(window, max(now - self._first_at, 1.0))
        observed = len(self._update_times) / window
        history = tuple(sorted(self._accuracy.items()))
        if state is None and metrics is None:
            return AggregatorView(accuracy_history=history, observed_updates_per_s=observed)
        # figures both carry: take the more recent source
        newest: ServerState | ServerMetrics
        if state is None:
            newest = metrics  # type: ignore[assignment]
        elif metrics is None or state.at >= metrics.at:
            newest = state
        else:
            newest = metrics
        return AggregatorView(
            status=state.status.value if state is not None else None,
            session=state.session if state is not None else None,
            features=state.features if state is not None else (),
            version=newest.version,
            buffer_fill=newest.buffer_fill,
            buffer_size=newest.buffer_size,
            applied=newest.applied,
            received=metrics.received if metrics is not None else None,
            rejected=dict(newest.rejected),
            updates_per_s=metrics.updates_per_s if metrics is not None else None,
            bytes_per_s=metrics.bytes_per_s if metrics is not None else None,
            bytes_ingested=metrics.bytes_ingested if metrics is not None else None,
            staleness=dict(sorted(metrics.staleness.items())) if metrics is not None else {},
            accuracy=metrics.accuracy if metrics is not None else None,
            accuracy_history=history,
            times=AggregatorTimes(
                started_at=state.started_at if state is not None else None,
                state_at=state.at if state is not None else None,
                metrics_at=metrics.at if metrics is not None else None,
            ),
            observed_updates_per_s=observed,
            privacy=privacy_view(state),
        )
