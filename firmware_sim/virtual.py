"""Virtual-time fleet simulation: a sans-IO discrete-event engine over the real cores.

No broker and no clocks: a heap of ``(time, seq, event)`` drives the *real* codec
(:func:`edgefl.codec.encode_update` on the device side, :func:`edgefl.codec.open_update` on the
aggregator side, with the service's own bound :func:`edgefl.codec.max_decompressed`) and the
*real* aggregation core (the :class:`~edgefl.aggregation.AggregationCore` the service drives,
from :func:`~edgefl.aggregation.make_core`: FedBuff or SyncFedAvg, with staleness weights, the
norm bound and the robust modes). Local training is real SGD on each device's data slice
(:func:`edgefl.training.train_many`).

Life of one training (device ``d``, virtual time ``t``)::

    start ── download (latency + model bytes / down-bandwidth)
          ── train (speed · epochs · n / 100 · jitter)          fate drawn at start:
          │     dropped  at a uniform fraction -> DROP   (away for rejoin_after)
          │     crashed  at a uniform fraction -> CRASH  (device restarting for crash_restart)
          │     availability window ends first  -> DROP   (the device went away: unplugged, parked)
          ── upload (latency + encoded bytes / up-bandwidth)   -> ARRIVE at the aggregator

FedBuff keeps ``concurrency`` trainings in flight: a slot book (the participation leases of the
runtime) fills free slots with idle, available devices drawn uniformly at random
(:meth:`Fleet.sample_idle_devices`) whenever one ends; the server steps every ``buffer_size``
accepted updates. Sync FedAvg is the production baseline of Bonawitz et al. (2019): a round
selects ``cohort_size`` idle devices (default: ``concurrency``, so both algorithms train the same
number of devices at once) at the current version, with a reporting goal of
``ceil(cohort_size / overselect)`` accepted updates and a deadline. The round closes at its goal
(stepping) or at the deadline (stepping if at least ``min_fraction`` of the goal arrived); the
members still training then are stragglers, aborted, and their work counted as wasted
(``deadline``); the next round opens at once.

When too few devices are idle, the scheduler sleeps until the next moment one can be: the
earliest end of a device's time away (after a dropout or crash), the earliest start of an
availability window (over every device of fleets up to :data:`WAKE_SCAN` devices, else over
that many evenly spaced ones) or the next lease expiry. No fixed retry period.

Where the time went (slots training, waiting for a device, idle at the round barrier; work lost
by cause) is kept by :class:`~firmware_sim.slots.SlotLedger` and lands in the summary's
``utilisation`` and ``bottleneck``.

Batching is where the speed lives. A training's result depends only on its base weights, data
and seed, never on when it is computed, so a started training is queued and trained lazily: the
first time any queued result is needed (its ``TRAIN_DONE`` event), *all* queued trainings are
trained in one :func:`train_many` call. Dropped and crashed trainings are never computed. The
results are identical to training each one at its start, so runs are deterministic for a seed.

Cost grows with the number of updates, not devices: the fleet is lazy, idle devices are found by
rejection sampling, device-state counts use an O(2048) sample for big fleets.

Default round deadline (FedAvg): the 90th percentile of ``download + train + upload`` over 256
sampled devices (what an operator would configure from fleet telemetry), at least 1 s.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import AggregationCore, Algorithm, FedBuffCore, make_core
from edgefl.codec import (
    CodecConfig,
    CodecDescriptor,
    DecodedUpdate,
    Residual,
    encode_update,
    max_decompressed,
    open_update,
)
from edgefl.errors import CodecError, EdgeflError, RejectReason, UpdateRejected
from edgefl.participation import LeaseBook, LeaseVerdict, ParticipationConfig
from edgefl.training import evaluate, train_many
from firmware_sim.attacks import apply_attack
from firmware_sim.fleet import Fate, Fleet
from firmware_sim.local_dp import FleetLocalDP
from firmware_sim.record import Mode, RunRecord
from firmware_sim.scenario import (
    Scenario,
    SimConfig,
    build_scenario,
    codec_to_text,
    reporting_goal,
)
from firmware_sim.seeding import MASK64
from firmware_sim.slots import SlotLedger, Work, verdict

__all__ = ["Progress", "VirtualResult", "VirtualSimulator", "open_arrival", "run_virtual"]

_STREAM_ENGINE = 0x51_3E_47
_STREAM_TRAIN = 0x7A_1A_17
WAKE_SCAN = 512
"""Devices scanned for the next start of an availability window when the scheduler waits."""
LEASE_FACTOR = 1.0
"""FedBuff's default lease: this many times the automatic FedAvg deadline (the p90 of a
training's duration), so both algorithms give up on a device after the same time. Measured
(seed 7): factor 1 / 1.5 / 2 gave FedBuff 203 / 207 / 221 s to 90% on 1,000 lab devices and
405 / 432 / 570 s on the calibration fleet (100 lab devices, 30% silent dropouts)."""
MIN_WAKE_S = 1.0
"""A waiting scheduler looks again no sooner than this (virtual seconds)."""
MAX_TRAIN_BATCH = 256
"""At most this many queued trainings go into one ``train_many`` call (which stacks them by
number of steps into stacks of at most 32; results do not depend on the grouping)."""


def open_arrival(
    descriptor: CodecDescriptor, body: bytes | memoryview, *, num_params: int
) -> DecodedUpdate:
    """How the simulated aggregator opens an arriving update: :func:`edgefl.codec.open_update`
    under the service's decompression bound :func:`edgefl.codec.max_decompressed`, so the
    simulator accepts and rejects (``DECOMPRESSION_BOMB``, ``BAD_COMPRESSION``, ...) exactly
    the bodies the aggregator's ingest does. Raises ``CodecError``."""
    return open_update(
        descriptor, body, num_params=num_params, max_decompressed=max_decompressed(num_params)
    )


