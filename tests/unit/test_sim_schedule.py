"""Virtual scheduling: event-driven idle waits, and FedAvg at FedBuff's parallelism with
over-selection, a reporting goal and aborted stragglers."""

from __future__ import annotations

import math

from firmware_sim.fleet import Fleet
from firmware_sim.record import Algorithm
from firmware_sim.scenario import SimConfig, build_scenario, reporting_goal
from firmware_sim.virtual import run_virtual

_RUN = {"max_updates": 60, "stop_at_target": False, "eval_every_updates": 30, "seed": 5}
# six vehicles (on ~30 min, off ~60 min) that never drop out nor crash: a device becomes idle
# only when its update arrives, when its window closes mid-training, or when its window opens
# (training takes ~150 s, so windows open and close during the run)
_VEHICLE_FLEET = {"profile": "vehicle", "speed": "const:60", "dropout": 0.0, "crash": 0.0}
VEHICLES = SimConfig.build(6, dataset="digits", concurrency=4, **_VEHICLE_FLEET).replace(**_RUN)


def test_next_available_any_is_the_earliest_window_start_of_a_non_busy_device() -> None:
    fleet = Fleet(30, "vehicle", seed=2)
    t = 5_000.0
    busy = {3, 7}
    expected = min(fleet.next_available(d, t) for d in range(30) if d not in busy)

    got = fleet.next_available_any(t, busy)
    again = fleet.next_available_any(t + 1.0, busy)  # from the cache

    assert got == expected
    assert again == min(fleet.next_available(d, t + 1.0) for d in range(30) if d not in busy)
    assert fleet.next_available_any(t, set(range(30))) == math.inf


def _window_starts(fleet: Fleet, t: float) -> bool:
    """Whether some device's availability window opens exactly at ``t``."""
    return any(
        fleet.is_available(d, t) and not fleet.is_available(d, math.nextafter(t, -math.inf))
        for d in range(fleet.num_devices)
    )


def test_a_waiting_scheduler_starts_a_device_the_moment_one_can_start() -> None:
    # Arrange
    scenario = build_scenario(VEHICLES)

    # Act
    record = run_virtual(VEHICLES, scenario=scenario).record

    # Assert: every start into a slot that was waiting happened at an arrival, when the lease
    # of a device that went away expired, or exactly when a window opened; never on a period
    series = record.slot_series
    assert series is not None
    arrivals = set(record.updates().t.tolist())
    waited = 0
    for i in range(1, len(series.t)):
        if series.waiting[i - 1] > 0 and series.training[i] > series.training[i - 1]:
            t = float(series.t[i])
            waited += 1
            expired = series.lost_lease[i] < series.lost_lease[i - 1]
            assert t in arrivals or expired or _window_starts(scenario.fleet, t), t
    assert waited > 0


def test_waits_are_deterministic_per_seed() -> None:
    first = run_virtual(VEHICLES).record.summary(0.9)
    second = run_virtual(VEHICLES).record.summary(0.9)
    for s in (first, second):
        s.pop("wall_time_s")

    assert first == second


LAB = SimConfig.build(40, profile="lab", dataset="digits", concurrency=13).replace(**_RUN)


def test_fedavg_selects_fedbuffs_concurrency_and_closes_rounds_at_the_reporting_goal() -> None:
    # Arrange: 40 always-on devices, 13 slots: a full cohort every round, goal ceil(13/1.3) = 10
    scenario = build_scenario(LAB)
    fedavg_cfg = LAB.replace(algorithm=Algorithm.FEDAVG)

    # Act
    fedbuff = run_virtual(LAB, scenario=scenario).record
    fedavg = run_virtual(fedavg_cfg, scenario=scenario).record

    # Assert: both start with the same number of devices training at once (FedBuff can exceed
    # it later by the lease slack: a straggler trains on after its lease expired)
    assert fedbuff.slot_series is not None
    assert fedavg.slot_series is not None
    assert int(fedbuff.slot_series.training[0]) == 13
    assert int(fedavg.slot_series.training[0]) == 13
    assert int(fedavg.slot_series.training.max()) == 13
    assert fedavg.slot_series.target == fedbuff.slot_series.target == 13
    # every round stepped with exactly the goal (no dropouts in the lab, deadline at p90)
    util = fedavg.utilisation
    assert util is not None
    assert reporting_goal(13, 1.3) == 10
    assert util["mean_updates_per_round"] <= 10
    s = fedavg.summary(0.9)
    per_version = s["updates_applied"] / max(1, s["model_versions"])
    assert 9.0 <= per_version <= 10.0
    # the over-selected stragglers were aborted (work wasted), never rejected later as stale
    assert util["work_s"]["deadline"] > 0
    assert s["updates_rejected"] == {}


def test_no_overselection_waits_for_the_whole_cohort() -> None:
    cfg = LAB.replace(algorithm=Algorithm.FEDAVG, overselect=1.0, round_deadline_s=1e6)

    record = run_virtual(cfg).record

    util = record.utilisation
    assert util is not None
    assert util["work_s"]["deadline"] == 0.0
    assert util["mean_updates_per_round"] == 13.0


def test_a_silently_lost_device_keeps_its_lease_until_it_expires() -> None:
    # Arrange: half the trainings drop out silently; leases of 30 s
    cfg = LAB.replace(dropout=0.5, lease_s=30.0, max_updates=80)

    # Act
    record = run_virtual(cfg).record

    # Assert: slots were held by lost devices, at most one lease length per dropout
    util = record.utilisation
    assert util is not None
    dropouts = record.summary(0.9)["dropouts"]
    assert dropouts > 0
    assert 0 < util["slot_seconds"]["lost_lease"] <= 30.0 * dropouts
    series = record.slot_series
    assert series is not None
    assert int((series.training + series.lost_lease).max()) <= 13
