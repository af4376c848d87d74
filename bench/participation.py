"""Participation control at 100, 10,000 and 1,000,000 devices: leases against stateless sampling.

Issue 16 asks which shape of server-controlled participation holds FedBuff's concurrency ``C``
on a real fleet. This benchmark runs both on the same event-driven fleet model, side by side:

* **leases** -- the product's decision code itself: :class:`edgefl.participation.LeaseBook` over
  the aggregator's :class:`edgefl.participation.CheckInPool`. Devices check in when they become
  available (and renew every ``checkin_ttl_s / 2``), withdraw when they leave cleanly, and train
  only under a lease. ``presence`` variant: the aggregator also withdraws a device, and ends its
  lease, when the broker publishes its Last Will (``keepalive * 1.5`` after it vanished).
* **sampling** -- the stateless alternative: the server publishes a participation probability
  ``p`` (retained, re-published only when it moves by more than 10%) chosen by Little's law to
  hold ``C`` in flight (``p = C * T / (E_idle * D)``, ``E_idle`` from presence, ``D`` the mean
  training time, ``T`` the draw period); every idle, available device draws once per period.

The fleet: each device alternates available / away periods (exponential, mean 1 h / 3 h, so a
quarter is available), trains for log-normal(mean 300 s, sigma 0.5) seconds, and vanishes
silently in 10% of its trainings (away for a fresh away period, holding what it held). A device
whose available period ends during a training aborts and withdraws (a clean loss). At half time
a **mass dropout** makes 80% of all devices vanish silently at once.

Measured, per policy and fleet size: broker messages per applied update (participation traffic
only: check-ins, renewals, withdrawals and leases, or ``p`` publications and their fan-out; the
update itself and presence are the same for both), live trainings in flight against ``C`` (mean,
mean absolute deviation, p99, time above ``C``), slots held by dead devices, fairness (the
dispersion of updates against each device's share of available hours: about 1 is as fair as
uniform random draws), and the live in-flight mean in the lease length after the mass dropout
against before it.

    python bench/participation.py [--sizes 100,10000,1000000] [--hours 4] [--json]

With ``--json`` the last stdout line is ``{"rows": [...]}``, one row per size and policy.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum

import numpy as np

from edgefl.participation import (
    DEFAULT_CHECKIN_TTL_S,
    CheckInPool,
    LeaseBook,
    ParticipationConfig,
)

MEAN_ON_S = 3600.0
MEAN_OFF_S = 3 * 3600.0
TRAIN_MEAN_S = 300.0
TRAIN_SIGMA = 0.5
DROPOUT = 0.1
LEASE_S = 900.0
CHECKIN_TTL_S = DEFAULT_CHECKIN_TTL_S
KEEPALIVE_S = 60.0
DRAW_PERIOD_S = 60.0
MASS_DROPOUT = 0.8
SAMPLE_EVERY_S = 10.0


class Ev(IntEnum):
    ON = 0
    OFF = 1
    RENEW = 2
    TRAIN_END = 3
    VANISH = 4
    LOST = 5
    EXPIRY = 6
    DRAW = 7
    MASS = 8
    SAMPLE = 9
    ABORT = 10


@dataclass
class Row:
    devices: int
    policy: str
    concurrency: int
    applied: int = 0
    messages_per_update: float = 0.0
    in_flight_mean: float = 0.0
    in_flight_mad: float = 0.0
    in_flight_p99: float = 0.0
    above_c_fraction: float = 0.0
    dead_slot_fraction: float = 0.0
    fairness_dispersion: float = 0.0
    live_in_flight_after_mass: float = 0.0
    live_in_flight_before_mass: float = 0.0
    wall_s: float = 0.0


@dataclass
class _Counts:
    messages: int = 0
    applied: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, live, dead slots)


class FleetSim:
    """The shared fleet model; a policy decides who trains (see the module docstring)."""

    def __init__(self, devices: int, concurrency: int, hours: float, seed: int) -> None:
        self.n = devices
        self.c = concurrency
        self.horizon = hours * 3600.0
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.available = np.zeros(devices, dtype=bool)
        self.alive = np.ones(devices, dtype=bool)  # False while vanished silently
        self.training = np.zeros(devices, dtype=bool)
        self.token = np.zeros(devices, dtype=np.int64)  # invalidates stale TRAIN_END/RENEW
        self.period = np.zeros(devices, dtype=np.int64)  # invalidates a stale OFF
        self.updates = np.zeros(devices, dtype=np.int32)
        self.avail_time = np.zeros(devices)
        self.avail_since = np.zeros(devices)
        self.counts = _Counts()

    # ------------------------------------------------------------------ plumbing
    def push(self, t: float, kind: Ev, d: int = -1, tok: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, int(kind), d, tok))

    def start(self) -> None:
        on_p = MEAN_ON_S / (MEAN_ON_S + MEAN_OFF_S)
        first = self.rng.random(self.n) < on_p
        for d in range(self.n):
            if first[d]:
                self.push(0.0, Ev.ON, d)
            else:
                self.push(float(self.rng.exponential(MEAN_OFF_S)), Ev.ON, d)
        self.push(self.horizon / 2, Ev.MASS)
        self.push(SAMPLE_EVERY_S, Ev.SAMPLE)

    def training_duration(self) -> float:
        mu = math.log(TRAIN_MEAN_S) - TRAIN_SIGMA**2 / 2
        return float(self.rng.lognormal(mu, TRAIN_SIGMA))

    def begin_training(self, d: int) -> None:
        """Device ``d`` starts a training: it ends, or the device vanishes during it."""
        self.training[d] = True
        self.token[d] += 1
        duration = self.training_duration()
        if duration > LEASE_S:  # the agent aborts at its lease's end and checks in again
            self.push(self.now + LEASE_S, Ev.ABORT, d, int(self.token[d]))
        elif self.rng.random() < DROPOUT:
            self.push(
                self.now + duration * float(self.rng.random()), Ev.VANISH, d, int(self.token[d])
            )
        else:
            self.push(self.now + duration, Ev.TRAIN_END, d, int(self.token[d]))

    def go_on(self, d: int) -> None:
        self.available[d] = True
        self.alive[d] = True
        self.avail_since[d] = self.now
        self.period[d] += 1
        off_at = self.now + float(self.rng.exponential(MEAN_ON_S))
        self.push(off_at, Ev.OFF, d, int(self.period[d]))

    def go_off(self, d: int, *, silent: bool) -> None:
        if self.available[d]:
            self.avail_time[d] += self.now - self.avail_since[d]
        self.available[d] = False
        self.training[d] = False
        self.token[d] += 1
        self.alive[d] = not silent
        self.push(self.now + float(self.rng.exponential(MEAN_OFF_S)), Ev.ON, d)

    def run(self, policy: Policy) -> _Counts:
        self.start()
        policy.begin(self)
        while self.heap:
            t, _, kind, d, tok = heapq.heappop(self.heap)
            if t > self.horizon:
                break
            self.now = t
            self.dispatch(policy, Ev(kind), d, tok)
        return self.counts

    def dispatch(self, policy: Policy, kind: Ev, d: int, tok: int) -> None:
        match kind:
            case Ev.ON:
                self.go_on(d)
                policy.on_available(self, d)
            case Ev.OFF:
                if self.available[d] and tok == self.period[d]:
                    was_training = bool(self.training[d])
                    self.go_off(d, silent=False)
                    policy.on_leave(self, d, was_training=was_training)
            case Ev.TRAIN_END if tok == self.token[d] and self.training[d]:
                self.training[d] = False
                policy.on_update(self, d)
            case Ev.ABORT if tok == self.token[d] and self.training[d]:
                self.training[d] = False
                policy.on_abort(self, d)
            case Ev.VANISH if tok == self.token[d] and self.training[d]:
                self.go_off(d, silent=True)
                policy.on_vanish(self, d)
            case Ev.MASS:
                self.mass_dropout(policy)
            case Ev.SAMPLE:
                self.sample(policy)
            case _:
                policy.on_event(self, kind, d, tok)

    def mass_dropout(self, policy: Policy) -> None:
        hit = np.flatnonzero(self.available & (self.rng.random(self.n) < MASS_DROPOUT))
        for d in hit.tolist():
            self.go_off(d, silent=True)
            policy.on_vanish(self, d)

    def sample(self, policy: Policy) -> None:
        live = int(np.count_nonzero(self.training))
        self.counts.samples.append((self.now, live, policy.dead_slots(self)))
        self.push(self.now + SAMPLE_EVERY_S, Ev.SAMPLE)


class Policy:
    """What decides who trains; the base class is the part both policies share."""

    name = "base"

    def begin(self, sim: FleetSim) -> None: ...

    def on_available(self, sim: FleetSim, d: int) -> None: ...

    def on_leave(self, sim: FleetSim, d: int, *, was_training: bool) -> None: ...

    def on_update(self, sim: FleetSim, d: int) -> None:
        sim.counts.applied += 1
        sim.updates[d] += 1

    def on_vanish(self, sim: FleetSim, d: int) -> None: ...

    def on_abort(self, sim: FleetSim, d: int) -> None:
        """A training ran past the lease length and was abandoned: the device is idle again."""
        self.on_available(sim, d)

    def on_event(self, sim: FleetSim, kind: Ev, d: int, tok: int) -> None: ...

    def dead_slots(self, sim: FleetSim) -> int:
        return 0


class LeasePolicy(Policy):
    """The product's lease book and check-in pool; ``presence``: Last Wills withdraw."""

    def __init__(self, concurrency: int, *, presence: bool, seed: int) -> None:
        self.name = "leases+presence" if presence else "leases"
        cfg = ParticipationConfig(
            concurrency=concurrency, lease_s=LEASE_S, checkin_ttl_s=CHECKIN_TTL_S
        )
        self.book = LeaseBook(cfg, rng=np.random.default_rng(seed))
        self.pool = CheckInPool(CHECKIN_TTL_S)
        self.presence = presence
        self.expiry_at = math.inf

    def _id(self, d: int) -> str:
        return str(d)

    def grant(self, sim: FleetSim) -> None:
        for lease in self.book.grant(sim.now, self.pool, version=0):
            sim.counts.messages += 1  # the LEASE message
            d = int(lease.device)
            if sim.available[d] and sim.alive[d] and not sim.training[d]:
                sim.begin_training(d)
        nxt = self.book.next_expiry()
        if nxt is not None and nxt < self.expiry_at:
            self.expiry_at = nxt
            sim.push(nxt, Ev.EXPIRY)

    def check_in(self, sim: FleetSim, d: int) -> None:
        sim.counts.messages += 1
        self.pool.check_in(self._id(d), sim.now)
        sim.push(sim.now + CHECKIN_TTL_S / 2, Ev.RENEW, d, int(sim.token[d]))
        self.grant(sim)

    def on_available(self, sim: FleetSim, d: int) -> None:
        self.check_in(sim, d)

    def on_leave(self, sim: FleetSim, d: int, *, was_training: bool) -> None:
        sim.counts.messages += 1  # the withdrawal
        self.pool.withdraw(self._id(d))
        self.book.release(self._id(d))
        self.grant(sim)

    def on_update(self, sim: FleetSim, d: int) -> None:
        lease = self.book.holder(self._id(d))
        lease_id = lease.lease_id if lease is not None else None
        if self.book.complete(self._id(d), lease_id, sim.now).accepted:
            super().on_update(sim, d)
        if sim.available[d]:
            self.check_in(sim, d)
        else:
            self.grant(sim)

    def on_vanish(self, sim: FleetSim, d: int) -> None:
        if self.presence:
            sim.push(sim.now + 1.5 * KEEPALIVE_S, Ev.LOST, d, int(sim.token[d]))

    def on_event(self, sim: FleetSim, kind: Ev, d: int, tok: int) -> None:
        if kind is Ev.RENEW and tok == sim.token[d] and sim.available[d] and not sim.training[d]:
            if self._id(d) in self.pool:
                self.check_in(sim, d)
        elif kind is Ev.LOST and not sim.available[d]:
            self.pool.withdraw(self._id(d))
            self.book.release(self._id(d))
            self.grant(sim)
        elif kind is Ev.EXPIRY:
            self.expiry_at = math.inf
            self.grant(sim)

    def dead_slots(self, sim: FleetSim) -> int:
        return self.book.in_flight - int(np.count_nonzero(sim.training))