class _Ev(IntEnum):
    TRAIN_DONE = 0
    ARRIVE = 1
    DROP = 2
    CRASH = 3
    DEADLINE = 4
    WAKE = 5


@dataclass(eq=False)
class _Training:
    tid: int
    device: int
    base_version: int
    base: NDArray[np.float32]
    start_t: float
    seed: int
    num_examples: int
    round_id: int = -1
    delta: NDArray[np.float32] | None = None
    nbytes: int = 0
    restart_s: float = 0.0
    descriptor: CodecDescriptor | None = None
    body: bytes = b""
    uploading: bool = False
    lease_id: int = -1


@dataclass(frozen=True)
class Progress:
    """What a progress callback sees after each evaluation."""

    t: float
    version: int
    accuracy: float
    updates_received: int
    updates_applied: int
    wall_s: float


@dataclass(frozen=True)
class VirtualResult:
    """A finished run: the record, and engine counters."""

    record: RunRecord
    wall_s: float
    trainings_computed: int
    train_calls: int
    train_wall_s: float
    round_deadline_s: float | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def updates_per_s(self) -> float:
        """Updates received by the aggregator per wall-clock second."""
        n = len(self.record.updates().t)
        return n / self.wall_s if self.wall_s > 0 else math.inf


class _Busy:
    """Devices that cannot be picked: ``device -> busy until`` (``inf`` while in flight)."""

    def __init__(self) -> None:
        self.until: dict[int, float] = {}
        self.now = 0.0
        self.retired: Container[object] = ()  # for good: local DP budget spent

    def __contains__(self, device: object) -> bool:
        if device in self.retired:
            return True
        until = self.until.get(device)  # type: ignore[call-overload]
        if until is None:
            return False
        if until <= self.now:
            del self.until[device]  # type: ignore[arg-type]
            return False
        return True


@dataclass(eq=False)
class _Schedule:
    """Scheduling state (not aggregation): FedAvg samples cohorts in rounds, FedBuff keeps
    ``concurrency`` trainings busy; both sleep until ``wake_at`` when too few devices are idle
    (``waiting`` slots stay empty meanwhile)."""

    cohorts: bool  # FedAvg
    round_id: int = 0
    round_deadline_s: float | None = None
    round_opened_at: float | None = None  # None: no round open
    applied_at_open: int = 0
    waiting: int = 0
    wake_at: float = math.inf
    pool: FleetPool | None = None  # FedBuff: the fleet as the lease book's candidate pool
    leases: LeaseBook | None = None  # FedBuff: built in run(), once the lease length is known


