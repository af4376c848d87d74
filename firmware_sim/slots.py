"""Where the time of a simulated run went: a slot ledger and a one-line bottleneck verdict.

Both algorithms are given ``target`` *slots*, the number of devices the server wants training
at once: FedBuff's concurrency ``C``, FedAvg's selected cohort (``C`` as well by default, see
docs/SIMULATOR.md). Between two events every slot is in exactly one state:

* ``training``: a device holds it and is downloading, training or uploading;
* ``lost_lease``: the device holding it dropped out silently, and the slot stays taken until
  the lease expires (the runtime's participation leases behave this way);
* ``waiting_for_device``: the scheduler wanted to fill it but found no idle, available device
  (the fleet is too small or asleep: *availability*);
* ``round_barrier``: FedAvg only; its member finished, dropped out or was never selected for
  lack of time, and the slot idles until the round closes (*synchronisation*).

:class:`SlotLedger` integrates these counts over virtual time (piecewise constant between events,
so ``∫ n(t) dt`` is a sum of ``n · Δt``) and also keeps the *work* of every training, in
device-seconds from its start to its end, by how it ended: ``applied``, ``dropout``, ``crash``,
``stale``, ``deadline`` (a FedAvg straggler aborted when its round closed), ``lease_expired``
(a FedBuff update that arrived after its lease and the grace) or ``rejected``.

:func:`verdict` turns the result into the summary's ``bottleneck`` line, e.g.
``availability-bound: 4.6 of 20 slots filled on average; add devices or lower concurrency``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "STARVED_FRACTION",
    "SlotLedger",
    "SlotSeries",
    "SlotState",
    "Work",
    "starved",
    "verdict",
]

STARVED_FRACTION = 0.25
"""A run whose slots waited for a device this fraction of the time or more was *starved*."""

HEALTHY_FILL = 0.8
"""At least this fraction of slot time training, and at most :data:`HEALTHY_WASTE` of the work
lost: the run went as fast as its devices compute (``compute-bound``)."""

HEALTHY_WASTE = 0.2


class SlotState(StrEnum):
    """What a slot is doing (see module docstring)."""

    TRAINING = "training"
    LOST_LEASE = "lost_lease"
    WAITING_FOR_DEVICE = "waiting_for_device"
    ROUND_BARRIER = "round_barrier"


class Work(StrEnum):
    """How the work of one training ended."""

    APPLIED = "applied"
    DROPOUT = "dropout"
    CRASH = "crash"
    STALE = "stale"
    DEADLINE = "deadline"
    LEASE_EXPIRED = "lease_expired"
    REJECTED = "rejected"


@dataclass(frozen=True)
class SlotSeries:
    """Slot counts after each change: ``training[i]`` devices training, ``lost_lease[i]`` and
    ``waiting[i]`` slots from ``t[i]`` on; ``target`` slots in all."""

    t: NDArray[np.float64]
    training: NDArray[np.int64]
    lost_lease: NDArray[np.int64]
    waiting: NDArray[np.int64]
    target: int


@dataclass(eq=False)
class SlotLedger:
    """Integrates slot states over time and sums work by outcome (sans-IO; the caller passes
    the time). Call :meth:`observe` after every change of the counts, in time order."""

    target: int
    _t: float = 0.0
    _state: tuple[int, int, int] = (0, 0, 0)  # training, lost_lease, waiting
    _seconds: dict[SlotState, float] = field(default_factory=lambda: dict.fromkeys(SlotState, 0.0))
    _work: dict[Work, float] = field(default_factory=lambda: dict.fromkeys(Work, 0.0))
    _series_t: array[float] = field(default_factory=lambda: array("d"))
    _series_n: array[int] = field(default_factory=lambda: array("q"))
    rounds: int = 0
    round_seconds: float = 0.0
    round_updates: int = 0

    def observe(self, t: float, training: int, lost_lease: int = 0, waiting: int = 0) -> None:
        """From ``t`` on, ``training`` devices train, ``lost_lease`` slots are held by lost
        devices and ``waiting`` slots wait for a device; the rest of ``target`` is barrier."""
        self._advance(t)
        state = (training, lost_lease, waiting)
        if state != self._state:
            self._state = state
            self._series_t.append(t)
            self._series_n.extend(state)

    def work(self, kind: Work, seconds: float) -> None:
        """One training ended ``kind`` after ``seconds`` of device time."""
        self._work[kind] += max(0.0, seconds)

    def round_closed(self, seconds: float, updates: int) -> None:
        """A FedAvg round closed after ``seconds`` with ``updates`` accepted."""
        self.rounds += 1
        self.round_seconds += seconds
        self.round_updates += updates

    def _advance(self, t: float) -> None:
        dt = t - self._t
        if dt > 0:
            training, lost, waiting = self._state
            s = self._seconds
            s[SlotState.TRAINING] += dt * training
            s[SlotState.LOST_LEASE] += dt * lost
            s[SlotState.WAITING_FOR_DEVICE] += dt * waiting
            s[SlotState.ROUND_BARRIER] += dt * max(0, self.target - training - lost - waiting)
            self._t = t

    def series(self) -> SlotSeries:
        n = np.frombuffer(self._series_n, dtype=np.int64).reshape(-1, 3) if self._series_n else None
        cols = n if n is not None else np.zeros((0, 3), dtype=np.int64)
        return SlotSeries(
            t=np.frombuffer(self._series_t, dtype=np.float64).copy(),
            training=cols[:, 0].copy(),
            lost_lease=cols[:, 1].copy(),
            waiting=cols[:, 2].copy(),
            target=self.target,
        )

    def summary(self, end_t: float) -> dict[str, Any]:
        """The ``utilisation`` object of the run summary, integrated up to ``end_t``."""
        self._advance(end_t)
        total = sum(self._seconds.values())
        work_total = sum(self._work.values())
        lost = work_total - self._work[Work.APPLIED]
        out: dict[str, Any] = {
            "target_slots": self.target,
            "mean_training": self._seconds[SlotState.TRAINING] / self._t if self._t > 0 else 0.0,
            "slot_time": {
                s.value: (v / total if total > 0 else 0.0) for s, v in self._seconds.items()
            },
            "slot_seconds": {s.value: v for s, v in self._seconds.items()},
            "work_s": {w.value: v for w, v in self._work.items()},
            "work_lost_fraction": lost / work_total if work_total > 0 else 0.0,
        }
        if self.rounds:
            out["rounds"] = self.rounds
            out["mean_round_s"] = self.round_seconds / self.rounds
            out["mean_updates_per_round"] = self.round_updates / self.rounds
        return out


def starved(utilisation: dict[str, Any]) -> bool:
    """Whether the run's slots waited for a device at least :data:`STARVED_FRACTION` of the
    time."""
    waiting = float(utilisation["slot_time"][SlotState.WAITING_FOR_DEVICE])
    return waiting >= STARVED_FRACTION


def _lost_detail(util: dict[str, Any]) -> str:
    work = util["work_s"]
    total = sum(work.values()) or 1.0
    parts = [
        f"{k} {100 * v / total:.0f}%"
        for k, v in sorted(work.items(), key=lambda kv: -kv[1])
        if k != Work.APPLIED and v / total >= 0.01
    ]
    return ", ".join(parts) or "none"


def verdict(util: dict[str, Any], *, cohorts: bool) -> str:
    """The one-line bottleneck of a run from its ``utilisation`` (see module docstring).

    Healthy (training ``>= HEALTHY_FILL`` of slot time, work lost ``<= HEALTHY_WASTE``):
    ``compute-bound``. Otherwise the largest loss of slot time names it: waiting for a device
    (``availability-bound``), the round barrier (``straggler-bound``), leases of lost devices
    (``lease-bound``), or, when the slots were busy but the work was thrown away, ``waste-bound``.
    """
    share = util["slot_time"]
    target = util["target_slots"]
    filled = util["mean_training"]
    lost = util["work_lost_fraction"]
    if share[SlotState.TRAINING] >= HEALTHY_FILL and lost <= HEALTHY_WASTE:
        more = "larger cohorts" if cohorts else "more concurrency"
        return (
            f"compute-bound: {filled:.1f} of {target} slots training on average, "
            f"{100 * lost:.0f}% of device work lost; {more} would go faster"
        )
    idle = {
        SlotState.WAITING_FOR_DEVICE: share[SlotState.WAITING_FOR_DEVICE],
        SlotState.ROUND_BARRIER: share[SlotState.ROUND_BARRIER],
        SlotState.LOST_LEASE: share[SlotState.LOST_LEASE],
    }
    worst = max(idle, key=lambda s: idle[s])
    if idle[worst] < lost * share[SlotState.TRAINING]:
        return (
            f"waste-bound: {100 * lost:.0f}% of device work lost ({_lost_detail(util)}); "
            "fewer dropouts, a longer deadline or less staleness would go faster"
        )
    if worst is SlotState.WAITING_FOR_DEVICE:
        fewer = "smaller cohorts" if cohorts else "lower concurrency"
        return (
            f"availability-bound: {filled:.1f} of {target} slots filled on average; "
            f"add devices or {fewer}"
        )
    if worst is SlotState.ROUND_BARRIER:
        return (
            f"straggler-bound: {100 * idle[worst]:.0f}% of slot time idle waiting for rounds to "
            f"close ({filled:.1f} of {target} slots training on average)"
        )
    return (
        f"lease-bound: {100 * idle[worst]:.0f}% of slot time held by leases of devices that "
        "dropped out; shorter leases would go faster"
    )
