"""Broker statistics from ``$SYS`` topics (sans-IO).

Mosquitto publishes ``$SYS/broker/...`` every ``sys_interval`` seconds (2 s in edgefl's dev
config), retained, and only values that changed. The monitor keeps:

* ``version``: ``broker/version``;
* ``clients``: ``broker/clients/connected`` (older brokers: ``broker/clients/active``);
* ``messages_in_per_s`` / ``messages_out_per_s``: ``broker/load/messages/{received,sent}/1min``
  divided by 60 (the broker's one-minute moving average is per minute); without it, the
  difference of the ``broker/messages/{received,sent}`` totals over time;
* ``bytes_in_per_s`` / ``bytes_out_per_s``: the same with ``bytes``;
* ``dropped_publishes``: ``broker/publish/messages/dropped`` (QoS 1 messages Mosquitto
  discarded beyond ``max_queued_messages``);
* ``retained``, ``subscriptions``, ``uptime_s``: ``broker/retained messages/count``,
  ``broker/subscriptions/count``, ``broker/uptime``.

Brokers without ``$SYS`` (or with another layout, e.g. EMQX) leave every figure ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["BrokerStats", "BrokerStatsView"]

_INT_KEYS: Final = {
    "broker/clients/connected": "clients",
    "broker/clients/active": "clients_active",
    "broker/publish/messages/dropped": "dropped_publishes",
    "broker/retained messages/count": "retained",
    "broker/subscriptions/count": "subscriptions",
}
_LOAD_KEYS: Final = {
    "broker/load/messages/received/1min": "messages_in_per_s",
    "broker/load/messages/sent/1min": "messages_out_per_s",
    "broker/load/bytes/received/1min": "bytes_in_per_s",
    "broker/load/bytes/sent/1min": "bytes_out_per_s",
}
_TOTAL_KEYS: Final = {
    "broker/messages/received": "messages_in_per_s",
    "broker/messages/sent": "messages_out_per_s",
    "broker/bytes/received": "bytes_in_per_s",
    "broker/bytes/sent": "bytes_out_per_s",
}


def _number(text: str) -> float | None:
    head = text.strip().split(" ", 1)[0]
    try:
        value = float(head)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


@dataclass(frozen=True)
class BrokerStatsView:
    """What the connection panel shows; ``None`` when the broker did not publish it."""

    version: str | None = None
    clients: int | None = None
    messages_in_per_s: float | None = None
    messages_out_per_s: float | None = None
    bytes_in_per_s: float | None = None
    bytes_out_per_s: float | None = None
    dropped_publishes: int | None = None
    retained: int | None = None
    subscriptions: int | None = None
    uptime_s: int | None = None
    updated_at: float | None = None
    """Wall time of the last ``$SYS`` message."""

    @property
    def available(self) -> bool:
        return self.updated_at is not None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class BrokerStats:
    """Fold of ``$SYS`` values; :meth:`view` gives the current figures."""

    _ints: dict[str, int] = field(default_factory=dict)
    _load: dict[str, float] = field(default_factory=dict)
    _totals: dict[str, tuple[float, float]] = field(default_factory=dict)
    _diff_rates: dict[str, float] = field(default_factory=dict)
    _version: str | None = None
    _uptime: int | None = None
    _updated_at: float | None = None

    def add(self, name: str, value: str, *, now: float) -> bool:
        """Fold ``$SYS/<name>``; returns whether the value was one the monitor uses."""
        self._updated_at = now
        if name == "broker/version":
            self._version = value.strip()[:64]
            return True
        number = _number(value)
        if number is None:
            return False
        if name == "broker/uptime":
            self._uptime = int(number)
        elif name in _INT_KEYS:
            self._ints[_INT_KEYS[name]] = int(number)
        elif name in _LOAD_KEYS:
            self._load[_LOAD_KEYS[name]] = number / 60.0
        elif name in _TOTAL_KEYS:
            key = _TOTAL_KEYS[name]
            previous = self._totals.get(key)
            if previous is not None and now > previous[1] and number >= previous[0]:
                self._diff_rates[key] = (number - previous[0]) / (now - previous[1])
            self._totals[key] = (number, now)
        else:
            return False
        return True

    def view(self) -> BrokerStatsView:
        rates = {**self._diff_rates, **self._load}
        clients = self._ints.get("clients", self._ints.get("clients_active"))
        return BrokerStatsView(
            version=self._version,
            clients=clients,
            messages_in_per_s=rates.get("messages_in_per_s"),
            messages_out_per_s=rates.get("messages_out_per_s"),
            bytes_in_per_s=rates.get("bytes_in_per_s"),
            bytes_out_per_s=rates.get("bytes_out_per_s"),
            dropped_publishes=self._ints.get("dropped_publishes"),
            retained=self._ints.get("retained"),
            subscriptions=self._ints.get("subscriptions"),
            uptime_s=self._uptime,
            updated_at=self._updated_at,
        )