class SamplingPolicy(Policy):
    """Stateless sampling: a published probability, Little's law, a draw per period."""

    name = "sampling"

    def __init__(self, concurrency: int) -> None:
        self.c = concurrency
        self.p = 0.0
        self.idle = CheckInPool(math.inf)  # the idle, available devices (an indexable set)

    def begin(self, sim: FleetSim) -> None:
        sim.push(DRAW_PERIOD_S, Ev.DRAW)

    def on_available(self, sim: FleetSim, d: int) -> None:
        self.idle.check_in(str(d), sim.now)

    def on_leave(self, sim: FleetSim, d: int, *, was_training: bool) -> None:
        self.idle.withdraw(str(d))

    def on_update(self, sim: FleetSim, d: int) -> None:
        super().on_update(sim, d)
        if sim.available[d]:
            self.idle.check_in(str(d), sim.now)

    def on_vanish(self, sim: FleetSim, d: int) -> None:
        self.idle.withdraw(str(d))

    def on_event(self, sim: FleetSim, kind: Ev, d: int, tok: int) -> None:
        if kind is not Ev.DRAW:
            return
        e_idle = len(self.idle)
        p = min(1.0, self.c * DRAW_PERIOD_S / (max(e_idle, 1) * TRAIN_MEAN_S))
        if self.p == 0.0 or abs(p - self.p) > 0.1 * self.p:
            self.p = p
            sim.counts.messages += 1 + int(np.count_nonzero(sim.available))  # publish + fan-out
        winners = int(sim.rng.binomial(e_idle, self.p)) if e_idle else 0
        chosen = self.idle.sample(winners, rng=sim.rng, exclude=(), now=sim.now)
        self.idle.take(chosen)
        for dev in chosen:
            sim.begin_training(int(dev))
        sim.push(sim.now + DRAW_PERIOD_S, Ev.DRAW)


