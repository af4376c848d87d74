"""Probes: read the device's conditions from Linux interfaces under a configurable root.

Every probe reads below ``root`` (default ``/``) so tests and the fleet simulator point it at a
fake tree. Commands (``vcgencmd``, ``nmcli``) go through an injectable :data:`CommandRunner`.
Probes block (file reads, a subprocess with a timeout): an asyncio caller runs
:func:`collect_snapshot` in a worker thread (``asyncio.to_thread``).

Signals and their sources:

=============  =========================================================================
load           ``<root>/proc/loadavg``; CPU count from ``<root>/proc/cpuinfo``, else
               ``os.cpu_count()``
power          ``<root>/sys/class/power_supply/*/{type,online,capacity,status,scope}``.
               **No supply at all counts as mains** (a Raspberry Pi on a wall adapter exposes
               none). Batteries with ``scope = Device`` (mice, keyboards) are ignored.
temperature    max over ``<root>/sys/class/thermal/thermal_zone*/temp`` (millidegrees C);
               unreadable or implausible zones are skipped; no zone at all = unknown
throttling     Raspberry Pi firmware: ``<root>/sys/devices/platform/soc/soc:firmware/
               get_throttled`` (hex) when present, else ``vcgencmd get_throttled``; neither
               present = not a Pi (unknown, no error)
metered        configured value, or NetworkManager: ``nmcli -t -f GENERAL.METERED dev show``
local time     injectable clock
=============  =========================================================================
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

from device_agent.eligibility.snapshot import (
    ClockReading,
    DeviceSnapshot,
    LoadReading,
    MeteredReading,
    PowerReading,
    ProbeError,
    Reading,
    ThermalReading,
    ThrottleReading,
    ThrottleState,
)

__all__ = [
    "DEFAULT_THROTTLE_SYSFS",
    "ClockProbe",
    "CommandError",
    "CommandRunner",
    "LoadProbe",
    "MeteredProbe",
    "MeteredSource",
    "PowerProbe",
    "Probe",
    "ThermalProbe",
    "ThrottleProbe",
    "collect_snapshot",
    "default_probes",
    "parse_nmcli_metered",
    "parse_throttled",
    "run_command",
]

CommandRunner = Callable[[Sequence[str], float], str]
"""``runner(argv, timeout_seconds) -> stdout``. Raises ``FileNotFoundError`` when the program does
not exist (the probe then reports the signal as unavailable), anything else on failure."""

DEFAULT_THROTTLE_SYSFS: tuple[str, ...] = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/soc@*/*firmware*/get_throttled",  # Pi 5 device-tree naming [unverified]
)
"""Glob patterns (relative to the probe root) of the firmware's ``get_throttled`` sysfs file."""


class CommandError(RuntimeError):
    """A probe command that exited non-zero."""