class _Excluding:
    """``busy``, plus the devices (ids as text) that ``exclude`` holds or ``admits`` refuses."""

    def __init__(
        self, busy: _Busy, exclude: Container[str], admits: Callable[[str], bool] | None
    ) -> None:
        self.busy = busy
        self.exclude = exclude
        self.admits = admits

    def __contains__(self, device: object) -> bool:
        if device in self.busy or str(device) in self.exclude:
            return True
        return self.admits is not None and not self.admits(str(device))


@dataclass(eq=False)
class FleetPool:
    """The virtual fleet as the :class:`~edgefl.participation.CandidatePool` of the product's
    lease book: ``sample`` draws up to ``k`` devices idle and available at ``now``, uniformly at
    random (:meth:`Fleet.sample_idle_devices`), none of ``exclude`` (the leaseholders) nor any
    ``admits`` refuses (the core's :meth:`~edgefl.aggregation.AggregationCore.privacy_admits`,
    as the aggregator's lease desk: no lease for a device central DP would refuse)."""

    fleet: Fleet
    busy: _Busy
    admits: Callable[[str], bool] | None = None

    def sample(
        self, k: int, *, rng: np.random.Generator, exclude: Container[str], now: float
    ) -> list[str]:
        self.busy.now = now
        picked = self.fleet.sample_idle_devices(
            k, now, rng, _Excluding(self.busy, exclude, self.admits)
        )
        return [str(d) for d in picked]

    def take(self, devices: Iterable[str]) -> None:
        """Nothing to do: a granted device starts training at once and is busy until it ends."""


