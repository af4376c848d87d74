"""The eligibility policy: a pure function from a :class:`DeviceSnapshot` to a :class:`Decision`.

Rules (each one can be relaxed by the policy):

* **power** — on external power (mains, USB, charging) is fine. On battery the device is
  ineligible (``on_battery``) unless ``allow_battery`` is set (which requires
  ``require_mains = false``); then the battery must hold at least ``min_battery_percent``
  (``battery_low``).
* **load** — 1-minute load average per CPU, after subtracting the agent's own training threads
  (``own_load``), above ``max_load_per_cpu`` is ``busy``. Once busy, the device stays busy until the
  load falls to ``resume_load_per_cpu`` (hysteresis).
* **temperature** — hottest thermal zone above ``max_temp_c`` is ``too_hot``; once too hot it stays
  so until the temperature is at or below ``resume_temp_c``.
* **Raspberry Pi firmware** — under-voltage right now is ``under_voltage`` (SD-card corruption
  risk); frequency capped / throttled / soft temperature limit right now is ``throttled``. The
  "has occurred since boot" bits are reported but never block.
* **network** — a metered link is ``metered`` unless ``allow_metered``.
* **time** — outside every configured window is ``outside_window`` (no windows: always).
* **unknown** signals (``None`` in the snapshot: failed probe or missing hardware) are accepted or
  rejected per signal by the ``unknown_*_ok`` flags, with a ``*_unknown`` reason.

:class:`EligibilityMonitor` wraps :func:`evaluate` with the little state a scheduler needs: the
previous decision (for hysteresis), a settle delay before becoming eligible, and transition events.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, time
from enum import StrEnum

from device_agent.eligibility.snapshot import DeviceSnapshot

__all__ = [
    "Decision",
    "EligibilityMonitor",
    "EligibilityPolicy",
    "IneligibleReason",
    "MonitorStatistics",
    "MonitorUpdate",
    "PolicyError",
    "TimeWindow",
    "Transition",
    "TransitionKind",
    "evaluate",
]


class PolicyError(ValueError):
    """An invalid policy setting; ``field`` names the offending field (e.g. ``resume_temp_c``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class IneligibleReason(StrEnum):
    """Why a device may not train now. Values are reported on the device-state topic: stable."""

    ON_BATTERY = "on_battery"
    BATTERY_LOW = "battery_low"
    TOO_HOT = "too_hot"
    UNDER_VOLTAGE = "under_voltage"
    THROTTLED = "throttled"
    BUSY = "busy"
    METERED = "metered"
    OUTSIDE_WINDOW = "outside_window"
    POWER_UNKNOWN = "power_unknown"
    LOAD_UNKNOWN = "load_unknown"
    TEMP_UNKNOWN = "temp_unknown"
    THROTTLE_UNKNOWN = "throttle_unknown"
    METERED_UNKNOWN = "metered_unknown"
    SETTLING = "settling"  # conditions fine, waiting settle_seconds (EligibilityMonitor only)


_REASON_ORDER = {reason: index for index, reason in enumerate(IneligibleReason)}

_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A daily local-time window ``"HH:MM-HH:MM"``: start inclusive, end exclusive.

    A window whose end is earlier than its start crosses midnight (``"22:00-06:00"``);
    ``"00:00-24:00"`` is the whole day. Equal start and end is rejected as ambiguous.
    """

    spec: str
    start_minute: int = field(init=False)
    end_minute: int = field(init=False)

    def __post_init__(self) -> None:
        match = _WINDOW_RE.match(self.spec) if isinstance(self.spec, str) else None
        if match is None:
            raise PolicyError("windows", f"expected 'HH:MM-HH:MM', got {self.spec!r}")
        sh, sm, eh, em = (int(g) for g in match.groups())
        if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
            raise PolicyError("windows", f"time of day out of range in {self.spec!r}")
        start, end = sh * 60 + sm, eh * 60 + em
        if start == end:
            raise PolicyError(
                "windows", f"empty window {self.spec!r} (use '00:00-24:00' for the whole day)"
            )
        object.__setattr__(self, "start_minute", start)
        object.__setattr__(self, "end_minute", end)
        object.__setattr__(self, "spec", f"{sh:02d}:{sm:02d}-{eh:02d}:{em:02d}")

    @property
    def crosses_midnight(self) -> bool:
        return self.end_minute < self.start_minute

    def contains(self, when: time | datetime) -> bool:
        """Whether the local time of day ``when`` (seconds ignored) lies inside the window."""
        minute = when.hour * 60 + when.minute
        if self.crosses_midnight:
            return minute >= self.start_minute or minute < self.end_minute
        return self.start_minute <= minute < self.end_minute

    def __str__(self) -> str:
        return self.spec


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(name, f"expected a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise PolicyError(name, f"expected a value in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True, slots=True)
class EligibilityPolicy:
    """When a device may train. Validated at construction (raises :class:`PolicyError`)."""

    require_mains: bool = True
    allow_battery: bool = False
    min_battery_percent: float = 80.0
    max_load_per_cpu: float = 0.5
    resume_load_per_cpu: float = 0.35
    max_temp_c: float = 70.0
    resume_temp_c: float = 65.0
    reject_throttled: bool = True
    reject_under_voltage: bool = True
    allow_metered: bool = False
    windows: tuple[TimeWindow, ...] = ()
    settle_seconds: float = 0.0
    unknown_power_ok: bool = False
    unknown_load_ok: bool = False
    unknown_temp_ok: bool = True
    unknown_throttle_ok: bool = True
    unknown_metered_ok: bool = True

    def __post_init__(self) -> None:
        _check_range("min_battery_percent", self.min_battery_percent, 0.0, 100.0)
        _check_range("max_load_per_cpu", self.max_load_per_cpu, 0.0, 1000.0)
        _check_range("resume_load_per_cpu", self.resume_load_per_cpu, 0.0, 1000.0)
        _check_range("max_temp_c", self.max_temp_c, -40.0, 150.0)
        _check_range("resume_temp_c", self.resume_temp_c, -40.0, 150.0)
        _check_range("settle_seconds", self.settle_seconds, 0.0, 7 * 86400.0)
        if self.resume_load_per_cpu > self.max_load_per_cpu:
            raise PolicyError(
                "resume_load_per_cpu",
                f"must not exceed max_load_per_cpu ({self.max_load_per_cpu:g}), "
                f"got {self.resume_load_per_cpu!r}",
            )
        if self.resume_temp_c > self.max_temp_c:
            raise PolicyError(
                "resume_temp_c",
                f"must not exceed max_temp_c ({self.max_temp_c:g}), got {self.resume_temp_c!r}",
            )
        if self.allow_battery and self.require_mains:
            raise PolicyError(
                "allow_battery", "true contradicts require_mains = true; set require_mains = false"
            )
        if not isinstance(self.windows, tuple) or not all(
            isinstance(w, TimeWindow) for w in self.windows
        ):
            raise PolicyError("windows", f"expected a tuple of TimeWindow, got {self.windows!r}")

    def in_window(self, when: time | datetime) -> bool:
        return not self.windows or any(w.contains(when) for w in self.windows)


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of one evaluation. ``changed``: eligibility differs from the previous decision
    (always true for the first one)."""

    eligible: bool
    reasons: tuple[IneligibleReason, ...]
    changed: bool

    def to_dict(self) -> dict[str, object]:
        return {"eligible": self.eligible, "reasons": [r.value for r in self.reasons]}


def _power_reasons(policy: EligibilityPolicy, snap: DeviceSnapshot) -> list[IneligibleReason]:
    if snap.on_mains is True:
        return []
    if snap.on_mains is None:
        return [] if policy.unknown_power_ok else [IneligibleReason.POWER_UNKNOWN]
    # on battery
    if policy.require_mains or not policy.allow_battery:
        return [IneligibleReason.ON_BATTERY]
    if snap.battery_percent is None:
        return [] if policy.unknown_power_ok else [IneligibleReason.POWER_UNKNOWN]
    if snap.battery_percent < policy.min_battery_percent:
        return [IneligibleReason.BATTERY_LOW]
    return []


def evaluate(
    policy: EligibilityPolicy,
    snapshot: DeviceSnapshot,
    previous: Decision | None,
    *,
    own_load: float = 0.0,
) -> Decision:
    """Decide whether the device may train now. Pure.

    Args:
        policy: the rules.
        snapshot: what the probes saw.
        previous: the decision before this one (``None`` at start); drives hysteresis: a device
            that was ``busy`` / ``too_hot`` must come down to the *resume* thresholds, every other
            device is judged against the stricter *max* thresholds.
        own_load: runnable threads the agent itself adds to the load average (its training threads
            while it trains), subtracted before comparing so training does not stop itself.
    """
    was = frozenset(previous.reasons) if previous is not None else frozenset()
    reasons: list[IneligibleReason] = [
        *_power_reasons(policy, snapshot),
        *_load_and_heat_reasons(policy, snapshot, was, own_load),
        *_link_and_window_reasons(policy, snapshot),
    ]
    ordered = tuple(sorted(set(reasons), key=_REASON_ORDER.__getitem__))
    eligible = not ordered
    changed = previous is None or previous.eligible != eligible
    return Decision(eligible=eligible, reasons=ordered, changed=changed)


@dataclass(frozen=True)
class _Threshold:
    """A reading with an upper limit and hysteresis: over ``limit`` it is ``over``, and stays
    so until it is back under ``resume``; an unknown reading is ``unknown`` (None: tolerated)."""

    value: float | None
    limit: float
    resume: float
    over: IneligibleReason
    unknown: IneligibleReason | None

    def reason(self, was: frozenset[IneligibleReason]) -> IneligibleReason | None:
        if self.value is None:
            return self.unknown
        limit = self.resume if self.over in was else self.limit
        return self.over if self.value > limit else None


def _load_and_heat_reasons(
    policy: EligibilityPolicy,
    snapshot: DeviceSnapshot,
    was: frozenset[IneligibleReason],
    own_load: float,
) -> list[IneligibleReason]:
    """``busy`` / ``too_hot`` with hysteresis (a device that was busy or hot must come down to
    the resume thresholds), unknown readings, under-voltage and throttling."""
    thresholds = (
        _Threshold(
            snapshot.load_per_cpu(own_load),
            policy.max_load_per_cpu,
            policy.resume_load_per_cpu,
            IneligibleReason.BUSY,
            None if policy.unknown_load_ok else IneligibleReason.LOAD_UNKNOWN,
        ),
        _Threshold(
            snapshot.max_temp_c,
            policy.max_temp_c,
            policy.resume_temp_c,
            IneligibleReason.TOO_HOT,
            None if policy.unknown_temp_ok else IneligibleReason.TEMP_UNKNOWN,
        ),
    )
    reasons = [r for t in thresholds if (r := t.reason(was)) is not None]
    throttle = snapshot.throttle
    if throttle is None:
        if not policy.unknown_throttle_ok:
            reasons.append(IneligibleReason.THROTTLE_UNKNOWN)
    else:
        if policy.reject_under_voltage and throttle.under_voltage_now:
            reasons.append(IneligibleReason.UNDER_VOLTAGE)
        if policy.reject_throttled and throttle.performance_limited_now:
            reasons.append(IneligibleReason.THROTTLED)
    return reasons


def _link_and_window_reasons(
    policy: EligibilityPolicy, snapshot: DeviceSnapshot
) -> list[IneligibleReason]:
    """A metered (or unknown) link and the allowed time windows."""
    reasons: list[IneligibleReason] = []
    if snapshot.metered is None:
        if not policy.unknown_metered_ok:
            reasons.append(IneligibleReason.METERED_UNKNOWN)
    elif snapshot.metered and not policy.allow_metered:
        reasons.append(IneligibleReason.METERED)
    if not policy.in_window(snapshot.local_time):
        reasons.append(IneligibleReason.OUTSIDE_WINDOW)
    return reasons


# --- monitor ------------------------------------------------------------------------------------


class TransitionKind(StrEnum):
    BECAME_ELIGIBLE = "became_eligible"
    BECAME_INELIGIBLE = "became_ineligible"
    REASONS_CHANGED = "reasons_changed"  # still ineligible, for different reasons


@dataclass(frozen=True, slots=True)
class Transition:
    kind: TransitionKind
    reasons: tuple[IneligibleReason, ...]
    monotonic: float


@dataclass(frozen=True, slots=True)
class MonitorUpdate:
    decision: Decision
    transitions: tuple[Transition, ...]


@dataclass(frozen=True, slots=True)
class MonitorStatistics:
    updates: int
    eligible_updates: int
    became_eligible: int
    became_ineligible: int
    reason_counts: dict[str, int]  # updates in which each reason was present
    probe_error_counts: dict[str, int]  # snapshots in which each probe failed


class EligibilityMonitor:
    """Sans-IO state holder: feed snapshots, get decisions and transition events.

    Adds to :func:`evaluate`:

    * hysteresis across calls (the previous decision is remembered);
    * ``policy.settle_seconds``: after conditions become fine the device reports ``settling`` until
      they have held that long (measured on ``snapshot.monotonic``), so a briefly idle or briefly
      plugged-in device does not start a training it must abort a minute later;
    * transitions: the first update always yields ``became_eligible`` or ``became_ineligible``.
    """

    def __init__(self, policy: EligibilityPolicy) -> None:
        self._policy = policy
        self._decision: Decision | None = None
        self._snapshot: DeviceSnapshot | None = None
        self._fine_since: float | None = None
        self._eligible_since: float | None = None
        self._updates = 0
        self._eligible_updates = 0
        self._became_eligible = 0
        self._became_ineligible = 0
        self._reason_counts: Counter[str] = Counter()
        self._probe_errors: Counter[str] = Counter()

    @property
    def policy(self) -> EligibilityPolicy:
        return self._policy

    def set_policy(self, policy: EligibilityPolicy) -> None:
        """Swap the policy (config reload); takes effect at the next :meth:`update`."""
        self._policy = policy

    @property
    def decision(self) -> Decision | None:
        return self._decision

    @property
    def snapshot(self) -> DeviceSnapshot | None:
        return self._snapshot

    @property
    def eligible(self) -> bool:
        return self._decision is not None and self._decision.eligible

    def eligible_for(self, now_monotonic: float) -> float:
        """Seconds the device has been continuously eligible (0.0 when it is not)."""
        if self._eligible_since is None:
            return 0.0
        return max(0.0, now_monotonic - self._eligible_since)

    def update(self, snapshot: DeviceSnapshot, *, own_load: float = 0.0) -> MonitorUpdate:
        previous = self._decision
        raw = evaluate(self._policy, snapshot, previous, own_load=own_load)
        now = snapshot.monotonic
        eligible, reasons = raw.eligible, raw.reasons
        if not eligible:
            self._fine_since = None
        elif previous is None or not previous.eligible:
            if self._fine_since is None:
                self._fine_since = now
            if now - self._fine_since < self._policy.settle_seconds:
                eligible, reasons = False, (IneligibleReason.SETTLING,)
        decision = Decision(
            eligible=eligible,
            reasons=reasons,
            changed=previous is None or previous.eligible != eligible,
        )

        transitions: list[Transition] = []
        if decision.changed:
            if eligible:
                kind = TransitionKind.BECAME_ELIGIBLE
                self._became_eligible += 1
                self._eligible_since = now
            else:
                kind = TransitionKind.BECAME_INELIGIBLE
                self._became_ineligible += 1
                self._eligible_since = None
            transitions.append(Transition(kind, reasons, now))
        elif previous is not None and previous.reasons != reasons:
            transitions.append(Transition(TransitionKind.REASONS_CHANGED, reasons, now))

        self._decision = decision
        self._snapshot = snapshot
        self._updates += 1
        self._eligible_updates += int(eligible)
        self._reason_counts.update(r.value for r in reasons)
        self._probe_errors.update(e.probe for e in snapshot.errors)
        return MonitorUpdate(decision, tuple(transitions))

    def statistics(self) -> MonitorStatistics:
        return MonitorStatistics(
            updates=self._updates,
            eligible_updates=self._eligible_updates,
            became_eligible=self._became_eligible,
            became_ineligible=self._became_ineligible,
            reason_counts=dict(self._reason_counts),
            probe_error_counts=dict(self._probe_errors),
        )
