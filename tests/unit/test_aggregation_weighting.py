"""Example weights and the combined update weight."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.aggregation import (
    ExampleWeighting,
    HingeStaleness,
    PolynomialStaleness,
    example_weight,
    update_weight,
)
from edgefl.aggregation.weighting import check_example_cap
from edgefl.errors import RejectReason, UpdateRejected


def test_equal_weighting_ignores_count() -> None:
    assert example_weight(7, ExampleWeighting.EQUAL, cap=None) == 1.0
    assert example_weight(10_000, ExampleWeighting.EQUAL, cap=10) == 1.0


def test_examples_weighting_caps() -> None:
    assert example_weight(7, ExampleWeighting.EXAMPLES, cap=1000) == 7.0
    assert example_weight(5000, ExampleWeighting.EXAMPLES, cap=1000) == 1000.0
    assert example_weight(5000, ExampleWeighting.EXAMPLES, cap=None) == 5000.0


def test_numpy_integer_counts_are_accepted() -> None:
    assert example_weight(np.int64(12), ExampleWeighting.EXAMPLES, cap=None) == 12.0  # type: ignore[arg-type]


@pytest.mark.parametrize("weighting", list(ExampleWeighting))
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "12"])
def test_bad_counts_rejected(weighting: ExampleWeighting, bad: object) -> None:
    with pytest.raises(UpdateRejected) as info:
        example_weight(bad, weighting, cap=1000)  # type: ignore[arg-type]
    assert info.value.reason is RejectReason.BAD_EXAMPLES


def test_update_weight_is_product() -> None:
    w = update_weight(
        40, 3, weighting=ExampleWeighting.EXAMPLES, cap=1000, staleness=PolynomialStaleness(0.5)
    )
    assert (w.example, w.staleness, w.total) == (40.0, 0.5, 20.0)


def test_update_weight_hinge() -> None:
    w = update_weight(
        3, 4, weighting=ExampleWeighting.EQUAL, cap=None, staleness=HingeStaleness(1, 2)
    )
    assert w.total == pytest.approx(1 / 3)


def test_broken_staleness_function_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="need > 0"):
        update_weight(1, 0, weighting=ExampleWeighting.EQUAL, cap=None, staleness=lambda tau: 0.0)


@pytest.mark.parametrize("cap", [0, -1, 2.0, True])
def test_bad_cap(cap: object) -> None:
    with pytest.raises(ValueError, match="example cap"):
        check_example_cap(cap)  # type: ignore[arg-type]
