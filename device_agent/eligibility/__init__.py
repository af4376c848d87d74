"""Device eligibility: probes read the device, a pure policy decides whether it may train.

Typical use in the agent runtime::

    probes = default_probes(cfg.probes.root, metered=cfg.probes.metered)
    monitor = EligibilityMonitor(cfg.eligibility)
    update = monitor.update(await asyncio.to_thread(collect_snapshot, probes), own_load=threads)
    for transition in update.transitions: ...   # start / abort training, publish device state
"""

from device_agent.eligibility.policy import (
    Decision,
    EligibilityMonitor,
    EligibilityPolicy,
    IneligibleReason,
    MonitorStatistics,
    MonitorUpdate,
    PolicyError,
    TimeWindow,
    Transition,
    TransitionKind,
    evaluate,
)
from device_agent.eligibility.probes import (
    ClockProbe,
    CommandError,
    CommandRunner,
    LoadProbe,
    MeteredProbe,
    MeteredSource,
    PowerProbe,
    Probe,
    ThermalProbe,
    ThrottleProbe,
    collect_snapshot,
    default_probes,
    parse_nmcli_metered,
    parse_throttled,
    run_command,
)
from device_agent.eligibility.snapshot import DeviceSnapshot, ProbeError, ThrottleState

__all__ = [
    "ClockProbe",
    "CommandError",
    "CommandRunner",
    "Decision",
    "DeviceSnapshot",
    "EligibilityMonitor",
    "EligibilityPolicy",
    "IneligibleReason",
    "LoadProbe",
    "MeteredProbe",
    "MeteredSource",
    "MonitorStatistics",
    "MonitorUpdate",
    "PolicyError",
    "PowerProbe",
    "Probe",
    "ProbeError",
    "ThermalProbe",
    "ThrottleProbe",
    "ThrottleState",
    "TimeWindow",
    "Transition",
    "TransitionKind",
    "collect_snapshot",
    "default_probes",
    "evaluate",
    "parse_nmcli_metered",
    "parse_throttled",
    "run_command",
]
