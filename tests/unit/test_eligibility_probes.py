"""Probes over fake /proc and /sys trees, parsers, and tolerant snapshot collection."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from device_agent.eligibility import probes
from device_agent.eligibility.snapshot import PowerReading

NOON = datetime(2024, 5, 1, 12, 0)


def put(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def supply(root: Path, name: str, **attrs: str) -> None:
    for key, value in attrs.items():
        put(root, f"sys/class/power_supply/{name}/{key}", value + "\n")


def fixed_runner(output: str, calls: list[Sequence[str]] | None = None) -> probes.CommandRunner:
    def run(argv: Sequence[str], timeout: float) -> str:
        if calls is not None:
            calls.append(tuple(argv))
        return output

    return run


def raising_runner(exc: BaseException) -> probes.CommandRunner:
    def run(argv: Sequence[str], timeout: float) -> str:
        raise exc

    return run


# --- load ---


def test_load_probe_reads_loadavg_and_counts_cpus(tmp_path: Path) -> None:
    put(tmp_path, "proc/loadavg", "1.20 0.80 0.50 2/345 6789\n")
    put(
        tmp_path,
        "proc/cpuinfo",
        "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\n\n" for i in range(4)),
    )

    reading = probes.LoadProbe(tmp_path).read()

    assert (reading.load1, reading.load5, reading.load15) == (1.2, 0.8, 0.5)
    assert reading.cpu_count == 4


def test_load_probe_falls_back_to_os_cpu_count(tmp_path: Path) -> None:
    put(tmp_path, "proc/loadavg", "0.00 0.00 0.00 1/1 1\n")
    assert probes.LoadProbe(tmp_path).read().cpu_count == os.cpu_count()


def test_load_probe_rejects_garbage(tmp_path: Path) -> None:
    put(tmp_path, "proc/loadavg", "nonsense\n")
    with pytest.raises(ValueError, match="malformed"):
        probes.LoadProbe(tmp_path).read()


# --- power ---


def test_no_power_supply_at_all_counts_as_mains(tmp_path: Path) -> None:
    assert probes.PowerProbe(tmp_path).read() == PowerReading(True, None, None)
    assert probes.PowerProbe(tmp_path, assume_mains_without_battery=False).read().on_mains is None


Supplies = dict[str, dict[str, str]]  # power_supply directory name -> its attribute files

#: What the power probe reads from a /sys/class/power_supply tree.
POWER_CASES: dict[str, tuple[Supplies, PowerReading]] = {
    "laptop on battery": (
        {
            "AC": {"type": "Mains", "online": "0"},
            "BAT0": {
                "type": "Battery",
                "status": "Discharging",
                "capacity": "55",
                "scope": "System",
            },
        },
        PowerReading(False, 55.0, False),
    ),
    "laptop charging": (
        {
            "AC": {"type": "Mains", "online": "1"},
            "BAT0": {"type": "Battery", "status": "Charging", "capacity": "40"},
        },
        PowerReading(True, 40.0, True),
    ),
    "battery-only device uses its status": (
        {"battery": {"type": "Battery", "status": "Not charging", "capacity": "80"}},
        PowerReading(True, 80.0, False),
    ),
    "peripheral battery is ignored": (
        {
            "hid-mouse-battery": {
                "type": "Battery",
                "status": "Discharging",
                "capacity": "5",
                "scope": "Device",
            }
        },
        PowerReading(True, None, None),
    ),
    "UPS offline means on battery": (
        {"ups-hat": {"type": "UPS", "online": "0", "capacity": "70"}},
        PowerReading(False, 70.0, None),
    ),
    "battery with unknown status is unknown": (
        {"BAT0": {"type": "Battery", "status": "Unknown", "capacity": "60"}},
        PowerReading(None, 60.0, None),
    ),
}


@pytest.mark.parametrize(("supplies", "expected"), POWER_CASES.values(), ids=POWER_CASES.keys())
def test_power_reading(tmp_path: Path, supplies: Supplies, expected: PowerReading) -> None:
    for name, attrs in supplies.items():
        supply(tmp_path, name, **attrs)
    assert probes.PowerProbe(tmp_path).read() == expected


def test_usb_supply_online_is_external_power(tmp_path: Path) -> None:
    supply(tmp_path, "usb", type="USB", online="1")
    supply(tmp_path, "bat", type="Battery", status="Unknown", capacity="90")
    assert probes.PowerProbe(tmp_path).read().on_mains is True


# --- thermal ---


def test_thermal_takes_the_hottest_plausible_zone(tmp_path: Path) -> None:
    put(tmp_path, "sys/class/thermal/thermal_zone0/temp", "48312\n")
    put(tmp_path, "sys/class/thermal/thermal_zone1/temp", "71250\n")
    put(tmp_path, "sys/class/thermal/thermal_zone2/temp", "-274000\n")  # sensor sentinel
    put(tmp_path, "sys/class/thermal/thermal_zone3/temp", "garbage\n")

    assert probes.ThermalProbe(tmp_path).read().max_temp_c == pytest.approx(71.25)


def test_thermal_without_zones_is_unknown_not_an_error(tmp_path: Path) -> None:
    assert probes.ThermalProbe(tmp_path).read().max_temp_c is None


def test_thermal_with_only_bad_zones_raises(tmp_path: Path) -> None:
    put(tmp_path, "sys/class/thermal/thermal_zone0/temp", "oops\n")
    with pytest.raises(ValueError, match="thermal zones"):
        probes.ThermalProbe(tmp_path).read()


# --- throttling ---


def test_parse_throttled_0x50005() -> None:
    state = probes.parse_throttled("throttled=0x50005\n")

    assert state.raw == 0x50005
    assert state.under_voltage_now
    assert state.throttled_now
    assert not state.arm_freq_capped_now
    assert not state.soft_temp_limit_now
    assert state.under_voltage_occurred
    assert state.throttled_occurred
    assert not state.soft_temp_limit_occurred
    assert state.performance_limited_now


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("throttled=0x0", 0),
        ("50000", 0x50000),
        ("0x80008", 0x80008),
        (" throttled = 0xE0000 ", 0xE0000),
    ],
)
def test_parse_throttled_forms(text: str, raw: int) -> None:
    assert probes.parse_throttled(text).raw == raw


def test_soft_temp_limit_alone_is_performance_limited() -> None:
    state = probes.parse_throttled("throttled=0x8")
    assert state.soft_temp_limit_now
    assert state.performance_limited_now
    assert not probes.parse_throttled("throttled=0x50000").performance_limited_now


@pytest.mark.parametrize(
    "text", ["", "throttled=", "volts=0x1", "throttled=0xZZ", "-1", "1_0", "0x123456789"]
)
def test_parse_throttled_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="get_throttled"):
        probes.parse_throttled(text)


def test_throttle_prefers_firmware_sysfs(tmp_path: Path) -> None:
    put(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "50005\n")
    calls: list[Sequence[str]] = []

    reading = probes.ThrottleProbe(tmp_path, runner=fixed_runner("throttled=0x0", calls)).read()

    assert reading.throttle is not None
    assert reading.throttle.raw == 0x50005
    assert calls == []


def test_throttle_runs_vcgencmd_without_sysfs(tmp_path: Path) -> None:
    calls: list[Sequence[str]] = []
    probe = probes.ThrottleProbe(
        tmp_path, runner=fixed_runner("throttled=0x4\n", calls), timeout=1.5
    )

    reading = probe.read()

    assert reading.throttle is not None
    assert reading.throttle.throttled_now
    assert calls == [("vcgencmd", "get_throttled")]


def test_throttle_without_vcgencmd_is_not_a_pi(tmp_path: Path) -> None:
    probe = probes.ThrottleProbe(tmp_path, runner=raising_runner(FileNotFoundError("vcgencmd")))
    assert probe.read().throttle is None


def test_real_runner_missing_program_and_failures() -> None:
    from device_agent.eligibility import run_command

    with pytest.raises(FileNotFoundError):
        run_command(["edgefl-no-such-program-xyz"], 1.0)
    with pytest.raises(probes.CommandError, match="exited with 3"):
        run_command(["sh", "-c", "echo bad >&2; exit 3"], 5.0)
    with pytest.raises(subprocess.TimeoutExpired):
        run_command(["sleep", "5"], 0.2)
    assert run_command(["sh", "-c", "echo $LC_ALL"], 5.0).strip() == "C"


# --- metered ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GENERAL.METERED:yes\n", True),
        ("GENERAL.METERED:yes (guessed)\n", True),
        ("GENERAL.METERED:no\n", False),
        ("GENERAL.METERED:no (guessed)\n", False),
        ("GENERAL.METERED:unknown\n", None),
        ("", None),
        ("no (guessed)\n", False),  # nmcli -g form
        ("GENERAL.METERED:no (guessed)\n\nGENERAL.METERED:unknown\n\nGENERAL.METERED:yes\n", True),
        ("GENERAL.METERED:unknown\nGENERAL.METERED:no\n", False),
    ],
)
def test_parse_nmcli_metered(text: str, expected: bool | None) -> None:
    assert probes.parse_nmcli_metered(text) is expected


def test_parse_nmcli_metered_rejects_unexpected_values() -> None:
    with pytest.raises(ValueError, match="unexpected nmcli"):
        probes.parse_nmcli_metered("GENERAL.METERED:ja\n")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (probes.MeteredSource.YES, True),
        (probes.MeteredSource.NO, False),
        (probes.MeteredSource.UNKNOWN, None),
    ],
)
def test_metered_from_config(source: probes.MeteredSource, expected: bool | None) -> None:
    probe = probes.MeteredProbe(source, runner=raising_runner(AssertionError("must not run")))
    assert probe.read().metered is expected


def test_metered_from_networkmanager(tmp_path: Path) -> None:
    calls: list[Sequence[str]] = []
    probe = probes.MeteredProbe(
        device="wlan0", runner=fixed_runner("GENERAL.METERED:yes (guessed)\n", calls)
    )

    assert probe.read().metered is True
    assert calls == [("nmcli", "-t", "-f", "GENERAL.METERED", "dev", "show", "wlan0")]


def test_metered_without_networkmanager_is_unknown() -> None:
    probe = probes.MeteredProbe(runner=raising_runner(FileNotFoundError("nmcli")))
    assert probe.read().metered is None


# --- collection ---


def test_collect_snapshot_over_a_fake_pi(tmp_path: Path) -> None:
    # Arrange
    put(tmp_path, "proc/loadavg", "0.40 0.30 0.20 1/100 42\n")
    put(tmp_path, "proc/cpuinfo", "processor : 0\nprocessor : 1\nprocessor : 2\nprocessor : 3\n")
    put(tmp_path, "sys/class/thermal/thermal_zone0/temp", "52000\n")
    put(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "0\n")
    fleet_probes = probes.default_probes(
        tmp_path,
        metered=probes.MeteredSource.NO,
        runner=raising_runner(AssertionError("no commands expected")),
        clock=probes.ClockProbe(now=lambda: NOON, monotonic=lambda: 123.0),
    )

    # Act
    snap = probes.collect_snapshot(fleet_probes)

    # Assert
    assert snap.errors == ()
    assert snap.monotonic == 123.0
    assert snap.local_time == NOON
    assert snap.load1 == 0.4
    assert snap.cpu_count == 4
    assert snap.load_per_cpu() == pytest.approx(0.1)
    assert snap.on_mains is True
    assert snap.battery_percent is None
    assert snap.max_temp_c == 52.0
    assert snap.throttle is not None
    assert snap.throttle.raw == 0
    assert snap.metered is False
    assert snap.to_dict()["throttled"] == "0x0"


def test_failing_probes_leave_unknowns_and_errors(tmp_path: Path) -> None:
    # Arrange: no /proc/loadavg, a throttle command that times out, nmcli printing garbage
    timeout = subprocess.TimeoutExpired(["vcgencmd"], 2.0)
    fleet_probes: list[probes.Probe] = [
        probes.LoadProbe(tmp_path),
        probes.PowerProbe(tmp_path),
        probes.ThrottleProbe(tmp_path, runner=raising_runner(timeout)),
        probes.MeteredProbe(runner=fixed_runner("GENERAL.METERED:???\n")),
        probes.ClockProbe(now=lambda: NOON, monotonic=lambda: 5.0),
    ]

    # Act
    snap = probes.collect_snapshot(fleet_probes)

    # Assert
    assert {e.probe for e in snap.errors} == {"load", "throttle", "metered"}
    assert snap.load1 is None
    assert snap.cpu_count is None
    assert snap.throttle is None
    assert snap.metered is None
    assert snap.on_mains is True  # the healthy probe still counts
    assert any("TimeoutExpired" in e.error for e in snap.errors)


def test_collect_snapshot_uses_real_clock_without_clock_probe() -> None:
    snap = probes.collect_snapshot([])
    assert snap.local_time.tzinfo is not None
    assert snap.monotonic > 0
