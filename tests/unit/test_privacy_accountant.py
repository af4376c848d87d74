"""The per-device accountant: dp-accounting's numbers, the exact Gaussian bound, the cap."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from edgefl.privacy import AccountantKind, CentralDP, epsilon, participation_cap
from edgefl.privacy.analytic import gaussian_epsilon


def _reference(
    events: int, z: float, delta: float, accountant: dp_accounting.PrivacyAccountant
) -> float:
    """The same question asked of dp-accounting with every event composed one by one."""
    for _ in range(events):
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("k", "z"), [(1, 1.0), (3, 0.8), (10, 2.0), (50, 4.0)])
def test_rdp_epsilon_matches_dp_accounting_composed_event_by_event(k: int, z: float) -> None:
    expected = _reference(k, z, 1e-5, rdp.RdpAccountant())

    got = epsilon(k, z, 1e-5, AccountantKind.RDP)

    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("k", "z"), [(1, 1.0), (4, 1.5)])
def test_pld_epsilon_matches_dp_accounting_and_the_exact_gaussian(k: int, z: float) -> None:
    expected = _reference(k, z, 1e-5, pld.PLDAccountant())
    # k Gaussians of noise z are exactly one Gaussian of noise z / sqrt(k) (mu-GDP)
    exact = gaussian_epsilon(z / math.sqrt(k), 1e-5)

    got = epsilon(k, z, 1e-5, AccountantKind.PLD)

    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(exact, rel=2e-3)


def test_hand_checked_single_gaussian_at_z_1() -> None:
    # Exact (Balle & Wang): 4.3772 at delta 1e-5. Classic RDP bound (Mironov 2017, Prop. 3):
    # min_a a/2 + ln(1/delta)/(a - 1) at a - 1 = sqrt(2 ln 1e5) = 4.7985 gives 5.2985.
    classic = 5.7985 / 2 + math.log(1e5) / 4.7985

    got = epsilon(1, 1.0, 1e-5)

    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-4)
    assert 4.3772 < got < classic
    assert classic == pytest.approx(5.2985, abs=1e-4)


def test_no_participation_costs_nothing() -> None:
    assert epsilon(0, 1.0, 1e-5) == 0.0


@pytest.mark.parametrize(("target", "z"), [(1.0, 5.0), (4.0, 1.5), (8.0, 3.0)])
def test_the_cap_is_the_largest_count_within_the_target(target: float, z: float) -> None:
    cap = participation_cap(target, noise_multiplier=z, delta=1e-5)

    assert cap >= 1
    assert epsilon(cap, z, 1e-5) <= target < epsilon(cap + 1, z, 1e-5)


def test_a_target_below_one_participation_is_refused_by_the_config() -> None:
    assert participation_cap(0.5, noise_multiplier=0.5, delta=1e-5) == 0
    with pytest.raises(ValueError, match="raise the noise multiplier"):
        CentralDP(noise_multiplier=0.5, target_epsilon=0.5)


def test_explicit_cap_and_target_take_the_smaller() -> None:
    by_target = participation_cap(8.0, noise_multiplier=2.0, delta=1e-5)

    assert CentralDP(noise_multiplier=2.0, target_epsilon=8.0).participation_cap == by_target
    assert (
        CentralDP(noise_multiplier=2.0, target_epsilon=8.0, max_participations=3).participation_cap
        == 3
    )
    assert (
        CentralDP(
            noise_multiplier=2.0, target_epsilon=None, max_participations=500
        ).participation_cap
        == 500
    )


def test_results_are_cached() -> None:
    epsilon(7, 1.25, 1e-6)
    hits = epsilon.cache_info().hits

    epsilon(7, 1.25, 1e-6)

    assert epsilon.cache_info().hits == hits + 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"clip_norm": -1.0},
        {"target_epsilon": None},
        {"max_participations": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float | None]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        CentralDP(**kwargs)  # type: ignore[arg-type]
