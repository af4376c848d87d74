"""Secure aggregation reaches plaintext accuracy within 1 point (issue 20, "Done when").

Both runs share one schedule (:mod:`firmware_sim.secagg_model`): the same fleet, seed, trainings,
arrivals, refusals and versions; they differ only in what the aggregator computes: plaintext
FedBuff (int8 codec, adaptive norm bound, example weights) against the leader's decoded sum (the
device clip ``C = 1``, stochastic rounding on ``Z_(2^32)``, the integer weights of
``--secagg-weight-scale 256`` and the example cap 1000, the norm bound off).

Figures (docs/PRIVACY.md, "Accuracy on the demo workload"): ``late`` is the mean of the last 5
of 20 evaluations; the final single evaluation swings by several points between consecutive
versions of an asynchronous run, in both runs alike.
"""

from __future__ import annotations

import pytest

from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.secagg_model import Comparison, LeaderModel, compare


def _compare(dataset: str, updates: int, seed: int = 0) -> Comparison:
    config = SimConfig.build(
        devices=100,
        dataset=dataset,
        stop_at_target=False,
        max_updates=updates,
        eval_every_updates=updates // 20,
        seed=seed,
    )
    return compare(build_scenario(config), LeaderModel())


def _check(result: Comparison) -> None:
    # the same schedule: what differs is the arithmetic only
    assert result.applied_plain == result.applied_secagg
    assert result.versions_plain == result.versions_secagg
    assert abs(result.late_gap_points) <= 1.0, result
    # "reaches plaintext accuracy within 1 point": the final evaluation alone swings (+2.8
    # points in secure aggregation's favour on seed 1 of the demo workload), so one-sided
    assert result.gap_points >= -1.0, result


def test_secagg_is_within_one_point_of_plaintext_on_digits() -> None:
    """The fast variant (about 7 s): digits, 100 devices, 600 updates (plaintext 94.2%)."""
    result = _compare("digits", 600)
    assert result.accuracy_plain > 0.9  # the model learnt: the comparison means something
    _check(result)


@pytest.mark.heavy
def test_secagg_is_within_one_point_of_plaintext_on_the_demo_workload() -> None:
    """The demo workload (about 45 s): mnist1d, 100 devices, 3,000 updates (plaintext 83.0%)."""
    result = _compare("mnist1d", 3000)
    assert result.accuracy_plain > 0.8
    _check(result)
