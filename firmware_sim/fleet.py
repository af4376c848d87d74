"""A lazy fleet of simulated devices: per-device attributes as numpy arrays, no per-device objects.

``Fleet(num_devices, profile_mix, seed)`` draws everything a device needs once, vectorised
(profile index, speed, bandwidths, latency, availability phase, initial on/off state), so building
a fleet of 100,000 devices costs a few numpy draws. Everything else is computed on demand for the
devices the simulation actually touches, so the cost of a run grows with the number of updates,
not with the number of devices.

Models (units: seconds and bytes; ``t`` is seconds since virtual midnight of day 0):

* training time = ``speed[d] · epochs · num_examples / 100 · J`` with per-run jitter
  ``J = exp(N(-σ²/2, σ))`` (mean 1), ``σ`` = the profile's ``jitter_sigma``;
* upload time = ``latency[d] + nbytes / upload_bandwidth[d]``, download likewise;
* availability, see :class:`firmware_sim.profiles.AvailabilityModel`. Diurnal devices are
  evaluated with a counter-based hash (SplitMix64 of ``(seed, device, cycle)``), so any
  ``(device, t)`` can be queried in O(1) and in any order with consistent answers. Bursty devices
  lazily generate their on/off flip times in chunks of :data:`BURST_CHUNK` intervals from a
  generator seeded by ``(seed, device, chunk)``; only the current chunk is kept per touched device
  and a query back in time replays from chunk 0, so answers never depend on query order either;
* fate of a started training: dropped with probability ``dropout`` at a uniform fraction of the
  work, else crashed with probability ``crash`` (restarting after ``crash_restart`` seconds),
  else completed.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from firmware_sim.profiles import (
    AvailabilityKind,
    AvailabilityModel,
    DeviceProfile,
    ProfileMix,
    get_mix,
)
from firmware_sim.seeding import MASK64

__all__ = ["BURST_CHUNK", "Fate", "Fleet", "TrainingFate"]

BURST_CHUNK = 32
"""On/off intervals generated at a time for a bursty device."""

DIURNAL_HORIZON_HOURS = 24 * 60
"""How far :meth:`Fleet.next_available` looks ahead for a diurnal device before giving up."""

EXHAUSTIVE_LIMIT = 4096
"""Fleets up to this size fall back to an exhaustive scan when rejection sampling runs dry."""

MIN_BANDWIDTH = 1.0
"""Bandwidth draws are clipped to at least this many bytes/s."""

_STREAM_ATTRS = 0x5EED_A77E
_STREAM_DIURNAL = 0xD1_0A_1
_STREAM_BURST = 0xB0_0575


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class Fate(StrEnum):
    """How a started training ends."""

    COMPLETED = "completed"
    DROPPED = "dropped"  # the device vanished part-way through
    CRASHED = "crashed"  # the agent crashed, lost its in-flight work and restarts later


@dataclass(frozen=True)
class TrainingFate:
    """The fate of one training: ``at_fraction`` of the work is done when it ends."""

    kind: Fate
    at_fraction: float = 1.0
    restart_after_s: float = 0.0


class _BurstTrack:
    """Current chunk of a bursty device's flip times (see module docstring)."""

    __slots__ = ("chunk", "flips", "start")

    def __init__(self, chunk: int, start: float, flips: NDArray[np.float64]) -> None:
        self.chunk = chunk
        self.start = start
        self.flips = flips


