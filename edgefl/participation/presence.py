"""Presence-aware withdrawal: a device whose connection died gives its slot back (sans-IO).

A device that vanishes silently (power cut, network gone) sends no withdrawal, and without help
its lease holds a slot until it expires, and its check-in can still win a lease for up to
``checkin_ttl_s``: ``bench/participation.py`` measured 25–35% of the slots held by dead devices
that way. The broker already knows better: it publishes the device's Last Will (``DeviceState``
with status ``lost``, retained) about ``1.5 * keepalive`` after the connection died, and a clean
shutdown publishes ``offline``. The aggregator watches the device states and withdraws such a
device at once (3–4% of the slots held by dead devices remain, the Will's delay).

Presence rule (PROTOCOL.md, device state): a state whose ``session`` is lower than the highest
seen for that device is a late Will of an old connection and is ignored.
"""

from __future__ import annotations

from edgefl.protocol.messages import DeviceState, DeviceStatus

__all__ = ["PresenceWatch"]

_GONE = frozenset({DeviceStatus.LOST, DeviceStatus.OFFLINE})


class PresenceWatch:
    """The highest session seen per device, and whether a new state means "gone"."""

    def __init__(self) -> None:
        self._sessions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def gone(self, state: DeviceState) -> bool:
        """Record ``state``; True when it says the device's current connection ended (a Will
        or a clean shutdown of its newest session), so its check-in and lease must go."""
        seen = self._sessions.get(state.device_id)
        if seen is not None and state.session < seen:
            return False  # a late Will of an older connection
        self._sessions[state.device_id] = state.session
        return state.status in _GONE