def run_command(argv: Sequence[str], timeout: float) -> str:
    """Default :data:`CommandRunner`: run ``argv`` with ``LC_ALL=C`` (untranslated output) and
    without ``NOTIFY_SOCKET`` in its environment; raise :class:`CommandError` on non-zero exit and
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["LC_ALL"] = "C"
    completed = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip()[:200]
        raise CommandError(f"{argv[0]} exited with {completed.returncode}: {detail}")
    return completed.stdout


class Probe(Protocol):
    """Reads one group of signals. May raise: :func:`collect_snapshot` records the error."""

    @property
    def name(self) -> str: ...

    def read(self) -> Reading: ...


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


# --- load ----------------------------------------------------------------------------------------

_PROCESSOR_RE = re.compile(r"^processor\s*:", re.MULTILINE)


class LoadProbe:
    name = "load"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def read(self) -> LoadReading:
        fields = _read_text(self.root / "proc/loadavg").split()
        if len(fields) < 3:
            raise ValueError(f"malformed /proc/loadavg: {' '.join(fields)!r}")
        load1, load5, load15 = (float(x) for x in fields[:3])
        for value in (load1, load5, load15):
            if not 0.0 <= value < 1e6:
                raise ValueError(f"implausible load average {value!r}")
        return LoadReading(load1, load5, load15, self._cpu_count())

    def _cpu_count(self) -> int | None:
        try:
            count = len(_PROCESSOR_RE.findall((self.root / "proc/cpuinfo").read_text()))
        except OSError:
            count = 0
        return count or os.cpu_count()


# --- power ---------------------------------------------------------------------------------------

_EXTERNAL_ON_STATUSES = frozenset({"Charging", "Full", "Not charging"})


class PowerProbe:
    """Scan ``power_supply``. Result:

    * ``on_mains`` True when an external supply (Mains, USB, Wireless, ...) or a UPS reports
      ``online = 1`` or a battery reports Charging / Full / Not charging; also True when there is
      no battery at all, including no supply at all (nothing but an external source can be
      powering the device; ``assume_mains_without_battery=False`` makes that case unknown); False
      when a battery discharges, a UPS is offline or every external supply is offline; otherwise
      None.
    * ``battery_percent``: the lowest ``capacity`` among system batteries and UPSes.
    * ``charging``: any battery Charging; False when batteries report other known statuses.
    """

    name = "power"

    def __init__(self, root: Path = Path("/"), *, assume_mains_without_battery: bool = True):
        self.root = root
        self.assume_mains_without_battery = assume_mains_without_battery

    def read(self) -> PowerReading:
        base = self.root / "sys/class/power_supply"
        supplies = sorted(base.iterdir()) if base.is_dir() else []
        externals: list[bool] = []  # online flags of Mains/USB/Wireless/... supplies
        ups_online: list[bool] = []
        statuses: list[str] = []
        capacities: list[float] = []
        batteries = 0  # system batteries and UPSes
        for supply in supplies:
            kind = _optional_text(supply / "type")
            if kind is None:
                continue
            if kind in ("Battery", "UPS"):
                if kind == "Battery" and _optional_text(supply / "scope") == "Device":
                    continue  # a peripheral's battery (mouse, keyboard), not ours
                batteries += 1
                status = _optional_text(supply / "status")
                if status is not None:
                    statuses.append(status)
                if kind == "UPS" and (online := _optional_int(supply / "online")) is not None:
                    ups_online.append(online == 1)
                capacity = _optional_int(supply / "capacity")
                if capacity is not None and 0 <= capacity <= 100:
                    capacities.append(float(capacity))
            elif (online := _optional_int(supply / "online")) is not None:
                externals.append(online == 1)

        on_mains: bool | None
        if any(externals) or any(ups_online) or _EXTERNAL_ON_STATUSES.intersection(statuses):
            on_mains = True
        elif not batteries:
            # Nothing but an external source can be powering the device (e.g. a Pi on a wall
            # adapter, which exposes no power_supply at all).
            on_mains = True if self.assume_mains_without_battery else None
        elif "Discharging" in statuses or ups_online or externals:
            on_mains = False  # battery discharging, UPS offline, or every adapter offline
        else:
            on_mains = None

        known = [s for s in statuses if s in _EXTERNAL_ON_STATUSES or s == "Discharging"]
        charging = True if "Charging" in statuses else (False if known else None)
        battery = min(capacities) if capacities else None
        return PowerReading(on_mains=on_mains, battery_percent=battery, charging=charging)


def _optional_text(path: Path) -> str | None:
    try:
        return _read_text(path)
    except OSError:
        return None


def _optional_int(path: Path) -> int | None:
    text = _optional_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


# --- temperature ---------------------------------------------------------------------------------


class ThermalProbe:
    name = "thermal"

    def __init__(
        self, root: Path = Path("/"), *, min_valid_c: float = -40.0, max_valid_c: float = 150.0
    ) -> None:
        self.root = root
        self.min_valid_c = min_valid_c
        self.max_valid_c = max_valid_c

    def read(self) -> ThermalReading:
        zones = sorted((self.root / "sys/class/thermal").glob("thermal_zone*/temp"))
        temps: list[float] = []
        for zone in zones:
            millideg = _optional_int(zone)  # some zones fail reads (EIO/ENODATA) when idle
            if millideg is None:
                continue
            celsius = millideg / 1000.0
            if self.min_valid_c <= celsius <= self.max_valid_c:
                temps.append(celsius)
        if zones and not temps:
            raise ValueError(f"none of {len(zones)} thermal zones gave a plausible temperature")
        return ThermalReading(max(temps) if temps else None)


# --- Raspberry Pi throttling ---------------------------------------------------------------------

_HEX_RE = re.compile(r"^(?:0[xX])?[0-9a-fA-F]{1,8}$")


def parse_throttled(text: str) -> ThrottleState:
    """Parse ``vcgencmd get_throttled`` output (``throttled=0x50005``) or the firmware sysfs file
    (``50005``). Raises ``ValueError`` on anything else."""
    value = text.strip()
    if "=" in value:
        key, _, value = value.partition("=")
        if key.strip() != "throttled":
            raise ValueError(f"unexpected get_throttled output {text.strip()!r}")
        value = value.strip()
    if not _HEX_RE.match(value):
        raise ValueError(f"unexpected get_throttled output {text.strip()!r}")
    return ThrottleState(int(value, 16))


class ThrottleProbe:
    name = "throttle"

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        command: Sequence[str] = ("vcgencmd", "get_throttled"),
        timeout: float = 2.0,
        runner: CommandRunner = run_command,
        sysfs_paths: Sequence[str] = DEFAULT_THROTTLE_SYSFS,
    ) -> None:
        self.root = root
        self.command = tuple(command)
        self.timeout = timeout
        self.runner = runner
        self.sysfs_paths = tuple(sysfs_paths)

    def read(self) -> ThrottleReading:
        for pattern in self.sysfs_paths:
            for path in sorted(self.root.glob(pattern)):
                if path.is_file():
                    return ThrottleReading(parse_throttled(_read_text(path)))
        if not self.command:
            return ThrottleReading(None)
        try:
            output = self.runner(self.command, self.timeout)
        except FileNotFoundError:
            return ThrottleReading(None)  # no vcgencmd: not a Raspberry Pi
        return ThrottleReading(parse_throttled(output))


# --- metered network -----------------------------------------------------------------------------


class MeteredSource(StrEnum):
    """Where the metered flag comes from (config key ``probes.metered``)."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"
    NETWORKMANAGER = "networkmanager"


