"""Secure aggregation in the virtual simulator: what the leader decodes, on the same schedule.

The two roles (``edgefl aggregator --role leader|helper``) compute, for a buffer of updates
``x_i`` with public integer weights ``w_i``, the decoded sum ``Σ_i w_i q_i / s`` (the masks
cancel exactly in the ring: ``tests/unit/test_secagg_roles.py`` checks it bit for bit,
``tests/integration/test_secagg_broker.py`` through both services), then step with
``Σ_i w_i q_i / (s · Σ_i w_i)`` under ``mean``. :class:`SecAggSimulator` runs that arithmetic
in the virtual simulator (:mod:`firmware_sim.virtual`), with nothing left out:

* **the device**: the update clipped to ``C`` and encoded with stochastic rounding on the ring
  (:func:`edgefl.secagg.encode`, the scale :meth:`RingSpec.fit` picks for K and ``W``), decoded
  as ``q / s``, sent as the fp32 codec does (lossless);
* **the weights**: the leader's integer weights (:func:`edgefl.secagg.weights.leader_weight`:
  example weight over the cap times staleness, times ``W``, rounded, in ``[1, W]``), given to
  the real FedBuff core as its only weight (examples weighting, uncapped, constant staleness,
  so the core's weight *is* ``w_i`` and ``mean`` divides by ``Σ w_i``: the leader's step);
* **the defences**: the norm bound off (no role sees an update), the device-side clip on;
* **the upload**: ``b / 8`` bytes per parameter plus :data:`SHARE_OVERHEAD` (the two
  envelopes), and the automatic lease sized for it.

:class:`SameScheduleSimulator` is the plaintext aggregator (its own codec and defences) on the
schedule of the shares: its uploads are timed as the shares are. Upload sizes and lease are then
the same in both runs, no event depends on model values, so both runs see the same trainings,
arrivals, refusals and versions, and their accuracies differ only by the secure-aggregation
arithmetic. :func:`compare` runs both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgefl.aggregation import ExampleWeighting, StalenessKind, StalenessSetting, make_core
from edgefl.secagg import RingSpec, encode
from edgefl.secagg.weights import leader_weight
from firmware_sim.scenario import Scenario
from firmware_sim.seeding import MASK64
from firmware_sim.virtual import VirtualSimulator

__all__ = [
    "SHARE_OVERHEAD",
    "TAIL_EVALS",
    "Comparison",
    "LeaderModel",
    "SameScheduleSimulator",
    "SecAggSimulator",
    "accuracies",
    "compare",
    "share_bytes",
]

SHARE_OVERHEAD = 403
"""Bytes of one update's two envelopes beyond the masked vector (headers, the 80-byte sealed
seed): 399,695 - 4 · 99,823 in bench/secagg.py."""

_STREAM_RING = 0x5EC


@dataclass(frozen=True)
class LeaderModel:
    """The leader's settings that change the arithmetic: ring width, clip ``C``, weight scale
    ``W`` and example weighting (``examples`` needs a ``cap``: the leader refuses it without)."""

    bits: int = 32
    clip_norm: float = 1.0
    weight_scale: int = 256
    weighting: ExampleWeighting = ExampleWeighting.EXAMPLES
    example_cap: int | None = 1000

    def ring(self, buffer_size: int) -> RingSpec:
        return RingSpec.fit(
            bits=self.bits,
            clip_norm=self.clip_norm,
            buffer_size=buffer_size,
            w_max=self.weight_scale,
        )


def share_bytes(num_params: int, bits: int = 32) -> int:
    """Bytes on the wire of one update under secure aggregation (both envelopes)."""
    return num_params * bits // 8 + SHARE_OVERHEAD


class SameScheduleSimulator(VirtualSimulator):
    """The plaintext simulator whose uploads take as long as secure aggregation's shares."""

    def __init__(self, scenario: Scenario, *, bits: int = 32, **kwargs: Any) -> None:
        super().__init__(scenario, **kwargs)
        self.share_size = share_bytes(self.num_params, bits)

    def _upload_guess(self) -> int:
        return self.share_size

    def _encode(self, tr: Any) -> None:
        super()._encode(tr)
        tr.nbytes = self.share_size


