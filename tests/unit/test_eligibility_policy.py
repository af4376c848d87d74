"""The eligibility policy: every rule, hysteresis, unknowns, windows, and the monitor."""

from __future__ import annotations

import dataclasses
from datetime import datetime, time
from pathlib import Path

import pytest

from device_agent.eligibility import (
    ClockProbe,
    Decision,
    DeviceSnapshot,
    EligibilityMonitor,
    EligibilityPolicy,
    IneligibleReason,
    MeteredProbe,
    MeteredSource,
    PolicyError,
    ThrottleState,
    TimeWindow,
    TransitionKind,
    collect_snapshot,
    default_probes,
    evaluate,
)

R = IneligibleReason
NOON = datetime(2024, 5, 1, 12, 0)
FINE = DeviceSnapshot(
    monotonic=0.0,
    local_time=NOON,
    load1=0.4,
    load5=0.3,
    load15=0.2,
    cpu_count=4,
    on_mains=True,
    battery_percent=None,
    charging=None,
    max_temp_c=50.0,
    throttle=ThrottleState(0),
    metered=False,
)
POLICY = EligibilityPolicy()


def snap(**changes: object) -> DeviceSnapshot:
    return dataclasses.replace(FINE, **changes)  # type: ignore[arg-type]


def reasons(
    snapshot: DeviceSnapshot, policy: EligibilityPolicy = POLICY, previous: Decision | None = None
) -> tuple[IneligibleReason, ...]:
    return evaluate(policy, snapshot, previous).reasons


def test_fine_device_is_eligible() -> None:
    decision = evaluate(POLICY, FINE, None)
    assert decision == Decision(eligible=True, reasons=(), changed=True)


def test_on_battery() -> None:
    assert reasons(snap(on_mains=False, battery_percent=95.0)) == (R.ON_BATTERY,)


def test_battery_allowed_but_low() -> None:
    policy = EligibilityPolicy(require_mains=False, allow_battery=True, min_battery_percent=80)
    assert reasons(snap(on_mains=False, battery_percent=50.0), policy) == (R.BATTERY_LOW,)
    assert reasons(snap(on_mains=False, battery_percent=85.0), policy) == ()
    assert reasons(snap(on_mains=False, battery_percent=None), policy) == (R.POWER_UNKNOWN,)


def test_battery_level_does_not_matter_on_mains() -> None:
    assert reasons(snap(on_mains=True, battery_percent=5.0, charging=True)) == ()


def test_too_hot() -> None:
    assert reasons(snap(max_temp_c=75.0)) == (R.TOO_HOT,)


def test_temperature_hysteresis() -> None:
    # Arrange
    hot = evaluate(POLICY, snap(max_temp_c=75.0), None)
    fine = evaluate(POLICY, FINE, None)
    between = snap(max_temp_c=67.0)  # resume 65 < 67 <= max 70

    # Act / Assert: between the thresholds the previous state decides
    assert reasons(between, previous=hot) == (R.TOO_HOT,)
    assert reasons(between, previous=fine) == ()
    assert reasons(snap(max_temp_c=65.0), previous=hot) == ()
    assert reasons(snap(max_temp_c=70.0), previous=fine) == ()
    assert reasons(snap(max_temp_c=70.1), previous=fine) == (R.TOO_HOT,)


def test_busy_and_load_hysteresis() -> None:
    busy = evaluate(POLICY, snap(load1=2.4), None)  # 0.6 per cpu
    assert busy.reasons == (R.BUSY,)
    fine = evaluate(POLICY, FINE, None)

    assert reasons(snap(load1=1.6), previous=busy) == (R.BUSY,)  # 0.4: above resume 0.35
    assert reasons(snap(load1=1.6), previous=fine) == ()
    assert reasons(snap(load1=1.4), previous=busy) == ()  # 0.35: resumed


def test_own_training_load_is_not_counted() -> None:
    training = snap(load1=2.4)  # 0.6 per cpu, of which 1 thread is our own training
    assert evaluate(POLICY, training, None, own_load=1.0).reasons == ()
    assert evaluate(POLICY, snap(load1=0.5), None, own_load=1.0).eligible  # clamped at 0