_NM_METERED = {
    "yes": True,
    "yes (guessed)": True,  # libnm: treat GUESS_YES like YES
    "no": False,
    "no (guessed)": False,
    "unknown": None,
}


def parse_nmcli_metered(text: str) -> bool | None:
    """Parse ``nmcli -t -f GENERAL.METERED dev show`` (one ``GENERAL.METERED:<value>`` line per
    device) or ``nmcli -g`` output (bare values). Metered if any device is metered, unmetered if
    any is not (and none is), else unknown. Raises ``ValueError`` on an unexpected value."""
    values: list[bool | None] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        _, sep, value = line.partition(":")
        value = (value if sep else line).strip().lower()
        if value not in _NM_METERED:
            raise ValueError(f"unexpected nmcli metered value {line!r}")
        values.append(_NM_METERED[value])
    if True in values:
        return True
    if False in values:
        return False
    return None


class MeteredProbe:
    name = "metered"

    def __init__(
        self,
        source: MeteredSource = MeteredSource.NETWORKMANAGER,
        *,
        device: str | None = None,
        command: Sequence[str] = ("nmcli",),
        timeout: float = 2.0,
        runner: CommandRunner = run_command,
    ) -> None:
        self.source = source
        self.device = device
        self.command = tuple(command)
        self.timeout = timeout
        self.runner = runner

    def read(self) -> MeteredReading:
        if self.source is MeteredSource.YES:
            return MeteredReading(True)
        if self.source is MeteredSource.NO:
            return MeteredReading(False)
        if self.source is MeteredSource.UNKNOWN:
            return MeteredReading(None)
        argv = [*self.command, "-t", "-f", "GENERAL.METERED", "dev", "show"]
        if self.device:
            argv.append(self.device)
        try:
            output = self.runner(argv, self.timeout)
        except FileNotFoundError:
            return MeteredReading(None)  # no NetworkManager
        return MeteredReading(parse_nmcli_metered(output))


