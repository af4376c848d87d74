"""Local differential privacy in the simulators (``edgefl sim --dp local:...``).

Both simulators run the product's mechanism, :class:`edgefl.privacy.LocalDP` (clip to ``C``,
add Gaussian or Laplace noise, docs/PRIVACY.md "Local DP on the device"):

* live mode gives every agent ``[privacy] dp = "local:..."``, so the real agent noises its
  updates, keeps its ledger and refuses to train past its budget; the run's figures come from
  the agents' ``statistics().local_privacy`` (:func:`histogram_totals`, summed over worker
  processes as counts, then :func:`summarize`);
* virtual mode applies the same sans-IO mechanism to each simulated device's update before it
  is encoded (:class:`FleetLocalDP`): a per-device :class:`~edgefl.privacy.LocalSpend`, the
  budget check before every further training (an exhausted device is never drawn again, as an
  agent past its budget stops checking in), noise from a generator seeded by
  ``(seed, device, update number)`` so a run is the same for a seed whatever the order.

A device's ε after ``n`` updates under one setting is the composition the ledger computes
(:meth:`LocalSpend.charged` ``n`` times, then :meth:`LocalSpend.epsilon` at ``delta``), so the
summary's ε follows from each device's update count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from edgefl.privacy.local import LocalDP, LocalSpend, may_train
from firmware_sim.seeding import MASK64

__all__ = [
    "HISTOGRAM_PREFIX",
    "REFUSED_KEY",
    "FleetLocalDP",
    "LocalDpSummary",
    "epsilon_after",
    "from_totals",
    "histogram_totals",
    "summarize",
]

HISTOGRAM_PREFIX: Final = "local_dp_updates:"
"""Agent-total keys ``local_dp_updates:N``: how many agents released ``N`` noised updates."""
REFUSED_KEY: Final = "local_dp_refused"
"""Agent-total key: trainings the agents refused for their budget."""
_STREAM_LOCAL_DP: Final = 0x10CA1D9


def epsilon_after(config: LocalDP, updates: int) -> float:
    """A device's total ε (at ``config.delta``) after ``updates`` releases under ``config``."""
    if updates <= 0:
        return 0.0
    mu = config.sensitivity / config.noise_scale
    return LocalSpend().charged(config.mechanism, config.epsilon, mu, updates).epsilon(config.delta)


@dataclass(frozen=True)
class LocalDpSummary:
    """The fleet's local DP at the end of a run. ``epsilon_mean`` is over every device of the
    fleet (a device that sent nothing spent 0); ``exhausted``: devices whose budget allows no
    further update; ``refused``: trainings refused for the budget (live: the agents' count;
    virtual: exhausted devices are never drawn, so 0)."""

    mechanism: str
    epsilon_per_update: float
    delta: float
    clip_norm: float
    noise_scale: float
    budget: float | None
    devices: int
    updates: int
    epsilon_max: float
    epsilon_mean: float
    exhausted: int
    refused: int

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "epsilon_per_update": self.epsilon_per_update,
            "delta": self.delta,
            "clip_norm": self.clip_norm,
            "noise_scale": self.noise_scale,
            "budget": self.budget,
            "devices": self.devices,
            "updates": self.updates,
            "epsilon_max": self.epsilon_max,
            "epsilon_mean": self.epsilon_mean,
            "exhausted": self.exhausted,
            "refused": self.refused,
        }


def summarize(
    config: LocalDP, updates_per_device: Mapping[int, int], devices: int, refused: int = 0
) -> LocalDpSummary:
    """The summary from a histogram ``{updates: number of devices}`` over a fleet of
    ``devices`` (devices missing from it released nothing)."""
    counts = {n: k for n, k in updates_per_device.items() if k > 0 and n > 0}
    eps = {n: epsilon_after(config, n) for n in counts}
    exhausted = 0
    if config.budget_epsilon is not None:
        exhausted = sum(k for n, k in counts.items() if not _admits(config, n))
    return LocalDpSummary(
        mechanism=str(config.mechanism),
        epsilon_per_update=config.epsilon,
        delta=0.0 if config.mechanism == "laplace" else config.delta,
        clip_norm=config.clip_norm,
        noise_scale=config.noise_scale,
        budget=config.budget_epsilon,
        devices=devices,
        updates=sum(n * k for n, k in counts.items()),
        epsilon_max=max(eps.values(), default=0.0),
        epsilon_mean=sum(eps[n] * k for n, k in counts.items()) / max(1, devices),
        exhausted=exhausted,
        refused=refused,
    )


def _admits(config: LocalDP, updates: int) -> bool:
    mu = config.sensitivity / config.noise_scale
    spent = LocalSpend().charged(config.mechanism, config.epsilon, mu, updates)
    return may_train(spent, config)


def histogram_totals(updates: Iterable[int], refused: int) -> dict[str, int]:
    """Agent totals (summable over processes): ``local_dp_updates:N`` counts and the refusals."""
    out: Counter[str] = Counter(f"{HISTOGRAM_PREFIX}{n}" for n in updates)
    out[REFUSED_KEY] += refused
    return dict(out)


def from_totals(config: LocalDP, totals: Mapping[str, int], devices: int) -> LocalDpSummary:
    """:func:`summarize` from agent totals made by :func:`histogram_totals`."""
    hist = {
        int(k[len(HISTOGRAM_PREFIX) :]): v
        for k, v in totals.items()
        if k.startswith(HISTOGRAM_PREFIX)
    }
    return summarize(config, hist, devices, totals.get(REFUSED_KEY, 0))


@dataclass(eq=False)
class FleetLocalDP:
    """Virtual mode's devices under local DP: the ledger per device and the noise.

    :meth:`release` is the agent's privatize + charge for ``device``'s update; a device whose
    budget then allows no further update joins :attr:`exhausted` (the scheduler's draws leave it
    out)."""

    config: LocalDP
    seed: int
    spent: dict[int, LocalSpend] = field(default_factory=dict)
    exhausted: set[int] = field(default_factory=set)

    def release(self, device: int, delta: NDArray[np.float32]) -> NDArray[np.float32]:
        """The clipped, noised update ``device`` sends instead of ``delta``."""
        spend = self.spent.get(device, LocalSpend())
        rng = np.random.default_rng([self.seed & MASK64, _STREAM_LOCAL_DP, device, spend.updates])
        out = self.config.privatize(delta, rng)
        spend = self.spent[device] = spend.add(out)
        if not may_train(spend, self.config):
            self.exhausted.add(device)
        return out.update

    def epsilon(self, device: int) -> float:
        """``device``'s total ε so far (its ledger's composition)."""
        return self.spent.get(device, LocalSpend()).epsilon(self.config.delta)

    def summary(self, devices: int) -> LocalDpSummary:
        hist = Counter(s.updates for s in self.spent.values())
        return summarize(self.config, hist, devices)
