"""What the probes saw at one instant: the single input of the eligibility policy.

A :class:`DeviceSnapshot` is a plain frozen value. Probes produce typed *readings*; the collector
(:func:`device_agent.eligibility.probes.collect_snapshot`) folds them into one snapshot. Every
signal may be unknown (``None``): a probe that failed or a signal the hardware does not have. The
policy decides per signal whether unknown is acceptable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import overload

__all__ = [
    "ClockReading",
    "DeviceSnapshot",
    "LoadReading",
    "MeteredReading",
    "PowerReading",
    "ProbeError",
    "Reading",
    "ThermalReading",
    "ThrottleReading",
    "ThrottleState",
]

# Raspberry Pi firmware `get_throttled` bits (raspberrypi.com/documentation/computers/os.html).
UNDER_VOLTAGE_NOW = 1 << 0
ARM_FREQ_CAPPED_NOW = 1 << 1
THROTTLED_NOW = 1 << 2
SOFT_TEMP_LIMIT_NOW = 1 << 3
UNDER_VOLTAGE_OCCURRED = 1 << 16
ARM_FREQ_CAPPED_OCCURRED = 1 << 17
THROTTLED_OCCURRED = 1 << 18
SOFT_TEMP_LIMIT_OCCURRED = 1 << 19


class _Bits:
    """A read-only bool of a :class:`ThrottleState`: whether any bit of ``mask`` is set."""

    def __init__(self, mask: int, doc: str | None = None) -> None:
        self.mask = mask
        self.__doc__ = doc

    @overload
    def __get__(self, state: None, owner: type | None = None) -> _Bits: ...

    @overload
    def __get__(self, state: ThrottleState, owner: type | None = None) -> bool: ...

    def __get__(self, state: ThrottleState | None, owner: type | None = None) -> bool | _Bits:
        return self if state is None else bool(state.raw & self.mask)


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Decoded Raspberry Pi ``get_throttled`` bitmask (``raw``, e.g. ``0x50005``)."""

    raw: int

    under_voltage_now = _Bits(UNDER_VOLTAGE_NOW)
    arm_freq_capped_now = _Bits(ARM_FREQ_CAPPED_NOW)
    throttled_now = _Bits(THROTTLED_NOW)
    soft_temp_limit_now = _Bits(SOFT_TEMP_LIMIT_NOW)
    under_voltage_occurred = _Bits(UNDER_VOLTAGE_OCCURRED)
    arm_freq_capped_occurred = _Bits(ARM_FREQ_CAPPED_OCCURRED)
    throttled_occurred = _Bits(THROTTLED_OCCURRED)
    soft_temp_limit_occurred = _Bits(SOFT_TEMP_LIMIT_OCCURRED)
    performance_limited_now = _Bits(
        ARM_FREQ_CAPPED_NOW | THROTTLED_NOW | SOFT_TEMP_LIMIT_NOW,
        "Frequency capped, throttled or at the soft temperature limit right now.",
    )


@dataclass(frozen=True, slots=True)
class ProbeError:
    """A probe that raised; its signals are unknown in this snapshot."""

    probe: str
    error: str


# --- readings: what one probe contributes -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadReading:
    load1: float
    load5: float
    load15: float
    cpu_count: int | None


@dataclass(frozen=True, slots=True)
class PowerReading:
    on_mains: bool | None
    battery_percent: float | None
    charging: bool | None


@dataclass(frozen=True, slots=True)
class ThermalReading:
    max_temp_c: float | None


@dataclass(frozen=True, slots=True)
class ThrottleReading:
    throttle: ThrottleState | None  # None: not a Raspberry Pi (no firmware interface)


@dataclass(frozen=True, slots=True)
class MeteredReading:
    metered: bool | None


@dataclass(frozen=True, slots=True)
class ClockReading:
    local_time: datetime
    monotonic: float


Reading = (
    LoadReading | PowerReading | ThermalReading | ThrottleReading | MeteredReading | ClockReading
)


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """Device conditions at monotonic time ``monotonic`` (seconds, ``time.monotonic()`` clock).

    ``local_time`` is the wall-clock time used for time windows (timezone-aware when it comes from
    the default clock). ``errors`` lists the probes that failed; their signals are ``None``.
    """

    monotonic: float
    local_time: datetime
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    cpu_count: int | None = None
    on_mains: bool | None = None
    battery_percent: float | None = None
    charging: bool | None = None
    max_temp_c: float | None = None
    throttle: ThrottleState | None = None
    metered: bool | None = None
    errors: tuple[ProbeError, ...] = ()

    def load_per_cpu(self, own_load: float = 0.0) -> float | None:
        """1-minute load divided by the CPU count, after removing ``own_load``; None if unknown."""
        if self.load1 is None or not self.cpu_count:
            return None
        return max(0.0, self.load1 - own_load) / self.cpu_count

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly view (for the device-state topic and logs)."""
        return {
            "monotonic": self.monotonic,
            "local_time": self.local_time.isoformat(),
            "load1": self.load1,
            "load5": self.load5,
            "load15": self.load15,
            "cpu_count": self.cpu_count,
            "on_mains": self.on_mains,
            "battery_percent": self.battery_percent,
            "charging": self.charging,
            "max_temp_c": self.max_temp_c,
            "throttled": None if self.throttle is None else f"0x{self.throttle.raw:x}",
            "metered": self.metered,
            "errors": [{"probe": e.probe, "error": e.error} for e in self.errors],
        }
