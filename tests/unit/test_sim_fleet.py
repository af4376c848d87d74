"""The lazy fleet: construction cost, timing, availability, dropouts and idle sampling."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from firmware_sim.fleet import Fate, Fleet
from firmware_sim.profiles import AvailabilityModel, Constant, DeviceProfile, get_profile

HOUR = 3600.0


def _phone_zero_phase() -> DeviceProfile:
    phone = get_profile("phone")
    return replace(phone, availability=replace(phone.availability, phase_spread_hours=0.0))


def _sensor(**overrides: object) -> DeviceProfile:
    return replace(get_profile("sensor"), **overrides)  # type: ignore[arg-type]


def test_fleet_of_100k_devices_constructs_fast_with_numpy_attributes() -> None:
    # Act
    fleet = Fleet(100_000, "mixed", seed=1)

    # Assert: one numpy column per attribute (no per-device Python objects)
    for arr in (
        fleet.profile_index,
        fleet.speed,
        fleet.upload_bandwidth,
        fleet.download_bandwidth,
        fleet.latency,
        fleet.phase_hours,
        fleet.initially_on,
    ):
        assert isinstance(arr, np.ndarray)
        assert arr.shape == (100_000,)
    assert (fleet.upload_bandwidth > 0).all()
    counts = fleet.counts_by_profile()
    assert counts["phone"] / 100_000 == pytest.approx(0.5, abs=0.01)
    assert counts["sensor"] / 100_000 == pytest.approx(0.3, abs=0.01)
    assert counts["vehicle"] / 100_000 == pytest.approx(0.2, abs=0.01)


def test_fleet_is_deterministic_for_a_seed() -> None:
    a = Fleet(1000, "mixed", seed=7)
    b = Fleet(1000, "mixed", seed=7)
    c = Fleet(1000, "mixed", seed=8)

    assert np.array_equal(a.speed, b.speed)
    assert np.array_equal(a.profile_index, b.profile_index)
    assert [a.is_available(d, 5 * HOUR) for d in range(1000)] == [
        b.is_available(d, 5 * HOUR) for d in range(1000)
    ]
    assert not np.array_equal(a.speed, c.speed)


def test_fleet_accepts_profile_objects_and_rejects_bad_sizes() -> None:
    fleet = Fleet(10, get_profile("sensor"), seed=0)

    assert fleet.counts_by_profile() == {"sensor": 10}
    with pytest.raises(ValueError, match="num_devices"):
        Fleet(0, "phone")
    with pytest.raises(IndexError):
        fleet.upload_duration(10, 100)
    with pytest.raises(IndexError):
        fleet.is_available(-1, 0.0)


def test_sample_idle_devices_is_o_k_not_o_n() -> None:
    # Arrange
    small = Fleet(10_000, "mixed", seed=3)
    large = Fleet(100_000, "mixed", seed=3)
    rng = np.random.default_rng(0)
    k = 50

    # Act
    picked_large = large.sample_idle_devices(k, 2 * HOUR, rng, busy=set())
    small.sample_idle_devices(k, 2 * HOUR, rng, busy=set())

    # Assert
    assert len(picked_large) == k
    assert large.draws_total <= 64 * k + 256
    # the same number of draws (within noise) for a fleet 10x larger
    assert large.draws_total < 3 * small.draws_total + 50


def test_sample_idle_devices_returns_distinct_available_non_busy_devices() -> None:
    # Arrange
    fleet = Fleet(5000, "mixed", seed=4)
    rng = np.random.default_rng(1)
    busy = set(range(0, 5000, 2))
    t = 14 * HOUR

    # Act
    picked = fleet.sample_idle_devices(100, t, rng, busy)

    # Assert
    assert len(picked) == 100
    assert len(set(picked)) == 100
    assert not busy.intersection(picked)
    assert all(fleet.is_available(d, t) for d in picked)


def test_sample_idle_devices_finds_the_last_idle_devices_of_a_small_fleet() -> None:
    fleet = Fleet(50, "sensor", seed=0)
    busy = set(range(45))

    picked = fleet.sample_idle_devices(10, 0.0, np.random.default_rng(0), busy)

    assert sorted(picked) == [45, 46, 47, 48, 49]
    assert fleet.sample_idle_devices(0, 0.0, np.random.default_rng(0), set()) == []


def test_upload_time_is_latency_plus_bytes_over_bandwidth() -> None:
    # Arrange
    fleet = Fleet(100, "mixed", seed=5)
    d = 17

    # Act
    t0 = fleet.upload_duration(d, 0)
    t1 = fleet.upload_duration(d, 100_000)
    t4 = fleet.upload_duration(d, 400_000)

    # Assert
    assert t0 == pytest.approx(fleet.latency[d])
    assert t1 - t0 == pytest.approx(100_000 / fleet.upload_bandwidth[d])
    assert t4 - t0 == pytest.approx(4 * (t1 - t0))
    assert fleet.download_duration(d, 100_000) - fleet.download_duration(d, 0) == pytest.approx(
        100_000 / fleet.download_bandwidth[d]
    )


def test_compression_shows_up_as_time_on_slow_links() -> None:
    fleet = Fleet(1, "sensor", seed=0)

    fp32 = fleet.upload_duration(0, 4 * 4298)
    int8 = fleet.upload_duration(0, 4298)

    assert fp32 > 2 * int8


def test_training_duration_scales_with_work_and_jitter_has_mean_one() -> None:
    # Arrange
    exact = Fleet(3, _sensor(jitter_sigma=0.0), seed=0)
    jittery = Fleet(1, _sensor(jitter_sigma=0.5), seed=0)
    rng = np.random.default_rng(0)

    # Act
    base = exact.training_duration(0, 100, 1, rng)
    double = exact.training_duration(0, 200, 1, rng)
    twice = exact.training_duration(0, 100, 2, rng)
    runs = [jittery.training_duration(0, 100, 1, rng) for _ in range(20_000)]

    # Assert
    assert base == pytest.approx(exact.speed[0])
    assert double == pytest.approx(2 * base)
    assert twice == pytest.approx(2 * base)
    assert np.mean(runs) == pytest.approx(jittery.speed[0], rel=0.03)
    assert np.std(runs) > 0.3 * jittery.speed[0]


def test_phone_is_mostly_available_at_3am_and_rarely_at_3pm() -> None:
    # Arrange
    fleet = Fleet(5000, _phone_zero_phase(), seed=6)
    hourly = fleet.profiles[0].availability.hourly

    # Act
    night = np.mean([fleet.is_available(d, 3 * HOUR) for d in range(5000)])
    day = np.mean([fleet.is_available(d, 15 * HOUR) for d in range(5000)])
    next_night = np.mean([fleet.is_available(d, 27 * HOUR) for d in range(5000)])

    # Assert
    assert night == pytest.approx(hourly[3], abs=0.03)
    assert day == pytest.approx(hourly[15], abs=0.03)
    assert next_night == pytest.approx(hourly[3], abs=0.03)
    assert night > 5 * day


def test_phone_availability_is_one_contiguous_window_per_night() -> None:
    fleet = Fleet(300, _phone_zero_phase(), seed=9)

    for d in range(300):
        # one local cycle runs from noon to noon
        hours = [fleet.is_available(d, (12 + h + 0.5) * HOUR) for h in range(24)]
        switches = sum(a != b for a, b in itertools.pairwise(hours))
        assert switches <= 2


def test_next_available_lands_on_the_first_available_instant() -> None:
    # Arrange
    fleet = Fleet(200, _phone_zero_phase(), seed=2)
    t = 15 * HOUR
    unavailable = [d for d in range(200) if not fleet.is_available(d, t)]

    for d in unavailable[:50]:
        # Act
        start = fleet.next_available(d, t)
        end = fleet.available_until(d, start)

        # Assert
        assert start > t
        assert fleet.is_available(d, start)
        assert not fleet.is_available(d, math.nextafter(start, 0.0))
        assert end > start
        assert not fleet.is_available(d, end)


def test_sensors_are_always_available() -> None:
    fleet = Fleet(10, "sensor", seed=0)

    assert all(fleet.is_available(d, t) for d in range(10) for t in (0.0, 15 * HOUR, 1e7))
    assert fleet.next_available(3, 123.0) == 123.0
    assert fleet.available_until(3, 123.0) == math.inf


def test_vehicles_are_on_a_third_of_the_time_and_consistent_in_any_query_order() -> None:
    # Arrange
    profile = replace(get_profile("vehicle"), availability=AvailabilityModel.bursty(1800.0, 3600.0))
    fleet = Fleet(4000, profile, seed=3)
    fresh = Fleet(4000, profile, seed=3)

    # Act
    late = np.mean([fleet.is_available(d, 50 * HOUR) for d in range(4000)])
    early_after_late = [fleet.is_available(d, 10.0) for d in range(200)]
    early_fresh = [fresh.is_available(d, 10.0) for d in range(200)]
    one_device = [fleet.is_available(0, t) for t in np.arange(0.0, 400 * HOUR, 60.0)]

    # Assert
    assert late == pytest.approx(1 / 3, abs=0.03)
    assert early_after_late == early_fresh
    assert np.mean(one_device) == pytest.approx(1 / 3, abs=0.08)


def test_vehicle_next_available_is_the_end_of_the_off_period() -> None:
    fleet = Fleet(100, "vehicle", seed=11)
    t = 7 * HOUR
    off = [d for d in range(100) if not fleet.is_available(d, t)]

    for d in off[:20]:
        start = fleet.next_available(d, t)
        assert start > t
        assert fleet.is_available(d, start)
        assert not fleet.is_available(d, (t + start) / 2)
        assert fleet.available_until(d, start) > start


def test_dropout_rate_matches_configured_probability() -> None:
    # Arrange
    fleet = Fleet(100, get_profile("sensor").with_overrides(dropout=0.3, crash=0.1), seed=0)
    rng = np.random.default_rng(5)
    n = 20_000

    # Act
    drops = np.mean([fleet.will_drop(d % 100, rng) for d in range(n)])
    fates = [fleet.training_fate(d % 100, rng) for d in range(n)]
    points = [fleet.drop_point(0, rng) for _ in range(2000)]

    # Assert
    assert drops == pytest.approx(0.3, abs=0.015)
    kinds = [f.kind for f in fates]
    assert kinds.count(Fate.DROPPED) / n == pytest.approx(0.3, abs=0.015)
    assert kinds.count(Fate.CRASHED) / n == pytest.approx(0.7 * 0.1, abs=0.01)
    crashed = [f for f in fates if f.kind is Fate.CRASHED]
    assert all(f.restart_after_s == 30.0 for f in crashed)  # the sensor's watchdog reboot
    assert all(0.0 < f.at_fraction < 1.0 for f in fates if f.kind is not Fate.COMPLETED)
    fractions = [p for p in points if p is not None]
    assert len(fractions) / 2000 == pytest.approx(0.3, abs=0.04)
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.05)


def test_no_dropout_means_every_training_completes() -> None:
    fleet = Fleet(10, _sensor(dropout=0.0, crash=0.0, compute=Constant(1.0)), seed=0)
    rng = np.random.default_rng(0)

    fates = {fleet.training_fate(d, rng).kind for d in range(10) for _ in range(100)}

    assert fates == {Fate.COMPLETED}


def test_estimate_available_is_exact_for_small_fleets_and_close_for_large() -> None:
    rng = np.random.default_rng(0)
    small = Fleet(500, _phone_zero_phase(), seed=1)
    large = Fleet(100_000, _phone_zero_phase(), seed=1)

    exact = small.estimate_available(3 * HOUR, rng)
    estimate = large.estimate_available(3 * HOUR, rng, sample_size=4000)

    assert exact == sum(small.is_available(d, 3 * HOUR) for d in range(500))
    assert estimate / 100_000 == pytest.approx(0.9, abs=0.03)
