"""The reconnect backoff of :class:`~edgefl.transport.mqtt.MqttTransport` (sans-IO).

After a failed attempt, or a connection that ended, the transport waits a pause drawn uniformly
from ``[d/2, d]`` (full jitter on the upper half, so a fleet that lost the same broker does not
come back in lockstep), where ``d`` starts at ``min_delay`` and doubles after every pause up to
``max_delay``. ``d`` starts over at ``min_delay`` after a connection that lived at least
``stable_after`` seconds: a broker that restarts several times in a row is rejoined within
about ``min_delay`` each time, while a connection the broker drops at once (a client-id
takeover by a twin, a refusal after the CONNACK) keeps backing off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

STABLE_AFTER_S = 1.0
"""A connection that lived this long restarts the backoff at its minimum."""


@dataclass
class Backoff:
    """``d`` of the module doc; :meth:`connection_ended` and :meth:`pause` are the whole API."""

    min_delay: float
    max_delay: float
    stable_after: float = STABLE_AFTER_S
    delay: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_delay <= self.max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        self.delay = self.min_delay

    def connection_ended(self, lived_s: float) -> None:
        """A connection (CONNACK accepted) ended after ``lived_s`` seconds."""
        if lived_s >= self.stable_after:
            self.delay = self.min_delay

    def pause(self, rng: random.Random | None = None) -> float:
        """The next pause, in ``[d/2, d]``; ``d`` doubles (capped) for the one after."""
        draw = (rng or random).uniform(self.delay / 2, self.delay)
        self.delay = min(self.delay * 2, self.max_delay)
        return draw