class _EventQueue:
    """Pending events in time order (ties: first pushed, first out)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Ev, int]] = []
        self._seq = 0

    def push(self, t: float, kind: _Ev, ref: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, ref))

    def pop(self) -> tuple[float, int, _Ev, int]:
        return heapq.heappop(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)


@dataclass(eq=False)
class _InFlight:
    """Trainings between their start and their end (arrival, dropout or crash)."""

    trainings: dict[int, _Training] = field(default_factory=dict)  # tid -> training
    queued: list[_Training] = field(default_factory=list)  # started, completing, not trained
    uploading: int = 0
    next_tid: int = 0


@dataclass(eq=False)
class _Tally:
    """What the run counted: updates received and applied, the last evaluation."""

    received: int = 0
    applied: int = 0
    applied_at_eval: int = 0
    last_accuracy: float = 0.0
    reached: bool = False


@dataclass(eq=False)
class _ComputeStats:
    """Where the real training went: trainings, ``train_many`` calls, wall seconds."""

    trainings_computed: int = 0
    train_calls: int = 0
    train_wall: float = 0.0


class VirtualSimulator:
    """One virtual-time run of ``scenario`` (see module docstring). Use :meth:`run` once."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        progress: Callable[[Progress], None] | None = None,
        label: str | None = None,
    ) -> None:
        cfg = scenario.config
        self.sc = scenario
        self.cfg = cfg
        self.codec: CodecConfig = cfg.codec_config()
        self.progress = progress
        self.rng = np.random.default_rng(
            [cfg.seed & MASK64, _STREAM_ENGINE, int(cfg.algorithm is Algorithm.FEDAVG)]
        )
        self.record = RunRecord(
            config=cfg.to_dict(),
            mode=Mode.VIRTUAL,
            algorithm=cfg.algorithm,
            devices=cfg.devices,
            label=label or cfg.algorithm.value,
        )
        self.core: AggregationCore = make_core(
            cfg.aggregation_settings().core_config(), scenario.initial_weights
        )
        # scheduling (not aggregation): FedAvg samples cohorts, FedBuff keeps `concurrency` busy
        self.schedule = _Schedule(cohorts=cfg.algorithm is Algorithm.FEDAVG)
        self.events = _EventQueue()
        self.t = 0.0
        self.busy = _Busy()
        self.flight = _InFlight()
        self.base_cache: tuple[int, NDArray[np.float32]] | None = None
        self.residuals: dict[int, Residual | None] = {}
        self.local_dp = None if cfg.local_dp is None else FleetLocalDP(cfg.local_dp, cfg.seed)
        self.busy.retired = () if self.local_dp is None else self.local_dp.exhausted
        self.tally = _Tally()
        self.compute = _ComputeStats()
        self.wall0 = 0.0
        self.ledger = SlotLedger(
            cfg.aggregation.effective_cohort
            if self.schedule.cohorts
            else cfg.aggregation.concurrency
        )

    # ------------------------------------------------------------------ model state
    @property
    def num_params(self) -> int:
        return self.sc.spec.num_params

    @property
    def model_bytes(self) -> int:
        """Bytes of one FP32 model download."""
        return 4 * self.num_params

    @property
    def version(self) -> int:
        return self.core.version

    @property
    def weights(self) -> NDArray[np.float32]:
        return self.core.weights

    def _base(self) -> NDArray[np.float32]:
        """A private copy of the current weights, shared by trainings started at this version."""
        v = self.version
        if self.base_cache is None or self.base_cache[0] != v:
            self.base_cache = (v, self.weights.copy())
        return self.base_cache[1]

    # ------------------------------------------------------------------ events
    def _start(self, device: int, round_id: int = -1, lease_id: int = -1) -> None:
        fleet = self.sc.fleet
        n = self.sc.num_examples(device)
        tid = self.flight.next_tid
        self.flight.next_tid += 1
        tr = _Training(
            tid=tid,
            device=device,
            base_version=self.version,
            base=self._base(),
            start_t=self.t,
            seed=int(self.rng.integers(0, 2**31 - 1)),
            num_examples=n,
            round_id=round_id,
            lease_id=lease_id,
        )
        self.flight.trainings[tid] = tr
        self.busy.until[device] = math.inf
        download = fleet.download_duration(device, self.model_bytes)
        duration = fleet.training_duration(device, n, self.cfg.local.epochs, self.rng)
        fate = fleet.training_fate(device, self.rng)
        train_start = self.t + download
        window_end = fleet.available_until(device, self.t)
        if fate.kind is Fate.DROPPED:
            tr.restart_s = fate.restart_after_s
            self.events.push(train_start + fate.at_fraction * duration, _Ev.DROP, tid)
        elif fate.kind is Fate.CRASHED:
            tr.restart_s = fate.restart_after_s
            self.events.push(train_start + fate.at_fraction * duration, _Ev.CRASH, tid)
        elif window_end < train_start + duration:  # the window closes first: gone until the next
            tr.restart_s = max(0.0, fleet.next_available(device, window_end) - window_end)
            self.events.push(max(self.t, window_end), _Ev.DROP, tid)
        else:
            self.flight.queued.append(tr)
            self.events.push(train_start + duration, _Ev.TRAIN_DONE, tid)

    def _fill(self) -> None:
        """FedBuff: the product's lease book expires what is due and grants every free slot to
        a uniformly drawn idle device; a slot left empty waits for the next moment a device can
        be idle or a lease expires (:meth:`_wait_for_devices`)."""
        book, pool = self.schedule.leases, self.schedule.pool
        assert book is not None
        assert pool is not None
        for lease in book.grant(self.t, pool, version=self.version):
            self._start(int(lease.device), lease_id=lease.lease_id)
        self.schedule.waiting = book.free
        if self.schedule.waiting > 0:
            self._wait_for_devices()
        elif book.in_flight > len(self.flight.trainings):  # leases of lost devices
            expiry = book.next_expiry()
            assert expiry is not None
            self._wake_at(max(expiry, self.t + MIN_WAKE_S))

    def _open_round(self) -> None:
        """FedAvg: select ``cohort_size`` idle devices and open a round with the reporting goal
        ``ceil(selected / overselect)`` and the deadline (or wait if nobody is idle)."""
        self.busy.now = self.t
        selected = self.cfg.aggregation.effective_cohort
        cohort = self.sc.fleet.sample_idle_devices(selected, self.t, self.rng, self.busy)
        self.schedule.waiting = selected - len(cohort)
        if not cohort:
            self._wait_for_devices()
            return
        deadline_s = self.schedule.round_deadline_s
        assert deadline_s is not None
        self.schedule.round_id += 1
        self.schedule.round_opened_at = self.t
        self.schedule.applied_at_open = self.tally.applied
        goal = reporting_goal(len(cohort), self.cfg.aggregation.overselect)
        self.core.open_round(goal, deadline=self.t + deadline_s)
        for d in cohort:
            self._start(d, self.schedule.round_id)
        self.events.push(self.t + deadline_s, _Ev.DEADLINE, self.schedule.round_id)

    def _close_round(self) -> None:
        """FedAvg: the round closed (goal, or deadline); its members still training are
        stragglers: aborted, their device idle again, their work wasted."""
        opened = self.schedule.round_opened_at
        if opened is None:
            return
        self.schedule.round_opened_at = None
        self.ledger.round_closed(
            self.t - opened, self.tally.applied - self.schedule.applied_at_open
        )
        rid = self.schedule.round_id
        for tr in [tr for tr in self.flight.trainings.values() if tr.round_id == rid]:
            del self.flight.trainings[tr.tid]
            self._discard_queued(tr)
            self.flight.uploading -= int(tr.uploading)
            self.busy.until.pop(tr.device, None)
            self.ledger.work(Work.DEADLINE, self.t - tr.start_t)

    def _admits(self) -> Callable[[str], bool] | None:
        """Central DP: the core's admissibility, which the lease draw skips devices by."""
        return self.core.privacy_admits if self.cfg.aggregation.privacy is not None else None

    def _wait_for_devices(self) -> None:
        """Wake the scheduler at the next moment a device can become idle and available:
        the earliest end of a device's time away, the earliest start of an availability window
        of a device central DP admits (:meth:`Fleet.next_available_any`; one refused for now,
        its update in the buffer, is admitted again by a flush, i.e. an arrival, which
        schedules anyway) or the next lease expiry; no sooner than
        :data:`MIN_WAKE_S`."""
        t = self.t
        wake = min((u for u in self.busy.until.values() if t < u < math.inf), default=math.inf)
        self.busy.now = t
        skip = _Excluding(self.busy, (), self._admits())  # central DP: capped for good
        wake = min(wake, self.sc.fleet.next_available_any(t, skip, WAKE_SCAN))
        expiry = None if self.schedule.leases is None else self.schedule.leases.next_expiry()
        if expiry is not None:
            wake = min(wake, expiry)
        self._wake_at(max(wake, t + MIN_WAKE_S))

    def _wake_at(self, wake: float) -> None:
        """Schedule a wake-up at ``wake`` unless an earlier one is pending."""
        if wake < self.schedule.wake_at and math.isfinite(wake):
            self.schedule.wake_at = wake
            self.events.push(wake, _Ev.WAKE, -1)

    def _upload_guess(self) -> int:
        """Bytes of a typical upload, for the automatic deadline: about an int8 update
        (a subclass whose uploads are bigger, e.g. secure aggregation's shares, says so)."""
        return self.model_bytes // 4 + 256

    def _auto_deadline(self) -> float:
        fleet = self.sc.fleet
        rng = np.random.default_rng([self.cfg.seed & MASK64, 0xDEAD11E])
        sample = rng.integers(0, self.cfg.devices, size=256).tolist()
        upload_guess = self._upload_guess()
        totals = [
            fleet.download_duration(d, self.model_bytes)
            + fleet.training_duration(d, self.sc.num_examples(d), self.cfg.local.epochs, rng)
            + fleet.upload_duration(d, upload_guess)
            for d in sample
        ]
        return max(1.0, float(np.percentile(totals, 90)))

    # ------------------------------------------------------------------ training and coding
    def _train_queued(self) -> None:
        """Train every queued training, in as few ``train_many`` calls as possible.

        All of them are independent (a result depends only on base weights, data and seed), so
        they go in together whatever their base versions: a whole FedAvg cohort at once, all
        FedBuff trainings started since the last flush. Trainings that share a base version
        share one base vector; ``train_many`` buckets them by number of steps. Each result is
        bit-identical to training that device alone (``tests/unit/test_training_batched.py``).
        """
        pending, self.flight.queued = self.flight.queued, []
        pending.sort(key=lambda tr: tr.base_version)  # stable: start order within a version
        cfg = self.cfg
        w0 = time.perf_counter()
        for c in range(0, len(pending), MAX_TRAIN_BATCH):
            group = pending[c : c + MAX_TRAIN_BATCH]
            same_base = group[0].base_version == group[-1].base_version
            results = train_many(
                self.sc.spec,
                group[0].base if same_base else np.stack([tr.base for tr in group]),
                [self.sc.device_data(tr.device) for tr in group],
                cfg.local,
                seeds=[tr.seed for tr in group],
                threads=cfg.threads,
            )
            self.compute.train_calls += 1
            for tr, res in zip(group, results, strict=True):
                tr.delta = res.delta
            self.compute.trainings_computed += len(group)
        self.compute.train_wall += time.perf_counter() - w0

    def _encode(self, tr: _Training) -> None:
        assert tr.delta is not None
        delta = tr.delta
        rng = np.random.default_rng([self.cfg.seed & MASK64, _STREAM_TRAIN, tr.tid])
        if self.sc.malicious[tr.device]:
            delta = apply_attack(delta, self.cfg.attack, rng)
        if self.local_dp is not None:  # clip + noise on the device (firmware_sim/local_dp.py)
            delta = self.local_dp.release(tr.device, delta)
        residual = self.residuals.get(tr.device)
        encoded, new_residual = encode_update(delta, self.codec, rng=rng, residual=residual)
        if self.codec.topk_fraction is not None:
            self.residuals[tr.device] = new_residual
        tr.descriptor = encoded.descriptor
        tr.body = encoded.body
        tr.nbytes = encoded.encoded_size
        tr.delta = None

    # ------------------------------------------------------------------ handlers
    def _on_train_done(self, tr: _Training) -> None:
        if tr.delta is None:
            self._train_queued()
        try:
            self._encode(tr)
        except CodecError as exc:
            self._on_encode_failed(tr, exc)
            return
        self.flight.uploading += 1
        tr.uploading = True
        self.events.push(
            self.t + self.sc.fleet.upload_duration(tr.device, tr.nbytes), _Ev.ARRIVE, tr.tid
        )

    def _on_encode_failed(self, tr: _Training, exc: CodecError) -> None:
        """The device cannot encode its update (``non_finite``: NaN/Inf in the delta, from a
        diverging learning rate or an attack; or values beyond the codec's range). As the
        agent does, it drops the update and says nothing: the aggregator never sees it, a
        FedBuff lease keeps its slot until it expires, a FedAvg round waits for its goal or
        deadline. The run counts it as ``rejected:<reason>`` (no bytes sent) and its work as
        ``rejected``; the device is idle again."""
        tr.delta = None
        self.tally.received += 1
        self._end(tr, self.t, Work.REJECTED)
        self.record.update(
            self.t, tr.device, exc.reason.value, self.version - tr.base_version, 0, 0
        )
        self._schedule()

    def _end(self, tr: _Training, busy_until: float, work: Work) -> None:
        del self.flight.trainings[tr.tid]
        self.ledger.work(work, self.t - tr.start_t)
        if busy_until > self.t:
            self.busy.until[tr.device] = busy_until
        else:
            self.busy.until.pop(tr.device, None)

    def _on_arrive(self, tr: _Training) -> None:
        self.flight.uploading -= 1
        self.tally.received += 1
        staleness = self.version - tr.base_version
        outcome = "applied"
        stepped = False
        try:
            self._check_lease(tr)
            assert tr.descriptor is not None  # set by _encode before the upload
            decoded = open_arrival(tr.descriptor, tr.body, num_params=self.num_params)
            added = self.core.add(
                str(tr.device), decoded, base_version=tr.base_version, num_examples=tr.num_examples
            )
            stepped = added.step is not None
        except EdgeflError as exc:
            outcome = exc.reason.value
        else:
            self.tally.applied += 1
        self._end(tr, self.t, _work_of(outcome))
        self.record.update(self.t, tr.device, outcome, staleness, tr.nbytes, self.model_bytes)
        tr.body = b""
        if stepped:
            self._after_step()
        self._schedule()

    def _check_lease(self, tr: _Training) -> None:
        """FedBuff: the lease book's verdict on the update (raises ``UpdateRejected``
        ``lease_expired`` / ``no_lease`` when it refuses it, as the aggregator does)."""
        if self.schedule.leases is None:
            return
        verdict = self.schedule.leases.complete(str(tr.device), tr.lease_id, self.t)
        if not verdict.accepted:
            reason = RejectReason.NO_LEASE
            if verdict is LeaseVerdict.EXPIRED:
                reason = RejectReason.LEASE_EXPIRED
            raise UpdateRejected(reason, f"lease {tr.lease_id} of device {tr.device}: {verdict}")

    def _schedule(self) -> None:
        """Start what the algorithm's scheduling wants: FedBuff refills its ``concurrency``
        slots; FedAvg opens the next round once none is open."""
        if not self.schedule.cohorts:
            self._fill()
        elif not self.core.round_open:
            self._close_round()
            self._open_round()

    def _after_step(self) -> None:
        if self.cfg.aggregation.privacy is not None and isinstance(
            self.core, FedBuffCore
        ):  # ε per flush
            self.record.dp_flush(self.t, self.version, self.core.statistics().privacy)
        if self.tally.applied - self.tally.applied_at_eval >= self.cfg.stop.eval_every_updates:
            self._evaluate()

    def _evaluate(self) -> None:
        acc, loss = evaluate(
            self.sc.spec,
            np.asarray(self.weights),
            self.sc.dataset.x_test,
            self.sc.dataset.y_test,
            threads=self.cfg.threads,
        )
        self.tally.applied_at_eval = self.tally.applied
        self.tally.last_accuracy = acc
        self.record.eval(self.t, self.version, acc, loss, self.tally.applied)
        self._sample_states()
        if acc >= self.cfg.stop.target:
            self.tally.reached = True
        if self.progress is not None:
            self.progress(
                Progress(
                    self.t,
                    self.version,
                    acc,
                    self.tally.received,
                    self.tally.applied,
                    time.perf_counter() - self.wall0,
                )
            )

    def _sample_states(self) -> None:
        fleet = self.sc.fleet
        available = fleet.estimate_available(self.t, self.rng)
        self.busy.now = self.t
        in_flight = len(self.flight.trainings)
        away = sum(1 for d, u in self.busy.until.items() if self.t < u < math.inf)
        uploading = self.flight.uploading
        training = in_flight - uploading
        idle = max(0, available - in_flight - away)
        self.record.device_states(
            self.t,
            {
                "training": training,
                "uploading": uploading,
                "idle": idle,
                "offline": max(0, self.cfg.devices - idle - in_flight),
            },
        )

    def _on_drop(self, tr: _Training) -> None:
        self.record.dropout(self.t, tr.device)
        self._end(tr, self.t + tr.restart_s, Work.DROPOUT)
        self._discard_queued(tr)
        self._refill_after_loss(tr)

    def _on_crash(self, tr: _Training) -> None:
        self.record.crash(self.t, tr.device)
        self._end(tr, self.t + tr.restart_s, Work.CRASH)
        self._refill_after_loss(tr)

    def _discard_queued(self, tr: _Training) -> None:
        if tr in self.flight.queued:
            self.flight.queued.remove(tr)

    def _refill_after_loss(self, tr: _Training) -> None:
        """A device that dropped out or crashed says nothing: under FedBuff its lease keeps
        the slot until it expires (as in the product), under FedAvg the deadline or the goal
        closes the round."""
        if not self.schedule.cohorts:
            self._fill()

    def _on_deadline(self, round_id: int) -> None:
        if round_id != self.schedule.round_id or not self.core.round_open:
            return
        result = self.core.deadline_passed(self.t)
        if result is not None and result.step is not None:
            self._after_step()
        self._schedule()

    def _on_wake(self) -> None:
        if self.t >= self.schedule.wake_at:
            self.schedule.wake_at = math.inf
        self._schedule()

    def _observe(self) -> None:
        """Tell the ledger the slot counts from now on (see :mod:`firmware_sim.slots`)."""
        alive = len(self.flight.trainings)
        lost = 0 if self.schedule.leases is None else max(0, self.schedule.leases.in_flight - alive)
        self.ledger.observe(self.t, alive, lost, self.schedule.waiting)

    # ------------------------------------------------------------------ main loop
    def _should_stop(self) -> bool:
        cfg = self.cfg
        if self.tally.reached and cfg.stop.stop_at_target:
            return True
        if cfg.stop.max_updates is not None and self.tally.received >= cfg.stop.max_updates:
            return True
        wall_limit = cfg.stop.max_wall_s if cfg.stop.max_wall_s is not None else math.inf
        return time.perf_counter() - self.wall0 >= wall_limit

    def _dispatch(self, kind: _Ev, ref: int) -> None:
        if kind is _Ev.DEADLINE:
            self._on_deadline(ref)
            return
        if kind is _Ev.WAKE:
            self._on_wake()
            return
        tr = self.flight.trainings.get(ref)
        if tr is None:  # a straggler aborted when its round closed
            return
        if kind is _Ev.TRAIN_DONE:
            self._on_train_done(tr)
        elif kind is _Ev.ARRIVE:
            self._on_arrive(tr)
        elif kind is _Ev.DROP:
            self._on_drop(tr)
        else:
            self._on_crash(tr)

    def _finish_ledger(self) -> None:
        """Put where the time went into the record: ``utilisation`` and ``bottleneck``."""
        util = self.ledger.summary(self.t)
        self.record.set_utilisation(
            util, verdict(util, cohorts=self.schedule.cohorts), self.ledger.series()
        )

    def run(self) -> VirtualResult:
        """Run to the target / limits; returns the filled record (already finished)."""
        self.wall0 = time.perf_counter()
        self.record.started_at = self.wall0
        self._evaluate()  # version 0
        if not self.schedule.cohorts:
            lease_s = self.cfg.aggregation.lease_s or LEASE_FACTOR * self._auto_deadline()
            config = ParticipationConfig(
                concurrency=self.cfg.aggregation.concurrency, lease_s=lease_s
            )
            self.schedule.leases = LeaseBook(config, rng=self.rng)
            self.schedule.pool = FleetPool(self.sc.fleet, self.busy, self._admits())
            self._fill()
        else:
            self.schedule.round_deadline_s = (
                self.cfg.aggregation.round_deadline_s or self._auto_deadline()
            )
            self._open_round()
        self._observe()
        max_time = self.cfg.stop.max_time_s if self.cfg.stop.max_time_s is not None else math.inf
        while self.events and not self._should_stop():
            t, _, kind, ref = self.events.pop()
            if t > max_time:
                self.t = max_time
                break
            self.t = t
            self._dispatch(kind, ref)
            self._observe()
        self._finish_ledger()
        if self.tally.applied != self.tally.applied_at_eval:
            self._evaluate()  # the final model, unless it was just evaluated
        if self.local_dp is not None:
            self.record.set_local_dp(self.local_dp.summary(self.cfg.devices).to_json())
        wall = time.perf_counter() - self.wall0
        self.record.finish(
            wall_time_s=wall, model_versions=self.version, final_accuracy=self.tally.last_accuracy
        )
        core_stats = self.core.statistics()
        return VirtualResult(
            record=self.record,
            wall_s=wall,
            trainings_computed=self.compute.trainings_computed,
            train_calls=self.compute.train_calls,
            train_wall_s=self.compute.train_wall,
            round_deadline_s=self.schedule.round_deadline_s,
            stats={"core": repr(core_stats), "codec": codec_to_text(self.codec)},
        )


def _work_of(outcome: str) -> Work:
    """How the work of a training that reached the aggregator ended."""
    if outcome == "applied":
        return Work.APPLIED
    if outcome in (RejectReason.LEASE_EXPIRED, RejectReason.NO_LEASE):
        return Work.LEASE_EXPIRED
    return Work.STALE if outcome == "stale" else Work.REJECTED


def run_virtual(
    config: SimConfig,
    *,
    scenario: Scenario | None = None,
    progress: Callable[[Progress], None] | None = None,
    label: str | None = None,
) -> VirtualResult:
    """Build the scenario (unless given; it must match ``config`` apart from the aggregation
    settings) and run it once in virtual time."""
    sc = build_scenario(config) if scenario is None else replace(scenario, config=config)
    return VirtualSimulator(sc, progress=progress, label=label).run()
