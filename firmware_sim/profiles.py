"""Device profiles of the fleet simulator: what a phone, a sensor and a vehicle look like.

A :class:`DeviceProfile` is a frozen description of a *class* of devices. The fleet
(:mod:`firmware_sim.fleet`) draws the per-device values from it once, vectorised:

* **Compute.** ``compute`` is the distribution of a device's persistent speed, in seconds per
  local epoch per 100 examples. A device trains ``num_examples`` examples for ``epochs`` epochs in
  ``speed * epochs * num_examples / 100 * J`` seconds, where ``J`` is a per-run jitter,
  log-normal with mean 1: ``J = exp(N(-σ²/2, σ))`` with ``σ = jitter_sigma``.
* **Links.** Upload and download bandwidth (bytes/s) and one-way latency (s) are drawn once per
  device; sending ``n`` bytes takes ``latency + n / bandwidth``, so compression shows up as time.
* **Availability** (:class:`AvailabilityModel`): ``always``; ``diurnal`` (a probability of being
  available for each hour of the device's local day, e.g. phones charging at night, with a
  per-device phase offset drawn uniformly in ``±phase_spread_hours``); or ``bursty``
  (alternating on/off periods with exponential durations, e.g. vehicles).
* **Failures.** ``dropout`` is the probability that a started training never delivers because the
  device vanishes part-way through (the fraction done is uniform on (0, 1)); ``crash`` is the
  probability that, if it did not drop out, the agent crashes, loses its in-flight work and
  restarts after a delay drawn from ``crash_restart``. A device that dropped out stays away for a
  time drawn from ``rejoin_after`` before it can be picked again.

A :class:`ProfileMix` is a weighted mix of profiles; every named fleet (``phone``, ``sensor``,
``vehicle``, ``mixed``) is a mix, the single ones with one entry. The command line's
``--dropout`` and ``--speed`` overrides are :meth:`ProfileMix.with_overrides`, and
:func:`parse_distribution` parses ``--speed lognormal:0,1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AvailabilityKind",
    "AvailabilityModel",
    "Constant",
    "DeviceProfile",
    "Distribution",
    "Exponential",
    "HalfNormal",
    "LogNormal",
    "ProfileMix",
    "Uniform",
    "get_mix",
    "get_profile",
    "list_profiles",
    "parse_distribution",
    "parse_mix",
]


# --------------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Distribution(Protocol):
    """A distribution over non-negative reals that draws vectorised samples."""

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` independent samples."""
        ...


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class HalfNormal:
    """``|X|`` with ``X ~ N(0, scale²)``: mean ``scale·√(2/π)``, variance ``scale²(1 - 2/π)``."""

    scale: float

    def __post_init__(self) -> None:
        _check_finite(scale=self.scale)
        if self.scale <= 0:
            raise ValueError(f"halfnormal scale must be > 0, got {self.scale}")

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` samples."""
        return np.abs(rng.normal(0.0, self.scale, size=n))

    @property
    def mean(self) -> float:
        """Expected value."""
        return self.scale * math.sqrt(2.0 / math.pi)

    def __str__(self) -> str:
        return f"halfnormal:{self.scale:g}"


@dataclass(frozen=True)
class LogNormal:
    """``exp(X)`` with ``X ~ N(mu, sigma²)``: median ``e^mu``, mean ``e^(mu + sigma²/2)``."""

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        _check_finite(mu=self.mu, sigma=self.sigma)
        if self.sigma < 0:
            raise ValueError(f"lognormal sigma must be >= 0, got {self.sigma}")

    @classmethod
    def from_median(cls, median: float, sigma: float) -> LogNormal:
        """The log-normal with the given median (``mu = ln median``) and log-space spread."""
        if median <= 0:
            raise ValueError(f"lognormal median must be > 0, got {median}")
        return cls(math.log(median), sigma)

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` samples."""
        return rng.lognormal(self.mu, self.sigma, size=n)

    @property
    def mean(self) -> float:
        """Expected value."""
        return math.exp(self.mu + self.sigma**2 / 2.0)

    def __str__(self) -> str:
        return f"lognormal:{self.mu:g},{self.sigma:g}"


@dataclass(frozen=True)
class Constant:
    """Always ``v``."""

    v: float

    def __post_init__(self) -> None:
        _check_finite(v=self.v)
        if self.v < 0:
            raise ValueError(f"constant must be >= 0, got {self.v}")

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Return ``n`` copies of ``v`` (consumes no randomness)."""
        return np.full(n, self.v, dtype=np.float64)

    @property
    def mean(self) -> float:
        """Expected value."""
        return self.v

    def __str__(self) -> str:
        return f"const:{self.v:g}"


