"""``edgefl sim --mode live --role ...``: one live run split over processes or hosts.

* ``--role all`` (default): the broker (unless ``--broker``), the aggregator and every device.
* ``--role aggregator``: the broker (unless ``--broker``) and the aggregator, configured from
  the same options as a whole run; it records and reports the run as usual, and the devices
  come from ``--role devices`` processes (or real agents) on the same broker and ``--fleet``.
* ``--role devices --broker URL [--device-range A:B]``: only the devices ``A .. B-1`` of the
  fleet that ``--devices``, ``--profile``, ``--seed`` and the data options define, so several
  such processes with disjoint ranges make up one fleet. It runs until ``--max-time`` (wall
  seconds) or SIGINT/SIGTERM, then prints its agents' totals (``receipted``: updates the
  aggregator reported committed); ``--json`` prints them as the last stdout line even after a
  signal, which is how such a process usually ends.

:func:`check_role` validates the options (one usage-error line each); :func:`run_devices`
runs a devices process and prints its summary.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefl.clierror import UsageError
from firmware_sim import validate as check

if TYPE_CHECKING:
    from firmware_sim.interrupt import SignalStop
    from firmware_sim.live import DevicesResult
    from firmware_sim.progress import ProgressReporter
    from firmware_sim.scenario import SimConfig

__all__ = ["ROLES", "RoleOptions", "check_role", "devices_summary_line", "run_devices"]

ROLES = ("all", "aggregator", "devices")


@dataclass(frozen=True)
class RoleOptions:
    """A checked ``--role`` and ``--device-range`` (``None``: the whole fleet)."""

    role: str = "all"
    device_range: tuple[int, int] | None = None


def parse_device_range(text: str, devices: int) -> tuple[int, int]:
    """``A:B`` with ``0 <= A < B <= devices``: the devices ``A .. B-1``."""
    a, sep, b = text.strip().partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        lo, hi = -1, -1
    if not sep or not 0 <= lo < hi <= devices:
        raise UsageError(
            f"--device-range must be A:B with 0 <= A < B <= --devices ({devices}), got {text!r}"
        )
    return lo, hi


def check_role(
    mode: str,
    role: str,
    device_range: str | None,
    sizes: tuple[int, int],
    broker: str | None,
    compare: Sequence[object],
    report: object | None,
) -> RoleOptions:
    """``--role`` and ``--device-range`` against ``--mode``, (``--devices``, ``--workers``),
    ``--broker``, ``--compare`` (its algorithms) and ``--report`` (see the module docstring);
    raises :class:`UsageError` naming the first bad option."""
    devices, workers = sizes
    role = check.choice("--role", role, ROLES)
    if role != "all" and mode != "live":
        raise UsageError(f"--role {role} applies to --mode live only")
    if device_range is not None and role != "devices":
        raise UsageError("--device-range applies to --role devices only")
    if role != "all" and len(compare) > 0:
        raise UsageError("--compare runs every algorithm in one process: use it with --role all")
    if role != "devices":
        return RoleOptions(role)
    if broker is None:
        raise UsageError(
            "--role devices needs --broker URL: the broker of the aggregator "
            "(e.g. of an `edgefl sim --mode live --role aggregator`)"
        )
    lo, hi = parse_device_range(device_range, devices) if device_range else (0, devices)
    if workers > hi - lo:
        raise UsageError(
            f"--workers must be between 1 and the devices of --device-range ({hi - lo}), "
            f"got {workers}"
        )
    if report is not None:
        raise UsageError(
            "--report needs the aggregator's record: use it with --role all or aggregator"
        )
    return RoleOptions(role, (lo, hi))


def devices_summary_line(res: DevicesResult) -> str:
    """One line: what the devices of a ``--role devices`` process did."""
    t = res.agent_totals
    a, b = res.device_range
    return (
        f"devices {a}:{b} (role devices): peak online {res.peak_connected} of {b - a}, "
        f"trainings {t.get('trainings_completed', 0):,} completed, "
        f"updates {t.get('updates_sent', 0):,} sent, {t.get('receipted', 0):,} receipted by "
        f"the aggregator, dropouts {res.dropouts}, crashes {res.crashes}, "
        f"{res.wall_s:.1f} s{' (stopped by a signal)' if res.interrupted else ''}"
    )


def run_devices(
    config: SimConfig,
    *,
    roles: RoleOptions,
    broker: str,
    fleet: str,
    workers: int,
    json_out: bool,
    reporter: ProgressReporter,
    stop: SignalStop,
) -> DevicesResult:
    """Run a ``--role devices`` process to its end and print its summary (stderr with
    ``json_out``, whose JSON object is then the last stdout line)."""
    from firmware_sim.live import LiveOptions, LiveRole, run_live_devices

    options = LiveOptions(
        broker_url=broker,
        fleet=fleet,
        workers=workers,
        role=LiveRole.DEVICES,
        device_range=roles.device_range,
    )
    reporter.new_run(f"live devices {roles.device_range}: building the scenario")
    result = run_live_devices(config, options, on_phase=reporter.phase, stop=stop)
    reporter.close()
    out = sys.stderr if json_out else sys.stdout
    out.write(devices_summary_line(result) + "\n")
    out.flush()
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), allow_nan=False) + "\n")
        sys.stdout.flush()
    return result
