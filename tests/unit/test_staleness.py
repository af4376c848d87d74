"""Staleness weights s(tau): known values, validation, factory."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.aggregation import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    StalenessKind,
    make_staleness,
)


@pytest.mark.parametrize("tau", [0, 1, 7, 10_000])
def test_constant_is_one(tau: int) -> None:
    assert ConstantStaleness()(tau) == 1.0


@pytest.mark.parametrize(
    ("a", "tau", "expected"),
    [(0.5, 0, 1.0), (0.5, 3, 0.5), (0.5, 8, 1 / 3), (1.0, 1, 0.5), (2.0, 3, 1 / 16), (0.0, 9, 1.0)],
)
def test_polynomial_values(a: float, tau: int, expected: float) -> None:
    assert PolynomialStaleness(a)(tau) == pytest.approx(expected, rel=1e-12)


def test_polynomial_default_is_inverse_sqrt() -> None:
    assert PolynomialStaleness()(15) == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize(
    ("tau", "expected"), [(0, 1.0), (2, 1.0), (3, 0.5), (4, 1 / 3), (12, 1 / 11)]
)
def test_hinge_a1_b2(tau: int, expected: float) -> None:
    assert HingeStaleness(a=1, b=2)(tau) == pytest.approx(expected, rel=1e-12)


def test_hinge_slope() -> None:
    # a = 0.5, b = 0: 1 / (0.5 * 4 + 1) = 1/3 at tau = 4
    assert HingeStaleness(a=0.5, b=0)(4) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "fn", [ConstantStaleness(), PolynomialStaleness(), HingeStaleness()], ids=repr
)
def test_negative_tau_rejected(fn: ConstantStaleness) -> None:
    with pytest.raises(ValueError, match="tau must be >= 0"):
        fn(-1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PolynomialStaleness(a=-0.1),
        lambda: PolynomialStaleness(a=math.inf),
        lambda: HingeStaleness(a=-1.0),
        lambda: HingeStaleness(b=math.nan),
    ],
)
def test_bad_parameters_rejected(build: object) -> None:
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        build()  # type: ignore[operator]


@given(
    a=st.floats(min_value=0.0, max_value=4.0),
    tau=st.integers(min_value=0, max_value=10_000),
)
def test_polynomial_in_unit_interval_and_non_increasing(a: float, tau: int) -> None:
    s = PolynomialStaleness(a)
    assert 0.0 < s(tau + 1) <= s(tau) <= 1.0


def test_factory_builds_each_kind() -> None:
    assert make_staleness("constant") == ConstantStaleness()
    assert make_staleness(StalenessKind.POLYNOMIAL, a=1.0) == PolynomialStaleness(1.0)
    assert make_staleness("hinge", a=2.0, b=3.0) == HingeStaleness(2.0, 3.0)
    assert make_staleness("hinge") == HingeStaleness()


def test_factory_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="constant, polynomial, hinge"):
        make_staleness("exponential")


def test_factory_rejects_parameters_the_kind_does_not_take() -> None:
    with pytest.raises(ValueError, match="does not take b; it accepts a"):
        make_staleness("polynomial", b=1.0)
    with pytest.raises(ValueError, match="no parameters"):
        make_staleness("constant", a=1.0)


def test_factory_validates_values() -> None:
    with pytest.raises(ValueError, match="parameter a"):
        make_staleness("polynomial", a=-2.0)
