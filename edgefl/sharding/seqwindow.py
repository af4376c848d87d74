"""Which sequence numbers of one device were counted: a high-water mark plus a sliding window.

A broker may redeliver unacknowledged QoS 1 messages out of their original order (NATS
JetStream does, nats-server ``README-MQTT.md``, "Known issues"), so a shard can receive a
device's ``seq = 30`` after its ``seq = 37``. A bare high-water rule ("accept only
``seq > highest``") would call 30 a replay and lose it. Like the anti-replay window of IPsec
(RFC 4303 §3.4.3), :class:`SeqWindow` remembers, besides the highest counted ``seq`` ``h``,
which of ``h - WINDOW < seq <= h`` were counted (a bitmask), so

* ``seq > h`` is new;
* ``h - WINDOW < seq <= h`` is new iff its bit is clear;
* ``seq <= h - WINDOW`` is treated as counted (``REPLAY``): an update redelivered more than
  ``WINDOW`` sequence numbers late is refused, the price of bounded state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from edgefl.protocol.sequence import SEQ_WINDOW

WINDOW: Final = SEQ_WINDOW
_MASK: Final = (1 << WINDOW) - 1


@dataclass
class SeqWindow:
    """``high``: highest counted seq (-1: none); bit ``j`` of ``seen``: ``high - j`` counted."""

    high: int = -1
    seen: int = 0

    def counted(self, seq: int) -> bool:
        """True if ``seq`` was counted, or is too old to tell (see the module docstring)."""
        if seq > self.high:
            return False
        age = self.high - seq
        return age >= WINDOW or bool(self.seen >> age & 1)

    def record(self, seq: int) -> None:
        """Mark ``seq`` counted."""
        if seq > self.high:
            shift = seq - self.high
            self.seen = ((self.seen << shift) | 1) & _MASK if shift < WINDOW else 1
            self.high = seq
        elif self.high - seq < WINDOW:
            self.seen |= 1 << (self.high - seq)

    def copy(self) -> SeqWindow:
        return SeqWindow(self.high, self.seen)

    def to_json(self) -> list[object]:
        """``[high, seen as hex]`` (the mask exceeds every JSON reader's integer range)."""
        return [self.high, format(self.seen, "x")]

    @classmethod
    def from_json(cls, value: object) -> SeqWindow:
        """Parse :meth:`to_json`; ``ValueError`` otherwise."""
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"bad seq window {value!r}")
        high, seen = value
        if isinstance(high, bool) or not isinstance(high, int) or high < -1:
            raise ValueError(f"bad seq window high {high!r}")
        if not isinstance(seen, str) or len(seen) > WINDOW // 4:
            raise ValueError(f"bad seq window mask {seen!r}")
        return cls(high, int(seen, 16))