class SecAggSimulator(SameScheduleSimulator):
    """The virtual simulator whose aggregator is the secure-aggregation leader (module doc)."""

    def __init__(self, scenario: Scenario, leader: LeaderModel, **kwargs: Any) -> None:
        cfg = scenario.config
        self.leader = leader
        self.spec = leader.ring(cfg.aggregation.buffer_size)
        self.staleness = cfg.aggregation.settings().staleness.weight()
        self.clipped = 0
        self.encoded = 0
        own = replace(scenario, config=cfg.replace(codec="fp32", norm_bound="off"))
        super().__init__(own, bits=leader.bits, **kwargs)
        # the core weighs an update by its num_examples alone: the leader's integer weight
        settings = replace(
            self.cfg.aggregation_settings(),
            staleness=StalenessSetting(StalenessKind.CONSTANT),
            example_weighting=ExampleWeighting.EXAMPLES,
            example_cap=None,
        )
        self.core = make_core(settings.core_config(), own.initial_weights)

    def _encode(self, tr: Any) -> None:
        delta = tr.delta
        rng = np.random.default_rng([self.cfg.seed & MASK64, _STREAM_RING, tr.tid])
        if float(np.linalg.norm(delta)) > self.spec.clip_norm:
            self.clipped += 1
        codes = encode(delta, self.spec, rng).view(self.spec.signed).astype(np.float64)
        tr.delta = (codes / self.spec.scale).astype(np.float32)
        self.encoded += 1
        super()._encode(tr)  # fp32: lossless

    def _on_arrive(self, tr: Any) -> None:
        tau = self.version - tr.base_version
        max_staleness = self.cfg.aggregation.max_staleness
        if max_staleness is None or tau <= max_staleness:  # else the core refuses it (stale)
            tr.num_examples = leader_weight(
                tr.num_examples,
                tau,
                weighting=self.leader.weighting,
                cap=self.leader.example_cap,
                staleness=self.staleness,
                weight_scale=self.leader.weight_scale,
            )
        super()._on_arrive(tr)

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / max(1, self.encoded)


TAIL_EVALS = 5
"""Evaluations averaged for the late accuracy of a run (:attr:`Comparison.late_plain`): the held-out
accuracy of consecutive versions of an asynchronous run swings by several points (up to 25 on
the demo workload), so one evaluation is a noisy figure for a comparison."""


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` measured: final held-out accuracy (the last evaluation), late
    accuracy (the mean of the last :data:`TAIL_EVALS` evaluations), what was applied, the
    versions, and the share of updates the device clipped to ``C``."""

    accuracy_plain: float
    accuracy_secagg: float
    late_plain: float
    late_secagg: float
    applied_plain: int
    applied_secagg: int
    versions_plain: int
    versions_secagg: int
    clipped_fraction: float
    scale: int

    @property
    def gap_points(self) -> float:
        """Secure aggregation minus plaintext, final accuracy, in points."""
        return 100.0 * (self.accuracy_secagg - self.accuracy_plain)

    @property
    def late_gap_points(self) -> float:
        """Secure aggregation minus plaintext, late accuracy, in points."""
        return 100.0 * (self.late_secagg - self.late_plain)


def accuracies(sim: VirtualSimulator) -> tuple[float, float]:
    """``(final, late)`` held-out accuracy of a finished run."""
    acc = sim.record.evals().accuracy
    return float(acc[-1]), float(np.mean(acc[-TAIL_EVALS:]))


def compare(scenario: Scenario, leader: LeaderModel) -> Comparison:
    """Plaintext (the scenario's aggregator) and secure aggregation on the same schedule."""
    plain = SameScheduleSimulator(scenario, bits=leader.bits, label="plain")
    plain.run()
    secagg = SecAggSimulator(scenario, leader, label="secagg")
    secagg.run()
    (final_p, late_p), (final_s, late_s) = accuracies(plain), accuracies(secagg)
    return Comparison(
        accuracy_plain=final_p,
        accuracy_secagg=final_s,
        late_plain=late_p,
        late_secagg=late_s,
        applied_plain=plain.tally.applied,
        applied_secagg=secagg.tally.applied,
        versions_plain=plain.version,
        versions_secagg=secagg.version,
        clipped_fraction=secagg.clipped_fraction,
        scale=secagg.spec.scale,
    )