def test_throttled_and_under_voltage() -> None:
    assert reasons(snap(throttle=ThrottleState(0x50005))) == (R.UNDER_VOLTAGE, R.THROTTLED)
    assert reasons(snap(throttle=ThrottleState(0x1))) == (R.UNDER_VOLTAGE,)
    assert reasons(snap(throttle=ThrottleState(0x2))) == (R.THROTTLED,)
    assert reasons(snap(throttle=ThrottleState(0x8))) == (R.THROTTLED,)
    assert reasons(snap(throttle=ThrottleState(0xF0000))) == ()  # only "has occurred" bits
    lenient = EligibilityPolicy(reject_throttled=False, reject_under_voltage=False)
    assert reasons(snap(throttle=ThrottleState(0x50005)), lenient) == ()


def test_metered() -> None:
    assert reasons(snap(metered=True)) == (R.METERED,)
    assert reasons(snap(metered=True), EligibilityPolicy(allow_metered=True)) == ()


@pytest.mark.parametrize(
    ("clock", "inside"),
    [
        (time(22, 0), True),
        (time(23, 59, 59), True),
        (time(0, 0), True),
        (time(5, 59, 59), True),
        (time(6, 0), False),
        (time(12, 0), False),
        (time(21, 59), False),
    ],
)
def test_window_crossing_midnight(clock: time, inside: bool) -> None:
    policy = EligibilityPolicy(windows=(TimeWindow("22:00-06:00"),))
    when = datetime.combine(NOON.date(), clock)
    assert reasons(snap(local_time=when), policy) == (() if inside else (R.OUTSIDE_WINDOW,))


def test_several_windows_and_whole_day() -> None:
    policy = EligibilityPolicy(windows=(TimeWindow("01:00-02:00"), TimeWindow("12:00-12:30")))
    assert reasons(snap(local_time=NOON), policy) == ()
    assert reasons(snap(local_time=NOON.replace(hour=13)), policy) == (R.OUTSIDE_WINDOW,)
    assert TimeWindow("00:00-24:00").contains(time(23, 59))
    assert TimeWindow(" 9:05 - 17:00 ").spec == "09:05-17:00"
    assert not TimeWindow("09:00-17:00").crosses_midnight


@pytest.mark.parametrize(
    "spec", ["22:00", "25:00-01:00", "10:00-10:00", "10:60-11:00", "24:30-01:00", "ab"]
)
def test_bad_windows(spec: str) -> None:
    with pytest.raises(PolicyError) as info:
        TimeWindow(spec)
    assert info.value.field == "windows"


def test_unknown_signals_follow_the_policy() -> None:
    unknown = snap(
        load1=None, cpu_count=None, on_mains=None, max_temp_c=None, throttle=None, metered=None
    )

    default = evaluate(POLICY, unknown, None)
    strict = EligibilityPolicy(
        unknown_temp_ok=False, unknown_throttle_ok=False, unknown_metered_ok=False
    )
    lenient = EligibilityPolicy(unknown_power_ok=True, unknown_load_ok=True)

    assert default.reasons == (R.POWER_UNKNOWN, R.LOAD_UNKNOWN)
    assert reasons(unknown, strict) == (
        R.POWER_UNKNOWN,
        R.LOAD_UNKNOWN,
        R.TEMP_UNKNOWN,
        R.THROTTLE_UNKNOWN,
        R.METERED_UNKNOWN,
    )
    assert reasons(unknown, lenient) == ()


