"""Who took part in how many flushes: the per-device participation counts and the open buffer.

A device's *participations* are the flushes (server steps) whose buffer held one of its updates;
its epsilon is the composition of that many Gaussian mechanisms
(:mod:`edgefl.privacy.accountant`). :class:`ParticipationLedger` is the sans-IO state:

* :meth:`~ParticipationLedger.admit` refuses a device already in the open buffer
  (``DP_ONE_PER_BUFFER``) and a device whose count, with the open buffer's flush, would exceed
  the cap (``DP_BUDGET_EXHAUSTED``: ``count >= cap``);
* :meth:`~ParticipationLedger.enter` records an accepted update's device in the buffer;
* :meth:`~ParticipationLedger.flush` adds one participation to every device in the buffer;
  :meth:`~ParticipationLedger.drop_buffer` forgets the buffer (no step: no release, no cost).

The counts only grow at a flush, so a restart that restores the counts of the last step and
replays the open buffer's updates (what the aggregator service does) rebuilds the same ledger;
:class:`PrivacyState` is what a snapshot carries, with a JSON form for the service's store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from edgefl.errors import RejectReason, UpdateRejected
from edgefl.privacy.central import CentralDP

__all__ = ["ParticipationLedger", "PrivacyState", "PrivacyStatistics"]


@dataclass(frozen=True)
class PrivacyState:
    """Persisted privacy state: participations per device and the devices in the open buffer."""

    participations: Mapping[str, int] = field(default_factory=dict)
    buffer_devices: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``{"participations": {...}, "buffer_devices": [...]}``)."""
        return {
            "participations": dict(self.participations),
            "buffer_devices": list(self.buffer_devices),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacyState:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a malformed value."""
        counts = data.get("participations", {})
        devices = data.get("buffer_devices", [])
        if not isinstance(counts, Mapping) or not isinstance(devices, list):
            raise ValueError("privacy state: participations must be an object, buffer a list")
        out = {str(k): int(v) for k, v in counts.items()}
        if any(v < 0 for v in out.values()):
            raise ValueError("privacy state: participation counts must be >= 0")
        return cls(participations=out, buffer_devices=tuple(str(d) for d in devices))


@dataclass(frozen=True)
class PrivacyStatistics:
    """What the aggregator reports about central DP (server state, monitor, Prometheus)."""

    epsilon: float  # max over devices, at `delta`
    delta: float
    noise_multiplier: float
    clip_norm: float
    participation_cap: int
    participation_max: int
    devices: int  # devices with at least one participation
    participation_histogram: Mapping[int, int]  # participations -> number of devices
    accountant: str


class ParticipationLedger:
    """Participation counts per device and the open buffer's devices (module docstring)."""

    def __init__(self, cap: int, state: PrivacyState | None = None) -> None:
        if cap < 1:
            raise ValueError(f"participation cap must be >= 1, got {cap}")
        self._cap = cap
        state = state or PrivacyState()
        self._counts: dict[str, int] = {}
        for device, n in state.participations.items():
            if n < 0:
                raise ValueError(f"participations of {device!r} must be >= 0, got {n}")
            if n:
                self._counts[str(device)] = int(n)
        self._buffer: set[str] = set(state.buffer_devices)
        if len(self._buffer) != len(state.buffer_devices):
            raise ValueError("privacy state lists a device twice in the open buffer")

    @property
    def cap(self) -> int:
        return self._cap

    def participations(self, device_id: str) -> int:
        return self._counts.get(device_id, 0)

    def admissible(self, device_id: str) -> bool:
        """Whether :meth:`admit` would accept an update of ``device_id`` now (no side effect):
        e.g. to grant no participation lease to a device whose update would be refused."""
        return device_id not in self._buffer and self._counts.get(device_id, 0) < self._cap

    def admit(self, device_id: str) -> None:
        """Raise ``UpdateRejected`` unless an update of ``device_id`` may enter the buffer."""
        if device_id in self._buffer:
            raise UpdateRejected(
                RejectReason.DP_ONE_PER_BUFFER,
                f"device {device_id!r} already has an update in this buffer",
            )
        n = self._counts.get(device_id, 0)
        if n >= self._cap:
            raise UpdateRejected(
                RejectReason.DP_BUDGET_EXHAUSTED,
                f"device {device_id!r} took part in {n} flushes, the cap is {self._cap}",
            )

    def enter(self, device_id: str) -> None:
        self._buffer.add(device_id)

    def flush(self) -> None:
        """The buffer was released (a step): one more participation for each of its devices."""
        for device in self._buffer:
            self._counts[device] = self._counts.get(device, 0) + 1
        self._buffer.clear()

    def drop_buffer(self) -> None:
        self._buffer.clear()

    def max_participations(self) -> int:
        return max(self._counts.values(), default=0)

    def histogram(self) -> Mapping[int, int]:
        """``participations -> number of devices`` over devices with at least one."""
        return MappingProxyType(dict(sorted(Counter(self._counts.values()).items())))

    def state(self, *, buffer: bool = True) -> PrivacyState:
        return PrivacyState(
            participations=dict(self._counts),
            buffer_devices=tuple(sorted(self._buffer)) if buffer else (),
        )

    def statistics(self, config: CentralDP) -> PrivacyStatistics:
        """The figures to report, epsilon of the most frequent participant (cached)."""
        most = self.max_participations()
        return PrivacyStatistics(
            epsilon=config.epsilon(most),
            delta=config.delta,
            noise_multiplier=config.noise_multiplier,
            clip_norm=config.clip_norm,
            participation_cap=self._cap,
            participation_max=most,
            devices=len(self._counts),
            participation_histogram=self.histogram(),
            accountant=str(config.accountant),
        )
