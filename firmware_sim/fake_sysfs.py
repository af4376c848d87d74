"""A fake ``/proc`` + ``/sys`` tree for real agents whose probes read a configurable root.

The device agent's probes (``device_agent/eligibility/probes.py``) read ``<root>/proc/loadavg``,
``/proc/cpuinfo``, ``/sys/class/power_supply``, ``/sys/class/thermal`` and the Raspberry Pi
firmware's ``get_throttled``. :func:`write_fake_sysfs` writes such a tree, so a real agent (in a
test, a benchmark, the chaos harness) sees a device that is plugged in or on battery, cool or
hot, idle or busy; writing it again with other values is how a test unplugs a device.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_fake_sysfs"]


def write_fake_sysfs(
    root: Path,
    *,
    mains: bool = True,
    temp_c: float = 40.0,
    load: float = 0.0,
    cpus: int = 2,
    throttled: int | None = None,
) -> None:
    """``cpus`` CPUs with a 1-minute load of ``load``; an AC adapter (online iff ``mains``) and
    a battery at 90% (charging iff ``mains``); one thermal zone at ``temp_c``; with ``throttled``
    the Pi firmware's ``get_throttled`` bit field (hex)."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/loadavg").write_text(f"{load:.2f} 0.00 0.00 1/100 1\n")
    (root / "proc/cpuinfo").write_text("".join(f"processor : {i}\n" for i in range(cpus)))
    ac, bat = root / "sys/class/power_supply/AC", root / "sys/class/power_supply/BAT0"
    for directory in (ac, bat):
        directory.mkdir(parents=True, exist_ok=True)
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("1\n" if mains else "0\n")
    (bat / "type").write_text("Battery\n")
    (bat / "status").write_text("Charging\n" if mains else "Discharging\n")
    (bat / "capacity").write_text("90\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")
    if throttled is not None:
        firmware = root / "sys/devices/platform/soc/soc:firmware"
        firmware.mkdir(parents=True, exist_ok=True)
        (firmware / "get_throttled").write_text(f"{throttled:x}\n")