def test_several_reasons_are_reported_in_a_stable_order() -> None:
    bad = snap(on_mains=False, load1=8.0, max_temp_c=80.0, metered=True, throttle=ThrottleState(4))
    assert reasons(bad) == (R.ON_BATTERY, R.TOO_HOT, R.THROTTLED, R.BUSY, R.METERED)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resume_temp_c": 71.0}, "resume_temp_c"),
        ({"resume_load_per_cpu": 0.6}, "resume_load_per_cpu"),
        ({"allow_battery": True}, "allow_battery"),
        ({"min_battery_percent": 101}, "min_battery_percent"),
        ({"max_temp_c": float("nan")}, "max_temp_c"),
        ({"settle_seconds": -1}, "settle_seconds"),
        ({"windows": ("22:00-06:00",)}, "windows"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        EligibilityPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_decision_changed_flag() -> None:
    first = evaluate(POLICY, FINE, None)
    same = evaluate(POLICY, FINE, first)
    flipped = evaluate(POLICY, snap(metered=True), same)
    assert first.changed
    assert not same.changed
    assert flipped.changed
    assert flipped.to_dict() == {"eligible": False, "reasons": ["metered"]}


# --- monitor ---


def test_monitor_emits_transitions_and_keeps_hysteresis() -> None:
    # Arrange
    monitor = EligibilityMonitor(POLICY)

    # Act
    start = monitor.update(snap(monotonic=0.0))
    hot = monitor.update(snap(monotonic=30.0, max_temp_c=72.0))
    cooling = monitor.update(snap(monotonic=60.0, max_temp_c=67.0))
    also_busy = monitor.update(snap(monotonic=90.0, max_temp_c=67.0, load1=4.0))
    cool = monitor.update(snap(monotonic=120.0, max_temp_c=64.0))

    # Assert
    assert [t.kind for t in start.transitions] == [TransitionKind.BECAME_ELIGIBLE]
    assert hot.transitions[0].kind is TransitionKind.BECAME_INELIGIBLE
    assert hot.transitions[0].reasons == (R.TOO_HOT,)
    assert cooling.decision.reasons == (R.TOO_HOT,)
    assert cooling.transitions == ()
    assert also_busy.transitions[0].kind is TransitionKind.REASONS_CHANGED
    assert also_busy.transitions[0].reasons == (R.TOO_HOT, R.BUSY)
    assert cool.decision.eligible
    assert cool.transitions[0].kind is TransitionKind.BECAME_ELIGIBLE
    assert monitor.eligible_for(150.0) == 30.0
    stats = monitor.statistics()
    assert (stats.updates, stats.became_eligible, stats.became_ineligible) == (5, 2, 1)
    assert stats.reason_counts == {"too_hot": 3, "busy": 1}


def test_monitor_first_update_ineligible() -> None:
    update = EligibilityMonitor(POLICY).update(snap(on_mains=False))
    assert update.transitions[0].kind is TransitionKind.BECAME_INELIGIBLE
    assert update.transitions[0].reasons == (R.ON_BATTERY,)


def test_monitor_settle_delay() -> None:
    monitor = EligibilityMonitor(EligibilityPolicy(settle_seconds=60.0))

    first = monitor.update(snap(monotonic=0.0))
    waiting = monitor.update(snap(monotonic=59.0))
    ready = monitor.update(snap(monotonic=60.0))
    unplugged = monitor.update(snap(monotonic=70.0, on_mains=False))
    replugged = monitor.update(snap(monotonic=80.0))

    assert first.decision.reasons == (R.SETTLING,)
    assert not first.decision.eligible
    assert waiting.transitions == ()
    assert ready.decision.eligible
    assert ready.transitions[0].kind is TransitionKind.BECAME_ELIGIBLE
    assert unplugged.decision.reasons == (R.ON_BATTERY,)
    assert replugged.decision.reasons == (R.SETTLING,)  # the delay starts again
    assert replugged.transitions[0].kind is TransitionKind.REASONS_CHANGED


def test_monitor_counts_probe_errors_and_swaps_policy() -> None:
    from device_agent.eligibility import ProbeError

    monitor = EligibilityMonitor(POLICY)
    monitor.update(snap(metered=True, errors=(ProbeError("metered", "boom"),)))
    assert monitor.statistics().probe_error_counts == {"metered": 1}
    monitor.set_policy(EligibilityPolicy(allow_metered=True))
    assert monitor.update(snap(metered=True)).decision.eligible


# --- end to end over fake trees ---


def _tree(root: Path, *, load: str = "0.2", temp_mc: int = 50000, throttled: str = "0") -> None:
    files = {
        "proc/loadavg": f"{load} 0.2 0.2 1/100 42\n",
        "proc/cpuinfo": "processor : 0\nprocessor : 1\n",
        "sys/class/thermal/thermal_zone0/temp": f"{temp_mc}\n",
        "sys/devices/platform/soc/soc:firmware/get_throttled": f"{throttled}\n",
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _battery(root: Path, status: str, capacity: int) -> None:
    base = root / "sys/class/power_supply"
    for name, attrs in {
        "AC": {"type": "Mains", "online": "1" if status == "Charging" else "0"},
        "BAT0": {"type": "Battery", "status": status, "capacity": str(capacity)},
    }.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for key, value in attrs.items():
            (base / name / key).write_text(value + "\n")


def _decide(
    root: Path,
    policy: EligibilityPolicy,
    *,
    metered: MeteredSource = MeteredSource.NO,
    hour: int = 12,
    previous: Decision | None = None,
) -> Decision:
    probes = default_probes(
        root,
        metered=metered,
        clock=ClockProbe(now=lambda: NOON.replace(hour=hour), monotonic=lambda: 1.0),
    )
    return evaluate(policy, collect_snapshot(probes), previous)


def test_fake_tree_scenarios(tmp_path: Path) -> None:
    # Arrange: a healthy 2-core Pi on a wall adapter, trains only at night
    policy = EligibilityPolicy(windows=(TimeWindow("22:00-06:00"),))
    _tree(tmp_path)

    # Act / Assert, one condition at a time
    assert _decide(tmp_path, policy, hour=23).eligible
    assert _decide(tmp_path, policy, hour=12).reasons == (R.OUTSIDE_WINDOW,)
    assert _decide(tmp_path, policy, hour=23, metered=MeteredSource.YES).reasons == (R.METERED,)

    _tree(tmp_path, load="1.5")  # 0.75 per cpu
    busy = _decide(tmp_path, policy, hour=23)
    assert busy.reasons == (R.BUSY,)
    _tree(tmp_path, load="0.8")  # 0.4: between resume and max
    assert _decide(tmp_path, policy, hour=23, previous=busy).reasons == (R.BUSY,)
    _tree(tmp_path, load="0.6")  # 0.3
    assert _decide(tmp_path, policy, hour=23, previous=busy).eligible

    _tree(tmp_path, temp_mc=73500)
    hot = _decide(tmp_path, policy, hour=23)
    assert hot.reasons == (R.TOO_HOT,)
    _tree(tmp_path, temp_mc=66000)
    assert _decide(tmp_path, policy, hour=23, previous=hot).reasons == (R.TOO_HOT,)
    assert _decide(tmp_path, policy, hour=23, previous=None).eligible

    _tree(tmp_path, throttled="50005")
    assert _decide(tmp_path, policy, hour=23).reasons == (R.UNDER_VOLTAGE, R.THROTTLED)
    _tree(tmp_path, throttled="50000")
    assert _decide(tmp_path, policy, hour=23).eligible

    _battery(tmp_path, "Discharging", 90)
    assert _decide(tmp_path, policy, hour=23).reasons == (R.ON_BATTERY,)
    on_battery_ok = dataclasses.replace(policy, require_mains=False, allow_battery=True)
    assert _decide(tmp_path, on_battery_ok, hour=23).eligible
    _battery(tmp_path, "Discharging", 30)
    assert _decide(tmp_path, on_battery_ok, hour=23).reasons == (R.BATTERY_LOW,)
    _battery(tmp_path, "Charging", 30)
    assert _decide(tmp_path, policy, hour=23).eligible


def test_fake_tree_probe_failure_is_handled_per_policy(tmp_path: Path) -> None:
    # Arrange: loadavg missing (probe error) and NetworkManager answering garbage
    _tree(tmp_path)
    (tmp_path / "proc/loadavg").unlink()

    def garbage(argv: object, timeout: float) -> str:
        return "GENERAL.METERED:???\n"

    probes = [*default_probes(tmp_path, metered=MeteredSource.NO), MeteredProbe(runner=garbage)]

    # Act
    snapshot = collect_snapshot(probes)

    # Assert
    assert {e.probe for e in snapshot.errors} == {"load", "metered"}
    assert evaluate(POLICY, snapshot, None).reasons == (R.LOAD_UNKNOWN,)
    assert evaluate(EligibilityPolicy(unknown_load_ok=True), snapshot, None).eligible