def _dispersion(updates: np.ndarray, hours: np.ndarray) -> float:
    """Fairness: sum (u_d - e_d)^2 / sum e_d with e_d = lambda * h_d the updates device d
    would get in proportion to its available hours. About 1 for selection as fair as uniform
    random draws (Poisson counts); larger when some devices get more than their share."""
    seen = hours > 0
    expected = updates[seen].sum() / hours[seen].sum() * hours[seen]
    return float(((updates[seen] - expected) ** 2).sum() / max(expected.sum(), 1e-9))


def _row(sim: FleetSim, policy: Policy, wall: float) -> Row:
    counts = sim.counts
    t, live, dead = (np.array(col, dtype=float) for col in zip(*counts.samples, strict=True))
    settled = t >= 1800.0  # skip the first half hour (the pool fills)
    before = settled & (t < sim.horizon / 2)
    after = (t >= sim.horizon / 2) & (t < sim.horizon / 2 + LEASE_S)
    open_windows = np.where(sim.available, sim.horizon - sim.avail_since, 0.0)
    hours = (sim.avail_time + open_windows) / 3600.0
    return Row(
        devices=sim.n,
        policy=policy.name,
        concurrency=sim.c,
        applied=counts.applied,
        messages_per_update=round(counts.messages / max(counts.applied, 1), 2),
        in_flight_mean=round(float(live[before].mean()), 2),
        in_flight_mad=round(float(np.abs(live[before] - sim.c).mean()), 2),
        in_flight_p99=float(np.percentile(live[settled], 99)),
        above_c_fraction=round(float((live[settled] > sim.c).mean()), 4),
        dead_slot_fraction=round(float(dead[settled].mean() / sim.c), 4),
        fairness_dispersion=round(_dispersion(sim.updates.astype(float), hours), 3),
        live_in_flight_after_mass=round(float(live[after].mean()), 2),
        live_in_flight_before_mass=round(float(live[before].mean()), 2),
        wall_s=round(wall, 1),
    )


