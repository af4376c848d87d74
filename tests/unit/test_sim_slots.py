"""Where the time of a run went: the slot ledger, the bottleneck verdict and the starved warning."""

from __future__ import annotations

import pytest

from firmware_sim.record import Algorithm, Mode, RunRecord
from firmware_sim.report import starvation_warnings, summary_lines, summary_object
from firmware_sim.scenario import SimConfig
from firmware_sim.slots import SlotLedger, Work, starved, verdict
from firmware_sim.virtual import run_virtual


def test_the_ledger_integrates_slot_states_piecewise_between_observations() -> None:
    # Arrange: 4 slots; 0-10 s: 2 training, 2 waiting; 10-30 s: 3 training, 1 lost lease
    ledger = SlotLedger(target=4)

    # Act
    ledger.observe(0.0, training=2, waiting=2)
    ledger.observe(10.0, training=3, lost_lease=1)
    ledger.work(Work.APPLIED, 30.0)
    ledger.work(Work.DROPOUT, 10.0)
    util = ledger.summary(30.0)

    # Assert: slot-seconds 20 + 60 training, 20 waiting, 20 lost, 0 barrier (of 120)
    assert util["slot_seconds"] == {
        "training": 80.0,
        "lost_lease": 20.0,
        "waiting_for_device": 20.0,
        "round_barrier": 0.0,
    }
    assert util["mean_training"] == pytest.approx(80.0 / 30.0)
    assert util["slot_time"]["waiting_for_device"] == pytest.approx(20.0 / 120.0)
    assert util["work_lost_fraction"] == pytest.approx(10.0 / 40.0)
    series = ledger.series()
    assert series.t.tolist() == [0.0, 10.0]
    assert series.training.tolist() == [2, 3]
    assert series.waiting.tolist() == [2, 0]


def test_the_unfilled_rest_of_a_cohort_is_round_barrier_time() -> None:
    ledger = SlotLedger(target=5)
    ledger.observe(0.0, training=5)
    ledger.observe(4.0, training=1)  # four members done, one straggler

    util = ledger.summary(10.0)

    assert util["slot_seconds"]["round_barrier"] == pytest.approx(4 * 6.0)
    assert util["slot_seconds"]["training"] == pytest.approx(20.0 + 6.0)


def _util(training: float, waiting: float, barrier: float, lost: float = 0.0) -> dict[str, object]:
    ledger = SlotLedger(target=20)
    ledger.observe(0.0, training=round(20 * training), waiting=round(20 * waiting))
    ledger.work(Work.APPLIED, 100.0 * (1 - lost))
    ledger.work(Work.DROPOUT, 100.0 * lost)
    util = ledger.summary(100.0)
    assert util["slot_time"]["round_barrier"] == pytest.approx(barrier)
    return util


def test_the_verdict_names_the_largest_loss() -> None:
    starved_run = _util(training=0.25, waiting=0.75, barrier=0.0)
    barrier_run = _util(training=0.5, waiting=0.1, barrier=0.4)
    healthy_run = _util(training=0.95, waiting=0.05, barrier=0.0)
    wasteful_run = _util(training=0.95, waiting=0.05, barrier=0.0, lost=0.5)

    assert verdict(starved_run, cohorts=False) == (
        "availability-bound: 5.0 of 20 slots filled on average; add devices or lower concurrency"
    )
    assert verdict(barrier_run, cohorts=True).startswith("straggler-bound: 40% of slot time")
    assert verdict(healthy_run, cohorts=False).startswith("compute-bound: 19.0 of 20 slots")
    assert verdict(wasteful_run, cohorts=False).startswith(
        "waste-bound: 50% of device work lost (dropout 50%)"
    )
    assert starved(starved_run)
    assert not starved(barrier_run)


def _record(algorithm: Algorithm, waiting: int) -> RunRecord:
    record = RunRecord({}, Mode.VIRTUAL, algorithm, devices=10)
    record.eval(10.0, 1, 0.95, updates_applied=5)
    ledger = SlotLedger(target=4)
    ledger.observe(0.0, training=4 - waiting, waiting=waiting)
    util = ledger.summary(10.0)
    record.set_utilisation(util, verdict(util, cohorts=False), ledger.series())
    return record


def test_compare_warns_about_the_starved_run_only() -> None:
    starved_avg = _record(Algorithm.FEDAVG, waiting=3)
    healthy_buff = _record(Algorithm.FEDBUFF, waiting=0)

    summary = summary_object([healthy_buff, starved_avg], 0.9)
    lines = summary_lines([healthy_buff, starved_avg], 0.9, summary)

    assert len(summary["warnings"]) == 1
    assert summary["warnings"][0].startswith("fedavg was starved (availability-bound: 1.0 of 4")
    assert summary["runs"]["fedavg"]["bottleneck"].startswith("availability-bound")
    assert any(line.startswith("warning: fedavg was starved") for line in lines)
    assert starvation_warnings([starved_avg]) == []


# digits, 20 lab devices: always on, so a small fleet with big concurrency is starved by
# construction (40 slots, 20 devices), and a fleet with few slots is not
_SMALL_RUN = {"max_updates": 120, "stop_at_target": False, "eval_every_updates": 40}
SMALL = SimConfig.build(20, dataset="digits", profile="lab", buffer_size=4, target=0.85, seed=3)
SMALL = SMALL.replace(**_SMALL_RUN)


def test_a_run_with_more_slots_than_devices_is_availability_bound() -> None:
    result = run_virtual(SMALL.replace(concurrency=40))
    s = result.record.summary(SMALL.stop.target)

    util = s["utilisation"]
    assert util["target_slots"] == 40
    assert util["mean_training"] <= 20.0 + 1e-9
    assert util["slot_time"]["waiting_for_device"] >= 0.5 - 1e-9
    assert s["bottleneck"].startswith("availability-bound")


def test_fedavg_records_rounds_barrier_time_and_straggler_work() -> None:
    cfg = SMALL.replace(algorithm=Algorithm.FEDAVG, concurrency=8, dropout=0.2)
    s = run_virtual(cfg).record.summary(cfg.stop.target)

    util = s["utilisation"]
    assert util["rounds"] > 0
    assert util["mean_round_s"] > 0
    assert util["slot_seconds"]["round_barrier"] > 0
    # over-selection 1.3: 8 selected, goal 7, so a round closes with stragglers still training
    assert util["work_s"]["deadline"] > 0
    assert util["work_s"]["dropout"] > 0
