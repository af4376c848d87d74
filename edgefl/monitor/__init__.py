"""``edgefl monitor``: watch a fleet live through the broker's topics.

* :mod:`~edgefl.monitor.decode` — one MQTT message -> one typed observation (sans-IO);
* :mod:`~edgefl.monitor.model` — the fleet model: a fold of observations into a
  :class:`~edgefl.monitor.snapshot.FleetSnapshot` (presence/session rule, lost devices);
* :mod:`~edgefl.monitor.participation` — leases against C and staleness against C / K;
* :mod:`~edgefl.monitor.privacy` — central differential privacy: ε at δ, z, C, the cap and the
  participation distribution;
* :mod:`~edgefl.monitor.summary` — one-line topic-log entries;
* :mod:`~edgefl.monitor.broker_stats` — ``$SYS`` broker statistics;
* :mod:`~edgefl.monitor.clear` — which retained topics ``--clear-retained`` deletes;
* :mod:`~edgefl.monitor.client` — the asyncio shell over ``MqttTransport``;
* :mod:`~edgefl.monitor.modes` — ``--once``, JSON lines, clearing (asyncio, no UI);
* :mod:`~edgefl.monitor.render` — text of the panels and of ``--once``;
* :mod:`~edgefl.monitor.tui` — the textual terminal UI (imports textual);
* :mod:`~edgefl.monitor.cli` — ``monitor_command``, mounted as ``edgefl monitor``.

Nothing in this package imports torch. User documentation: ``docs/MONITOR.md``.
"""

from __future__ import annotations

from .decode import Observation, StateEncoding, decode_inbound, parse_json_state
from .model import FleetModel, FleetModelConfig
from .snapshot import (
    AggregatorView,
    ConnectionView,
    DeviceView,
    FleetSnapshot,
    LostReason,
    ModelView,
    MonitorCounters,
)
from .summary import TopicLogEntry, log_entry, summarize

__all__ = [
    "AggregatorView",
    "ConnectionView",
    "DeviceView",
    "FleetModel",
    "FleetModelConfig",
    "FleetSnapshot",
    "LostReason",
    "ModelView",
    "MonitorCounters",
    "Observation",
    "StateEncoding",
    "TopicLogEntry",
    "decode_inbound",
    "log_entry",
    "parse_json_state",
    "summarize",
]