@dataclass(frozen=True)
class Uniform:
    """Uniform on ``[lo, hi)``: mean ``(lo + hi)/2``, variance ``(hi - lo)²/12``."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        _check_finite(lo=self.lo, hi=self.hi)
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"uniform needs 0 <= lo <= hi, got lo={self.lo}, hi={self.hi}")

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` samples."""
        return rng.uniform(self.lo, self.hi, size=n)

    @property
    def mean(self) -> float:
        """Expected value."""
        return (self.lo + self.hi) / 2.0

    def __str__(self) -> str:
        return f"uniform:{self.lo:g},{self.hi:g}"


@dataclass(frozen=True)
class Exponential:
    """Exponential with the given mean (rate ``1/mean``); memoryless."""

    mean: float

    def __post_init__(self) -> None:
        _check_finite(mean=self.mean)
        if self.mean <= 0:
            raise ValueError(f"exponential mean must be > 0, got {self.mean}")

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` samples."""
        return rng.exponential(self.mean, size=n)

    def __str__(self) -> str:
        return f"exp:{self.mean:g}"


_DIST_ARITY: dict[str, tuple[str, int]] = {
    "halfnormal": ("halfnormal", 1),
    "half-normal": ("halfnormal", 1),
    "lognormal": ("lognormal", 2),
    "log-normal": ("lognormal", 2),
    "const": ("const", 1),
    "constant": ("const", 1),
    "uniform": ("uniform", 2),
    "exp": ("exp", 1),
    "exponential": ("exp", 1),
}


def parse_distribution(spec: str) -> Distribution:
    """Parse ``"lognormal:MU,SIGMA"``, ``"halfnormal:SCALE"``, ``"const:V"``, ``"uniform:LO,HI"``
    or ``"exp:MEAN"`` (case-insensitive, spaces ignored). ``str()`` of a distribution round-trips.

    Raises:
        ValueError: unknown kind, wrong number of parameters, non-numeric or invalid parameters.
    """
    text = spec.replace(" ", "").lower()
    kind, sep, params = text.partition(":")
    if not sep or kind not in _DIST_ARITY:
        known = "lognormal:MU,SIGMA | halfnormal:SCALE | const:V | uniform:LO,HI | exp:MEAN"
        raise ValueError(f"bad distribution {spec!r}; expected one of {known}")
    canonical, arity = _DIST_ARITY[kind]
    parts = params.split(",") if params else []
    if len(parts) != arity:
        raise ValueError(f"{canonical} takes {arity} parameter(s), got {len(parts)} in {spec!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"non-numeric parameter in distribution {spec!r}") from exc
    if canonical == "halfnormal":
        return HalfNormal(values[0])
    if canonical == "lognormal":
        return LogNormal(values[0], values[1])
    if canonical == "const":
        return Constant(values[0])
    if canonical == "uniform":
        return Uniform(values[0], values[1])
    return Exponential(values[0])


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


class AvailabilityKind(StrEnum):
    """How a device's availability evolves over (virtual) time."""

    ALWAYS = "always"
    DIURNAL = "diurnal"
    BURSTY = "bursty"


@dataclass(frozen=True)
class AvailabilityModel:
    """When a device can train.

    * ``always``: always available.
    * ``diurnal``: ``hourly[h]`` is the probability of being available during hour ``h`` of the
      device's local day, where local hour = ``t/3600 + phase`` (mod 24), ``t`` in seconds since
      virtual midnight, and ``phase ~ Uniform(-phase_spread_hours, +phase_spread_hours)`` per
      device. Each device draws one uniform ``u`` per local *cycle* (24 h starting at
      ``cycle_start_hour``) and is available in hour ``h`` of that cycle iff ``u < hourly[h]``.
      Across devices the available fraction at hour ``h`` is therefore exactly ``hourly[h]``, and
      for a single-peaked profile whose cycle starts at its minimum, a device's availability in
      one cycle is one contiguous window (a phone is plugged in once a night, not hour by hour).
    * ``bursty``: an alternating renewal process, on for ``Exp(mean_on_s)`` then off for
      ``Exp(mean_off_s)``; it starts in its stationary state (on with probability
      ``mean_on / (mean_on + mean_off)``).
    """

    kind: AvailabilityKind = AvailabilityKind.ALWAYS
    hourly: tuple[float, ...] = ()
    phase_spread_hours: float = 0.0
    cycle_start_hour: int = 12
    mean_on_s: float = 0.0
    mean_off_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind is AvailabilityKind.DIURNAL:
            if len(self.hourly) != 24:
                n = len(self.hourly)
                raise ValueError(f"diurnal availability needs 24 hourly values, got {n}")
            if not all(0.0 <= p <= 1.0 for p in self.hourly):
                raise ValueError("diurnal hourly probabilities must lie in [0, 1]")
            if max(self.hourly) <= 0.0:
                raise ValueError("diurnal availability must be > 0 in some hour")
            if not 0 <= self.cycle_start_hour < 24:
                raise ValueError("cycle_start_hour must be in [0, 24)")
            if not (math.isfinite(self.phase_spread_hours) and self.phase_spread_hours >= 0):
                raise ValueError("phase_spread_hours must be finite and >= 0")
        if self.kind is AvailabilityKind.BURSTY and not (
            self.mean_on_s > 0 and self.mean_off_s > 0
        ):
            raise ValueError("bursty availability needs mean_on_s > 0 and mean_off_s > 0")

    @classmethod
    def always(cls) -> AvailabilityModel:
        """Always available (mains-powered sensors, gateways)."""
        return cls(AvailabilityKind.ALWAYS)

    @classmethod
    def diurnal(
        cls, hourly: Sequence[float], phase_spread_hours: float = 0.0, cycle_start_hour: int = 12
    ) -> AvailabilityModel:
        """Available with probability ``hourly[h]`` in local hour ``h`` (see class docstring)."""
        return cls(
            AvailabilityKind.DIURNAL,
            hourly=tuple(float(p) for p in hourly),
            phase_spread_hours=phase_spread_hours,
            cycle_start_hour=cycle_start_hour,
        )

    @classmethod
    def bursty(cls, mean_on_s: float, mean_off_s: float) -> AvailabilityModel:
        """Exponential on/off periods with the given means (seconds)."""
        return cls(AvailabilityKind.BURSTY, mean_on_s=mean_on_s, mean_off_s=mean_off_s)

    @property
    def mean_fraction(self) -> float:
        """Long-run fraction of time a device is available."""
        if self.kind is AvailabilityKind.DIURNAL:
            return sum(self.hourly) / 24.0
        if self.kind is AvailabilityKind.BURSTY:
            return self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        return 1.0


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class DeviceProfile:
    """A class of devices; units are seconds and bytes. See the module docstring for the math."""

    name: str
    compute: Distribution  # seconds per local epoch per 100 examples, drawn once per device
    upload_bandwidth: Distribution  # bytes/s, drawn once per device
    download_bandwidth: Distribution  # bytes/s, drawn once per device
    latency: Distribution  # seconds per transfer, drawn once per device
    availability: AvailabilityModel = field(default_factory=AvailabilityModel.always)
    dropout: float = 0.0  # P(device vanishes part-way through a started training)
    crash: float = 0.0  # P(agent crashes and loses in-flight work | no dropout)
    crash_restart: Distribution = field(default_factory=lambda: Constant(60.0))  # seconds
    jitter_sigma: float = 0.0  # log-space spread of the per-run multiplicative jitter (mean 1)
    rejoin_after: Distribution = field(default_factory=lambda: Exponential(600.0))  # s away

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("profile name must not be empty")
        _check_probability("dropout", self.dropout)
        _check_probability("crash", self.crash)
        if not (math.isfinite(self.jitter_sigma) and self.jitter_sigma >= 0):
            raise ValueError("jitter_sigma must be finite and >= 0")

    def with_overrides(
        self,
        *,
        dropout: float | None = None,
        crash: float | None = None,
        compute: Distribution | None = None,
    ) -> DeviceProfile:
        """A copy with the given fields replaced (``None`` keeps the profile's value)."""
        return replace(
            self,
            dropout=self.dropout if dropout is None else dropout,
            crash=self.crash if crash is None else crash,
            compute=self.compute if compute is None else compute,
        )


@dataclass(frozen=True)
class ProfileMix:
    """A weighted mix of device profiles; weights are normalised to sum to 1."""

    profiles: tuple[DeviceProfile, ...]
    weights: tuple[float, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.profiles or len(self.profiles) != len(self.weights):
            raise ValueError("a profile mix needs one weight per profile and at least one profile")
        if len(self.profiles) > 127:
            raise ValueError("a profile mix holds at most 127 profiles")
        if any(not (math.isfinite(w) and w >= 0) for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum, got {self.weights}")
        total = sum(self.weights)
        object.__setattr__(self, "weights", tuple(w / total for w in self.weights))

    @classmethod
    def single(cls, profile: DeviceProfile) -> ProfileMix:
        """A mix of one profile."""
        return cls((profile,), (1.0,), name=profile.name)

    def with_overrides(
        self,
        *,
        dropout: float | None = None,
        crash: float | None = None,
        compute: Distribution | str | None = None,
    ) -> ProfileMix:
        """Apply the CLI's ``--dropout`` / ``--crash`` / ``--speed`` to every profile."""
        dist = parse_distribution(compute) if isinstance(compute, str) else compute
        return replace(
            self,
            profiles=tuple(
                p.with_overrides(dropout=dropout, crash=crash, compute=dist) for p in self.profiles
            ),
        )

    def describe(self) -> dict[str, float]:
        """``{profile name: weight}``, for configs and reports."""
        return {p.name: w for p, w in zip(self.profiles, self.weights, strict=True)}


# Phones: plugged in and on Wi-Fi mostly at night. Index = local hour 0..23.
PHONE_HOURLY: tuple[float, ...] = (
    0.85, 0.9, 0.9, 0.9, 0.9, 0.85, 0.7, 0.45,  # 00-07
    0.2, 0.1, 0.1, 0.1, 0.08, 0.08, 0.1, 0.1,  # 08-15
    0.1, 0.12, 0.15, 0.2, 0.3, 0.45, 0.6, 0.75,  # 16-23
)  # fmt: skip

PHONE = DeviceProfile(
    name="phone",
    compute=LogNormal.from_median(0.5, 0.6),
    upload_bandwidth=LogNormal.from_median(250_000.0, 0.8),  # ~2 Mbit/s
    download_bandwidth=LogNormal.from_median(1_250_000.0, 0.8),  # ~10 Mbit/s
    latency=LogNormal.from_median(0.08, 0.5),
    availability=AvailabilityModel.diurnal(PHONE_HOURLY, phase_spread_hours=2.0),
    dropout=0.10,
    crash=0.01,
    crash_restart=LogNormal.from_median(120.0, 0.5),
    jitter_sigma=0.3,
)

SENSOR = DeviceProfile(
    name="sensor",
    compute=LogNormal.from_median(4.0, 0.3),
    upload_bandwidth=LogNormal.from_median(2_500.0, 0.5),  # ~20 kbit/s (NB-IoT class)
    download_bandwidth=LogNormal.from_median(6_000.0, 0.5),
    latency=LogNormal.from_median(0.5, 0.4),
    availability=AvailabilityModel.always(),
    dropout=0.02,
    crash=0.005,
    crash_restart=Constant(30.0),  # watchdog reboot
    jitter_sigma=0.05,
)

VEHICLE = DeviceProfile(
    name="vehicle",
    compute=Uniform(0.2, 0.8),
    upload_bandwidth=LogNormal.from_median(100_000.0, 1.0),  # cellular, very variable
    download_bandwidth=LogNormal.from_median(500_000.0, 1.0),
    latency=LogNormal.from_median(0.15, 0.7),
    availability=AvailabilityModel.bursty(mean_on_s=1_800.0, mean_off_s=3_600.0),
    dropout=0.15,
    crash=0.01,
    crash_restart=LogNormal.from_median(300.0, 1.0),
    jitter_sigma=0.2,
)

# The calibration fleet of DESIGN.md: always on, fast links, no failures of its own (add them with
# --dropout), log-normal(sigma = 1) training times with mean 1 s per epoch per 100 examples.
LAB = DeviceProfile(
    name="lab",
    compute=Constant(1.0),
    upload_bandwidth=Constant(1_000_000.0),
    download_bandwidth=Constant(10_000_000.0),
    latency=Constant(0.01),
    availability=AvailabilityModel.always(),
    dropout=0.0,
    crash=0.0,
    jitter_sigma=1.0,
    rejoin_after=Constant(0.0),
)

_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (PHONE, SENSOR, VEHICLE, LAB)}
_MIXES: dict[str, ProfileMix] = {
    **{name: ProfileMix.single(p) for name, p in _PROFILES.items()},
    "mixed": ProfileMix((PHONE, SENSOR, VEHICLE), (0.5, 0.3, 0.2), name="mixed"),
}


def list_profiles() -> list[str]:
    """Names accepted by :func:`get_mix` (and the CLI's ``--profile``)."""
    return list(_MIXES)


def get_profile(name: str) -> DeviceProfile:
    """A built-in single device profile (``phone``, ``sensor``, ``vehicle``)."""
    try:
        return _PROFILES[name]
    except KeyError:
        hint = " ('mixed' is a mix: use get_mix)" if name in _MIXES else ""
        raise ValueError(
            f"unknown device profile {name!r}{hint}; known: {', '.join(_PROFILES)}"
        ) from None


def parse_mix(spec: str) -> ProfileMix:
    """Parse ``"phone=50,sensor=30,vehicle=20"`` (weights are normalised)."""
    profiles: list[DeviceProfile] = []
    weights: list[float] = []
    for item in spec.replace(" ", "").split(","):
        name, sep, weight = item.partition("=")
        if not sep:
            raise ValueError(f"bad mix entry {item!r} in {spec!r}; expected NAME=WEIGHT")
        try:
            w = float(weight)
        except ValueError as exc:
            raise ValueError(f"non-numeric weight in mix entry {item!r}") from exc
        profiles.append(get_profile(name))
        weights.append(w)
    return ProfileMix(tuple(profiles), tuple(weights), name=spec.replace(" ", ""))


def get_mix(name: str | Mapping[str, float]) -> ProfileMix:
    """A built-in fleet by name (:func:`list_profiles`), a ``"phone=50,sensor=50"`` spec, or a
    ``{profile name: weight}`` mapping."""
    if isinstance(name, Mapping):
        return parse_mix(",".join(f"{k}={v}" for k, v in name.items()))
    if name in _MIXES:
        return _MIXES[name]
    if "=" in name:
        return parse_mix(name)
    raise ValueError(f"unknown fleet profile {name!r}; known: {', '.join(_MIXES)}")