def run(devices: int, policy_name: str, hours: float, seed: int) -> Row:
    concurrency = max(10, min(1000, devices // 100))
    sim = FleetSim(devices, concurrency, hours, seed)
    policy: Policy
    if policy_name == "sampling":
        policy = SamplingPolicy(concurrency)
    else:
        policy = LeasePolicy(concurrency, presence=policy_name == "leases+presence", seed=seed)
    t0 = time.perf_counter()
    sim.run(policy)
    return _row(sim, policy, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,10000,1000000")
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    head = f"{'devices':>9} {'policy':<16} {'C':>5} {'applied':>8} {'msg/upd':>8} "
    head += f"{'inflight':>8} {'|dev|':>6} {'p99':>5} {'>C':>6} {'dead':>6} {'disp':>5} "
    head += f"{'after/before mass':>18} {'wall s':>7}"
    print(head)
    for size in (int(s) for s in args.sizes.split(",")):
        for name in ("leases", "leases+presence", "sampling"):
            r = run(size, name, args.hours, args.seed)
            rows.append(r)
            print(
                f"{r.devices:>9,} {r.policy:<16} {r.concurrency:>5} {r.applied:>8,} "
                f"{r.messages_per_update:>8} {r.in_flight_mean:>8} {r.in_flight_mad:>6} "
                f"{r.in_flight_p99:>5.0f} {r.above_c_fraction:>6.1%} {r.dead_slot_fraction:>6.1%} "
                f"{r.fairness_dispersion:>5} "
                f"{r.live_in_flight_after_mass:>8}/{r.live_in_flight_before_mass:<9} "
                f"{r.wall_s:>7}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
