"""Which retained topics ``edgefl monitor --clear-retained TARGET`` deletes (sans-IO).

``TARGET`` is ``lost`` (the retained state of every device currently shown lost, by Will or
by staleness) or an MQTT topic filter inside the fleet's root ``edgefl/v1/<fleet>/`` (for
example ``edgefl/v1/lab/device/+/state``). A filter selects the retained topics the monitor
saw with the retain flag, plus the state topic of every device it knows (device state is always
retained). Filters outside the fleet root (``#``, ``$SYS/...``, another fleet) are refused.
Deleting a retained message means publishing an empty retained payload to its topic.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgefl.protocol.topics import all_fleet_filter, device_state_topic
from edgefl.transport.base import topic_matches, validate_filter

from .snapshot import FleetSnapshot

__all__ = ["LOST", "check_target", "select_topics"]

LOST = "lost"


def check_target(target: str, fleet: str) -> str:
    """Validate ``target`` (``lost`` or a filter under the fleet root); ``ValueError`` if bad."""
    if target == LOST:
        return target
    validate_filter(target)
    root = all_fleet_filter(fleet)[:-1]  # "edgefl/v1/<fleet>/"
    if not target.startswith(root):
        raise ValueError(f"--clear-retained filter must start with {root!r}, got {target!r}")
    return target


def select_topics(target: str, snapshot: FleetSnapshot, retained: Iterable[str]) -> list[str]:
    """Topics to clear for a validated ``target`` (sorted, without duplicates)."""
    states = {device_state_topic(snapshot.fleet, d.device_id): d for d in snapshot.devices}
    if target == LOST:
        return sorted(t for t, d in states.items() if d.status == LOST)
    candidates = set(retained) | set(states)
    return sorted(t for t in candidates if topic_matches(target, t))
