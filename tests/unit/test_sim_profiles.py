"""Distributions, availability models and built-in device profiles of the fleet simulator."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from firmware_sim.profiles import (
    AvailabilityKind,
    AvailabilityModel,
    Constant,
    DeviceProfile,
    Distribution,
    Exponential,
    HalfNormal,
    LogNormal,
    ProfileMix,
    Uniform,
    get_mix,
    get_profile,
    list_profiles,
    parse_distribution,
    parse_mix,
)

N = 200_000


@pytest.mark.parametrize(
    ("dist", "mean", "var"),
    [
        (HalfNormal(2.0), 2.0 * math.sqrt(2 / math.pi), 4.0 * (1 - 2 / math.pi)),
        (LogNormal(0.0, 0.5), math.exp(0.125), (math.exp(0.25) - 1) * math.exp(0.25)),
        (Constant(3.0), 3.0, 0.0),
        (Uniform(1.0, 3.0), 2.0, 4.0 / 12.0),
        (Exponential(5.0), 5.0, 25.0),
    ],
    ids=str,
)
def test_distribution_samples_have_expected_moments(
    dist: Distribution, mean: float, var: float
) -> None:
    # Arrange
    rng = np.random.default_rng(0)

    # Act
    x = dist.sample(rng, N)

    # Assert
    assert x.shape == (N,)
    assert x.dtype == np.float64
    assert (x >= 0).all()
    assert x.mean() == pytest.approx(mean, rel=0.02)
    assert x.var() == pytest.approx(var, rel=0.05, abs=1e-12)


def test_lognormal_from_median_has_that_median() -> None:
    dist = LogNormal.from_median(4.0, 0.3)

    x = dist.sample(np.random.default_rng(1), N)

    assert float(np.median(x)) == pytest.approx(4.0, rel=0.02)


def test_distributions_satisfy_protocol_and_are_frozen() -> None:
    dist = HalfNormal(1.0)

    assert isinstance(dist, Distribution)
    with pytest.raises(FrozenInstanceError):
        dist.scale = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("lognormal:0,1", LogNormal(0.0, 1.0)),
        ("halfnormal:1", HalfNormal(1.0)),
        ("const:2", Constant(2.0)),
        ("constant:2.5", Constant(2.5)),
        ("uniform:1,3", Uniform(1.0, 3.0)),
        ("exp:60", Exponential(60.0)),
        ("  LogNormal : -0.5 , 0.25 ", LogNormal(-0.5, 0.25)),
    ],
)
def test_parse_distribution_accepts_valid_specs(spec: str, expected: Distribution) -> None:
    parsed = parse_distribution(spec)

    assert parsed == expected
    assert parse_distribution(str(parsed)) == expected  # str() round-trips


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "lognormal",
        "lognormal:0",
        "lognormal:0,1,2",
        "lognormal:a,b",
        "lognormal:0,-1",
        "gamma:1,2",
        "halfnormal:-1",
        "halfnormal:0",
        "uniform:3,1",
        "const:nan",
        "const:-1",
        "exp:0",
        "halfnormal:inf",
    ],
)
def test_parse_distribution_rejects_invalid_specs(spec: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by spec
        parse_distribution(spec)


def test_builtin_profiles_are_listed_and_retrievable() -> None:
    names = list_profiles()

    assert names == ["phone", "sensor", "vehicle", "lab", "mixed"]
    assert get_profile("phone").availability.kind is AvailabilityKind.DIURNAL
    assert get_profile("sensor").availability.kind is AvailabilityKind.ALWAYS
    assert get_profile("vehicle").availability.kind is AvailabilityKind.BURSTY


def test_sensors_are_slower_than_phones() -> None:
    rng = np.random.default_rng(2)

    phone = get_profile("phone").compute.sample(rng, 10_000)
    sensor = get_profile("sensor").compute.sample(rng, 10_000)

    assert np.median(sensor) > 4 * np.median(phone)


def test_get_profile_rejects_unknown_and_mix_names() -> None:
    with pytest.raises(ValueError, match="unknown device profile"):
        get_profile("toaster")
    with pytest.raises(ValueError, match="get_mix"):
        get_profile("mixed")


def test_mixed_fleet_is_50_30_20() -> None:
    mix = get_mix("mixed")

    assert mix.describe() == pytest.approx({"phone": 0.5, "sensor": 0.3, "vehicle": 0.2})


def test_single_profile_name_is_a_one_entry_mix() -> None:
    mix = get_mix("sensor")

    assert mix.profiles == (get_profile("sensor"),)
    assert mix.weights == (1.0,)


def test_parse_mix_normalises_weights() -> None:
    mix = parse_mix("phone=3, sensor=1")

    assert mix.describe() == pytest.approx({"phone": 0.75, "sensor": 0.25})
    assert get_mix({"vehicle": 2.0, "phone": 2.0}).describe() == pytest.approx(
        {"vehicle": 0.5, "phone": 0.5}
    )


@pytest.mark.parametrize("spec", ["phone", "phone=x", "toaster=1", "phone=-1", "phone=0"])
def test_parse_mix_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_mix(spec)


def test_overrides_apply_to_every_profile_and_leave_builtins_alone() -> None:
    # Arrange
    mix = get_mix("mixed")

    # Act
    overridden = mix.with_overrides(dropout=0.3, compute="lognormal:0,1")

    # Assert
    assert all(p.dropout == 0.3 for p in overridden.profiles)
    assert all(p.compute == LogNormal(0.0, 1.0) for p in overridden.profiles)
    assert overridden.weights == mix.weights
    assert get_profile("phone").dropout == 0.10


def test_override_none_keeps_values() -> None:
    phone = get_profile("phone")

    same = phone.with_overrides()

    assert same == phone


@pytest.mark.parametrize(
    "kwargs",
    [{"dropout": 1.5}, {"dropout": -0.1}, {"crash": 2.0}, {"jitter_sigma": -1.0}, {"name": ""}],
)
def test_device_profile_validates_fields(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "name": "x",
        "compute": Constant(1.0),
        "upload_bandwidth": Constant(1e3),
        "download_bandwidth": Constant(1e3),
        "latency": Constant(0.1),
    }

    with pytest.raises(ValueError):  # noqa: PT011
        DeviceProfile(**{**base, **kwargs})  # type: ignore[arg-type]


def test_profile_mix_validates_weights() -> None:
    phone = get_profile("phone")

    with pytest.raises(ValueError, match="weight"):
        ProfileMix((phone,), (0.0,))
    with pytest.raises(ValueError, match="weight"):
        ProfileMix((phone,), (1.0, 2.0))


def test_availability_models_validate_and_report_mean_fraction() -> None:
    with pytest.raises(ValueError, match="24 hourly"):
        AvailabilityModel.diurnal([0.5] * 23)
    with pytest.raises(ValueError, match="bursty"):
        AvailabilityModel.bursty(0.0, 10.0)
    with pytest.raises(ValueError, match="> 0 in some hour"):
        AvailabilityModel.diurnal([0.0] * 24)

    assert AvailabilityModel.always().mean_fraction == 1.0
    assert AvailabilityModel.bursty(10.0, 30.0).mean_fraction == pytest.approx(0.25)
    assert AvailabilityModel.diurnal([0.5] * 24).mean_fraction == pytest.approx(0.5)
