"""The demo's estimate against FedAvg: a virtual run of the same fleet, both algorithms."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from edgefl.aggregation import Algorithm
from firmware_sim.estimate import BackgroundEstimate, Estimate, VirtualTime, estimate_speedup
from firmware_sim.scenario import SimConfig

# digits: 20 lab devices, a target both algorithms reach in a few hundred updates
_FLEET = SimConfig.build(20, dataset="digits", profile="lab", seed=3)
SMALL = _FLEET.replace(concurrency=8, buffer_size=4, target=0.8, eval_every_updates=8)


def _consistent(fields: dict[str, object], scale: float) -> None:
    detail = fields["estimate"]
    assert isinstance(detail, dict)
    assert detail["available"] is True
    assert detail["error"] is None
    buff, avg = detail["fedbuff_virtual_s"], detail["fedavg_virtual_s"]
    assert isinstance(buff, float)
    assert isinstance(avg, float)
    assert fields["estimated_fedbuff_time_to_target_s"] == buff * scale
    assert fields["estimated_fedavg_time_to_target_s"] == avg * scale
    assert fields["estimated_speedup_vs_fedavg"] == avg / buff
    json.dumps(fields, allow_nan=False)


def test_the_estimate_is_both_virtual_runs_in_the_demo_clock() -> None:
    estimate = estimate_speedup(SMALL, time_scale=0.01)
    assert estimate.error is None
    _consistent(estimate.fields(), 0.01)
    assert estimate.fedbuff_updates is not None
    assert estimate.fedavg_updates is not None
    line = estimate.line(SMALL.stop.target)
    assert line.startswith("estimate from a virtual run of this fleet: FedAvg would need ~")
    assert f"{estimate.speedup:.1f}x" in line


def test_the_background_estimate_equals_the_foreground_one() -> None:
    # two processes at nice 19; deterministic per seed, so the same numbers as in-process
    with BackgroundEstimate(SMALL, time_scale=0.5, max_wall_s=300.0) as background:
        got = background.result()
    want = estimate_speedup(SMALL, time_scale=0.5)
    assert got.error is None
    assert (got.fedbuff_s, got.fedavg_s) == (want.fedbuff_s, want.fedavg_s)
    assert (got.fedbuff_updates, got.fedavg_updates) == (want.fedbuff_updates, want.fedavg_updates)
    _consistent(got.fields(), 0.5)


def test_a_failed_run_makes_the_estimate_unavailable_not_a_crash() -> None:
    # a partition the scenario cannot build: both processes fail, the parent reports it
    broken = SMALL.replace(partition="nonsense:7")
    with BackgroundEstimate(broken, time_scale=0.01, max_wall_s=120.0) as background:
        estimate = background.result()
    assert estimate.speedup is None
    assert estimate.error is not None
    assert estimate.error.startswith("fedbuff: ")
    fields = estimate.fields()
    assert fields["estimated_speedup_vs_fedavg"] is None
    assert fields["estimated_fedavg_time_to_target_s"] is None
    assert fields["estimate"]["available"] is False
    assert estimate.line(0.9).startswith("estimate against FedAvg unavailable: fedbuff: ")


def test_an_unreached_target_or_a_late_run_is_unavailable() -> None:
    reached = VirtualTime(Algorithm.FEDBUFF, 100.0, 400, 420, 1.0)
    unreached = VirtualTime(Algorithm.FEDAVG, None, None, 20_000, 2.0)
    estimate = Estimate.of(0.01, {Algorithm.FEDBUFF: reached, Algorithm.FEDAVG: unreached}, 0.9)
    assert estimate.error == "fedavg did not reach 90% in the virtual run (20000 updates)"
    assert estimate.fields()["estimated_fedbuff_time_to_target_s"] is None
    budget = replace(unreached, received=300, out_of_time=True)
    short = Estimate.of(0.01, {Algorithm.FEDBUFF: reached, Algorithm.FEDAVG: budget}, 0.9)
    assert short.error == "fedavg: out of its wall budget after 300 updates"
    late = Estimate.of(0.01, {Algorithm.FEDBUFF: reached, Algorithm.FEDAVG: "timed out"}, 0.9)
    assert late.error == "fedavg: timed out"
    assert late.speedup is None
    ok = Estimate.of(
        0.01, {Algorithm.FEDBUFF: reached, Algorithm.FEDAVG: replace(unreached, time_s=450.0)}, 0.9
    )
    assert ok.speedup is not None
    assert math.isclose(ok.speedup, 4.5)


def test_the_background_estimate_times_out_as_unavailable() -> None:
    # a budget too small for the runs: the wait ends at the deadline, the processes are ended
    slow = SMALL.replace(target=1.0)
    with BackgroundEstimate(slow, time_scale=0.01, max_wall_s=0.5, grace_s=0.0) as background:
        estimate = background.result()
        children = list(background._children.values())
    assert estimate.speedup is None
    assert estimate.error is not None
    assert not any(child.proc.is_alive() for child in children)


def test_answers_sent_before_the_deadline_count_after_it() -> None:
    # the demo collects the estimate after its live run, possibly past the deadline: the runs
    # that already answered are used, not reported as timed out
    with BackgroundEstimate(SMALL, time_scale=0.01, max_wall_s=300.0, grace_s=-300.0) as bg:
        for child in bg._children.values():
            child.proc.join(timeout=300.0)  # both runs answered and exited
        estimate = bg.result()
    assert estimate.error is None
    _consistent(estimate.fields(), 0.01)