# --- clock ---------------------------------------------------------------------------------------


def _local_now() -> datetime:
    return datetime.now().astimezone()


class ClockProbe:
    name = "clock"

    def __init__(
        self,
        now: Callable[[], datetime] = _local_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.now = now
        self.monotonic = monotonic

    def read(self) -> ClockReading:
        return ClockReading(local_time=self.now(), monotonic=self.monotonic())


# --- collection ----------------------------------------------------------------------------------


_READING_KINDS = (
    LoadReading,
    PowerReading,
    ThermalReading,
    ThrottleReading,
    MeteredReading,
    ClockReading,
)
_R = TypeVar("_R")


def _reading(found: dict[type, object], kind: type[_R]) -> _R | None:
    """The reading of ``kind`` among ``found`` (None if no probe gave one)."""
    reading = found.get(kind)
    return reading if isinstance(reading, kind) else None


def collect_snapshot(probes: Iterable[Probe]) -> DeviceSnapshot:
    """Run every probe once and fold the readings into a snapshot. Never raises for a probe's
    sake: a failing probe leaves its signals unknown (None) and adds a :class:`ProbeError`. Without
    a clock probe (or if it fails) the real clock is used."""
    found: dict[type, object] = {}
    errors: list[ProbeError] = []
    for probe in probes:
        name = getattr(probe, "name", type(probe).__name__)
        try:
            reading = probe.read()
        except Exception as exc:  # a probe must never take the agent down
            errors.append(ProbeError(name, f"{type(exc).__name__}: {exc}"))
            continue
        kind = next((k for k in _READING_KINDS if isinstance(reading, k)), None)
        if kind is None:
            errors.append(ProbeError(name, f"TypeError: unknown reading {type(reading).__name__}"))
        else:
            found[kind] = reading  # the last reading of a kind wins
    load, power = _reading(found, LoadReading), _reading(found, PowerReading)
    thermal, throttle = _reading(found, ThermalReading), _reading(found, ThrottleReading)
    metered, clock = _reading(found, MeteredReading), _reading(found, ClockReading)
    if clock is None:
        clock = ClockReading(local_time=_local_now(), monotonic=time.monotonic())
    return DeviceSnapshot(
        monotonic=clock.monotonic,
        local_time=clock.local_time,
        load1=load.load1 if load else None,
        load5=load.load5 if load else None,
        load15=load.load15 if load else None,
        cpu_count=load.cpu_count if load else None,
        on_mains=power.on_mains if power else None,
        battery_percent=power.battery_percent if power else None,
        charging=power.charging if power else None,
        max_temp_c=thermal.max_temp_c if thermal else None,
        throttle=throttle.throttle if throttle else None,
        metered=metered.metered if metered else None,
        errors=tuple(errors),
    )


def default_probes(
    root: Path = Path("/"),
    *,
    metered: MeteredSource = MeteredSource.NETWORKMANAGER,
    nmcli_device: str | None = None,
    throttle: bool = True,
    command_timeout: float = 2.0,
    runner: CommandRunner = run_command,
    clock: ClockProbe | None = None,
) -> list[Probe]:
    """The standard probe set (what the agent uses; the simulator swaps in its own)."""
    probes: list[Probe] = [LoadProbe(root), PowerProbe(root), ThermalProbe(root)]
    if throttle:
        probes.append(ThrottleProbe(root, timeout=command_timeout, runner=runner))
    probes.append(
        MeteredProbe(metered, device=nmcli_device, timeout=command_timeout, runner=runner)
    )
    probes.append(clock if clock is not None else ClockProbe())
    return probes