class Fleet:
    """``num_devices`` devices drawn from ``profile_mix``; deterministic for a ``seed``.

    Public per-device arrays (index = device id, ``0 <= d < num_devices``): ``profile_index``
    (int8, into ``profiles``), ``speed`` (s per epoch per 100 examples), ``upload_bandwidth`` and
    ``download_bandwidth`` (bytes/s), ``latency`` (s), ``phase_hours`` (diurnal phase offset),
    ``initially_on`` (bursty state at ``t = 0``). Treat them as read-only.
    """

    def __init__(
        self, num_devices: int, profile_mix: ProfileMix | DeviceProfile | str, seed: int = 0
    ) -> None:
        if num_devices <= 0:
            raise ValueError(f"num_devices must be > 0, got {num_devices}")
        if isinstance(profile_mix, str):
            mix = get_mix(profile_mix)
        elif isinstance(profile_mix, DeviceProfile):
            mix = ProfileMix.single(profile_mix)
        else:
            mix = profile_mix
        self.num_devices = int(num_devices)
        self.mix = mix
        self.profiles: tuple[DeviceProfile, ...] = mix.profiles
        self.seed = int(seed)
        self._diurnal_key = _mix64(_mix64(self.seed & MASK64) ^ _STREAM_DIURNAL)
        self.draws_total = 0
        """Candidates drawn by :meth:`sample_idle_devices` so far (for cost accounting)."""

        n = self.num_devices
        rng = np.random.default_rng([self.seed & MASK64, _STREAM_ATTRS])
        if len(self.profiles) == 1:
            self.profile_index: NDArray[np.int8] = np.zeros(n, dtype=np.int8)
        else:
            self.profile_index = rng.choice(
                len(self.profiles), size=n, p=np.asarray(mix.weights)
            ).astype(np.int8)
        self.speed: NDArray[np.float64] = np.empty(n)
        self.upload_bandwidth: NDArray[np.float64] = np.empty(n)
        self.download_bandwidth: NDArray[np.float64] = np.empty(n)
        self.latency: NDArray[np.float64] = np.empty(n)
        self.phase_hours: NDArray[np.float64] = np.zeros(n)
        self.initially_on: NDArray[np.bool_] = np.ones(n, dtype=np.bool_)
        for j, prof in enumerate(self.profiles):
            mask = self.profile_index == j
            m = int(np.count_nonzero(mask))
            if m == 0:
                continue
            self.speed[mask] = np.maximum(prof.compute.sample(rng, m), 0.0)
            self.upload_bandwidth[mask] = np.maximum(
                prof.upload_bandwidth.sample(rng, m), MIN_BANDWIDTH
            )
            self.download_bandwidth[mask] = np.maximum(
                prof.download_bandwidth.sample(rng, m), MIN_BANDWIDTH
            )
            self.latency[mask] = np.maximum(prof.latency.sample(rng, m), 0.0)
            avail = prof.availability
            if avail.kind is AvailabilityKind.DIURNAL and avail.phase_spread_hours > 0:
                spread = avail.phase_spread_hours
                self.phase_hours[mask] = rng.uniform(-spread, spread, size=m)
            elif avail.kind is AvailabilityKind.BURSTY:
                self.initially_on[mask] = rng.random(m) < avail.mean_fraction
        self._bursts: dict[int, _BurstTrack] = {}
        self._off: dict[int, tuple[float, float]] = {}  # device -> (unavailable from, until)

    # ---------------------------------------------------------------- per-device look-ups

    def profile_of(self, device: int) -> DeviceProfile:
        """The profile of ``device`` (raises IndexError when out of range)."""
        if not 0 <= device < self.num_devices:
            raise IndexError(f"device {device} out of range [0, {self.num_devices})")
        return self.profiles[int(self.profile_index[device])]

    def counts_by_profile(self) -> dict[str, int]:
        """How many devices each profile got."""
        counts = np.bincount(self.profile_index, minlength=len(self.profiles))
        return {p.name: int(c) for p, c in zip(self.profiles, counts, strict=True)}

    # ---------------------------------------------------------------- timing

    def training_duration(
        self, device: int, num_examples: int, epochs: int, rng: np.random.Generator
    ) -> float:
        """Seconds to train ``epochs`` epochs over ``num_examples`` examples (one jitter draw)."""
        sigma = self.profile_of(device).jitter_sigma
        base = float(self.speed[device]) * epochs * num_examples / 100.0
        if sigma > 0.0:
            base *= math.exp(rng.normal(-0.5 * sigma * sigma, sigma))
        return base

    def upload_duration(self, device: int, nbytes: int) -> float:
        """``latency + nbytes / upload_bandwidth`` seconds."""
        self.profile_of(device)
        return float(self.latency[device] + nbytes / self.upload_bandwidth[device])

    def download_duration(self, device: int, nbytes: int) -> float:
        """``latency + nbytes / download_bandwidth`` seconds."""
        self.profile_of(device)
        return float(self.latency[device] + nbytes / self.download_bandwidth[device])

    # ---------------------------------------------------------------- failures

    def will_drop(self, device: int, rng: np.random.Generator) -> bool:
        """Whether a training started now will be abandoned (one Bernoulli(dropout) draw)."""
        return bool(rng.random() < self.profile_of(device).dropout)

    def drop_point(self, device: int, rng: np.random.Generator) -> float | None:
        """``None`` when the training completes, else the fraction of it done when the device
        vanishes (uniform on (0, 1)); multiply by :meth:`training_duration` for the time."""
        if not self.will_drop(device, rng):
            return None
        return float(rng.uniform(0.0, 1.0))

    def training_fate(self, device: int, rng: np.random.Generator) -> TrainingFate:
        """Dropped with P = dropout (away for ``rejoin_after`` seconds, in ``restart_after_s``),
        else crashed with P = crash (restarting after ``crash_restart``), else completed."""
        prof = self.profile_of(device)
        if rng.random() < prof.dropout:
            at = float(rng.uniform(0.0, 1.0))
            away = float(prof.rejoin_after.sample(rng, 1)[0])
            return TrainingFate(Fate.DROPPED, at_fraction=at, restart_after_s=away)
        if prof.crash > 0.0 and rng.random() < prof.crash:
            restart = float(prof.crash_restart.sample(rng, 1)[0])
            return TrainingFate(
                Fate.CRASHED, at_fraction=float(rng.uniform(0.0, 1.0)), restart_after_s=restart
            )
        return TrainingFate(Fate.COMPLETED)

    # ---------------------------------------------------------------- availability

    def is_available(self, device: int, t: float) -> bool:
        """Whether ``device`` may start training at time ``t`` (seconds)."""
        avail = self.profile_of(device).availability
        if avail.kind is AvailabilityKind.ALWAYS:
            return True
        if avail.kind is AvailabilityKind.DIURNAL:
            return self._slot_available(device, self._slot(device, t), avail)
        on, _ = self._burst_state(device, t, avail)
        return on

    def next_available(self, device: int, t: float) -> float:
        """The earliest time ``>= t`` at which ``device`` is available (``t`` if it is now;
        ``inf`` if a diurnal device stays unavailable for :data:`DIURNAL_HORIZON_HOURS`)."""
        avail = self.profile_of(device).availability
        if avail.kind is AvailabilityKind.ALWAYS:
            return t
        if avail.kind is AvailabilityKind.DIURNAL:
            slot = self._slot(device, t)
            for s in range(slot, slot + DIURNAL_HORIZON_HOURS):
                if self._slot_available(device, s, avail):
                    return t if s == slot else self._slot_start(device, s)
            return math.inf
        on, next_flip = self._burst_state(device, t, avail)
        return t if on else next_flip

    def available_until(self, device: int, t: float) -> float:
        """End of the availability window ``device`` is in at ``t`` (``t`` if unavailable,
        ``inf`` for always-on devices and diurnal windows longer than the horizon)."""
        avail = self.profile_of(device).availability
        if avail.kind is AvailabilityKind.ALWAYS:
            return math.inf
        if avail.kind is AvailabilityKind.DIURNAL:
            slot = self._slot(device, t)
            for s in range(slot, slot + DIURNAL_HORIZON_HOURS):
                if not self._slot_available(device, s, avail):
                    return t if s == slot else self._slot_start(device, s)
            return math.inf
        on, next_flip = self._burst_state(device, t, avail)
        return next_flip if on else t

    def sample_idle_devices(
        self, k: int, t: float, rng: np.random.Generator, busy: Container[int]
    ) -> list[int]:
        """Up to ``k`` distinct devices that are available at ``t`` and not in ``busy``.

        Rejection sampling: draw uniform device ids, keep the available, non-busy, new ones.
        Expected draws are ``k / q`` where ``q`` is the idle-and-available fraction, capped at
        ``64·k + 256`` draws, so the cost is O(k) whatever the fleet size. When the cap is hit
        (almost nobody idle), fleets of at most :data:`EXHAUSTIVE_LIMIT` devices are scanned
        exhaustively in random order; bigger fleets return fewer than ``k`` devices.
        """
        if k <= 0:
            return []
        n = self.num_devices
        chosen: list[int] = []
        seen: set[int] = set()
        budget = 64 * k + 256
        draws = 0
        while len(chosen) < k and draws < budget:
            size = min(max(2 * (k - len(chosen)), 16), budget - draws)
            for d in rng.integers(0, n, size=size).tolist():
                draws += 1
                if d in seen or d in busy:
                    continue
                seen.add(d)
                if self.is_available(d, t):
                    chosen.append(d)
                    if len(chosen) == k:
                        break
        self.draws_total += draws
        if len(chosen) < k and n <= EXHAUSTIVE_LIMIT:
            for d in rng.permutation(n).tolist():
                if d in seen or d in busy:
                    continue
                if self.is_available(d, t):
                    chosen.append(d)
                    if len(chosen) == k:
                        break
        return chosen

    def next_available_any(self, t: float, busy: Container[int], scan: int = 512) -> float:
        """The earliest time ``>= t`` at which a device not in ``busy`` is available: over
        every device of fleets of at most ``scan`` devices, else over the ``scan`` evenly spaced
        devices ``i·n // scan`` (then an upper bound of the true earliest time); ``inf`` if none
        ever is. A device's answer is cached while it stays unavailable, so repeated calls
        cost O(scan) look-ups."""
        n = self.num_devices
        devices = range(n) if n <= scan else (i * n // scan for i in range(scan))
        best = math.inf
        for d in devices:
            if d in busy:
                continue
            best = min(best, self._next_on(d, t))
            if best <= t:
                break
        return best

    def _next_on(self, device: int, t: float) -> float:
        """:meth:`next_available`, cached: a device unavailable at ``t0`` until ``t1`` stays
        so for every ``t0 <= t < t1``."""
        cached = self._off.get(device)
        if cached is not None and cached[0] <= t < cached[1]:
            return cached[1]
        nxt = self.next_available(device, t)
        if nxt > t:
            self._off[device] = (t, nxt)
        return nxt

    def estimate_available(
        self, t: float, rng: np.random.Generator, sample_size: int = 2048
    ) -> int:
        """Number of devices available at ``t``: exact when the fleet has at most
        ``sample_size`` devices, else scaled from a uniform sample (O(sample_size))."""
        n = self.num_devices
        if n <= sample_size:
            return sum(self.is_available(d, t) for d in range(n))
        sample = rng.integers(0, n, size=sample_size).tolist()
        hits = sum(self.is_available(d, t) for d in sample)
        return round(hits * n / sample_size)

    # ---------------------------------------------------------------- internals

    def _slot(self, device: int, t: float) -> int:
        """Index of the device-local hour containing ``t``."""
        return math.floor(t / 3600.0 + float(self.phase_hours[device]))

    def _slot_start(self, device: int, slot: int) -> float:
        """First time that falls in local hour ``slot`` (robust to rounding)."""
        t = (slot - float(self.phase_hours[device])) * 3600.0
        while self._slot(device, t) < slot:
            t = math.nextafter(t, math.inf)
        return t

    def _slot_available(self, device: int, slot: int, avail: AvailabilityModel) -> bool:
        cycle = (slot - avail.cycle_start_hour) // 24
        h = _mix64(self._diurnal_key ^ device)
        h = _mix64(h ^ (cycle & MASK64))
        u = (h >> 11) * (1.0 / (1 << 53))
        return u < avail.hourly[slot % 24]

    def _burst_chunk(
        self, device: int, chunk: int, start: float, avail: AvailabilityModel
    ) -> NDArray[np.float64]:
        """Flip times ending intervals ``chunk·C .. chunk·C + C - 1`` (C = BURST_CHUNK, even),
        interval ``i`` being on iff ``(i even) == initially_on``."""
        rng = np.random.default_rng([self.seed & MASK64, _STREAM_BURST, device, chunk])
        first_on = bool(self.initially_on[device])
        even = np.arange(BURST_CHUNK) % 2 == 0
        means = np.where(even == first_on, avail.mean_on_s, avail.mean_off_s)
        return start + np.cumsum(rng.standard_exponential(BURST_CHUNK) * means)

    def _burst_state(self, device: int, t: float, avail: AvailabilityModel) -> tuple[bool, float]:
        """``(on at t, time of the next flip after t)``."""
        track = self._bursts.get(device)
        if track is None or t < track.start:
            track = _BurstTrack(0, 0.0, self._burst_chunk(device, 0, 0.0, avail))
            self._bursts[device] = track
        while t >= track.flips[-1]:
            start = float(track.flips[-1])
            track.chunk += 1
            track.start = start
            track.flips = self._burst_chunk(device, track.chunk, start, avail)
        j = int(np.searchsorted(track.flips, t, side="right"))
        on = (j % 2 == 0) == bool(self.initially_on[device])
        return on, float(track.flips[j])
