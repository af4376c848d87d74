"""Local DP on the device: noise always present, the analytic Gaussian calibration, Laplace,
the running total and the budget check; the scipy-free formula against dp-accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.privacy import LocalDP, LocalMechanism, LocalSpend, may_train
from edgefl.privacy.analytic import gaussian_delta, gaussian_epsilon, gaussian_sigma


@pytest.mark.parametrize("mechanism", list(LocalMechanism))
def test_nothing_leaves_the_device_without_noise(mechanism: LocalMechanism) -> None:
    config = LocalDP(mechanism=mechanism, clip_norm=5000.0, epsilon=8.0)
    x = np.linspace(-1.0, 1.0, 5000, dtype=np.float32)  # L1 norm 2500, L2 norm 41: not clipped

    release = config.privatize(x, np.random.default_rng(0))

    assert release.clip_factor == 1.0
    assert np.all(release.update != x)
    noise = release.update.astype(np.float64) - x
    # Gaussian std sigma; Laplace std b * sqrt(2)
    expected = config.noise_scale * (math.sqrt(2.0) if mechanism is LocalMechanism.LAPLACE else 1)
    assert noise.std() == pytest.approx(expected, rel=0.05)


def test_the_update_is_clipped_before_the_noise() -> None:
    config = LocalDP(clip_norm=1.0, epsilon=1.0)
    x = np.full(400, 3.0, np.float32)  # norm 60

    release = config.privatize(x, np.random.default_rng(1))

    assert release.clip_factor == pytest.approx(1.0 / 60.0)
    mean = float(release.update.mean())
    assert mean == pytest.approx(1.0 / 20.0, abs=5 * config.noise_scale / 20.0)


@pytest.mark.parametrize(("eps", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-3)])
def test_gaussian_noise_is_the_analytic_calibration_for_sensitivity_2c(
    eps: float, delta: float
) -> None:
    config = LocalDP(clip_norm=0.7, epsilon=eps, delta=delta)

    sigma = config.noise_scale

    assert sigma == pytest.approx(2 * 0.7 * dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-8)
    assert dp_accounting.get_epsilon_gaussian(sigma / (2 * 0.7), delta) == pytest.approx(
        eps, rel=1e-7
    )
    classical = 2 * 0.7 * math.sqrt(2 * math.log(1.25 / delta)) / eps
    if eps <= 1.0:  # where the classical bound applies, the analytic one needs less noise
        assert sigma < classical


def test_laplace_scale_is_2c_over_epsilon_with_an_l1_clip() -> None:
    config = LocalDP(mechanism=LocalMechanism.LAPLACE, clip_norm=2.0, epsilon=4.0)
    x = np.array([3.0, -1.0], np.float32)  # L1 norm 4

    release = config.privatize(x, np.random.default_rng(2))

    assert config.noise_scale == pytest.approx(1.0)
    assert release.clip_factor == pytest.approx(0.5)
    assert release.delta == 0.0


def test_the_running_total_composes_gaussians_exactly() -> None:
    config = LocalDP(clip_norm=1.0, epsilon=2.0, delta=1e-5)
    spend = LocalSpend()
    rng = np.random.default_rng(3)
    for _ in range(9):
        spend = spend.add(config.privatize(np.ones(4, np.float32), rng))

    total = spend.epsilon(1e-5)

    # 9 Gaussians of noise s (sensitivity 1 units) are one of noise s / 3
    s = config.noise_scale / config.sensitivity
    assert total == pytest.approx(dp_accounting.get_epsilon_gaussian(s / 3, 1e-5), rel=1e-7)
    assert 2.0 < total < 9 * 2.0
    assert LocalSpend.from_json(spend.to_json()) == spend


def test_may_train_stops_at_the_budget() -> None:
    config = LocalDP(mechanism=LocalMechanism.LAPLACE, epsilon=1.0, budget_epsilon=3.0)
    spend = LocalSpend()
    trained = 0
    while may_train(spend, config):
        spend = spend.add(config.privatize(np.ones(3, np.float32), np.random.default_rng(trained)))
        trained += 1

    assert trained == 3
    assert spend.epsilon(config.delta) == pytest.approx(3.0)
    assert config.may_train(LocalSpend())
    assert LocalDP().may_train(LocalSpend(updates=10**6, laplace_epsilon=1e9))  # no budget


@settings(max_examples=60, deadline=None)
@given(
    sigma=st.floats(0.05, 50.0),
    log_delta=st.floats(-20.0, -1.0),
)
def test_scipy_free_epsilon_matches_dp_accounting(sigma: float, log_delta: float) -> None:
    delta = 10.0**log_delta

    got = gaussian_epsilon(sigma, delta)

    assert got == pytest.approx(
        dp_accounting.get_epsilon_gaussian(sigma, delta), rel=1e-7, abs=1e-9
    )
    if got > 0:
        assert gaussian_delta(got, sigma) == pytest.approx(delta, rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(eps=st.floats(0.05, 40.0), log_delta=st.floats(-20.0, -1.0))
def test_scipy_free_sigma_matches_dp_accounting(eps: float, log_delta: float) -> None:
    delta = 10.0**log_delta

    got = gaussian_sigma(eps, delta)

    assert got == pytest.approx(dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-7)
