"""Sans-IO delivery state machine of the agent's spool under receipts (protocol 1.1).

Every spooled update is in one of these states::

    spooled --send+PUBACK--> awaiting receipt --receipt: committed--> deleted
       ^                        |     |
       |                        |     +--receipt: rejected (final reason)--> deleted, logged
       +---- timeout (backoff) -+     (resend: awaiting again, attempts + 1)

:class:`DeliveryTracker` decides, from plain values and an injected clock reading ``now``
(monotonic seconds), which spooled updates are due to be sent, when the next resend is due, and
what a receipt settles. The agent's asyncio shell (:mod:`device_agent.agent`) carries it out and
persists the awaiting state in the spool (:meth:`~device_agent.spool.UpdateSpool.mark_sent`).

Resend rule: an update is sent again ``timeout_s * 2**(attempts-1)`` seconds after its last send
(at most ``max_backoff_s``; a jitter of up to +10 % spreads a fleet's resends), and at once on
every new connection, in sequence order, before anything newer: a broker that lost acknowledged
messages lost them with the connection, and the aggregator refuses a seq below one it already
committed (``REPLAY``), so an older update must never be overtaken by a newer one. The
aggregator de-duplicates by ``(device, seq)``, so resends are safe.

A receipt deletes the updates it names as committed or rejected; an update it does not name
but settles (``seq <= through``) was covered by a receipt the device missed: it is resent at
once and the aggregator's answer names it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from edgefl.protocol.messages import Receipt

__all__ = [
    "DeliveryTracker",
    "ReceiptEffect",
    "ReceiptPolicy",
    "Settlement",
]

JITTER = 0.1
"""Largest extra fraction of a resend delay (0.1: up to +10 %)."""


class Settlement(StrEnum):
    """How a receipt settled one spooled update."""

    COMMITTED = "committed"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ReceiptPolicy:
    """Resend timing: first resend ``timeout_s`` after a send, doubling up to ``max_backoff_s``."""

    timeout_s: float = 120.0
    max_backoff_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s <= self.max_backoff_s:
            raise ValueError("need 0 < timeout_s <= max_backoff_s")

    def delay(self, attempts: int, jitter: float = 0.0) -> float:
        """Seconds from the ``attempts``-th send to the next one; ``jitter`` in [0, 1)."""
        base = self.timeout_s * 2.0 ** min(max(attempts, 1) - 1, 60)
        return min(self.max_backoff_s, base) * (1.0 + JITTER * jitter)


@dataclass(frozen=True, slots=True)
class ReceiptEffect:
    """What one receipt does to the spool: delete ``settled`` (seq -> how, and the reason of a
    rejection), and send ``resend_now`` at once."""

    settled: dict[int, tuple[Settlement, str | None]] = field(default_factory=dict)
    resend_now: tuple[int, ...] = ()


@dataclass(slots=True)
class _Awaiting:
    attempts: int
    due: float


class DeliveryTracker:
    """Which spooled updates to send when; see the module docstring. Not thread-safe."""

    def __init__(
        self, policy: ReceiptPolicy, *, jitter: Callable[[], float] = random.random
    ) -> None:
        self.policy = policy
        self._jitter = jitter
        self._awaiting: dict[int, _Awaiting] = {}
        self.resends = 0

    # -- state --

    def restore(self, seq: int, attempts: int, now: float) -> None:
        """An update marked sent before a restart: awaiting, due at once (a restart is a new
        connection, see :meth:`reconnected`)."""
        self._awaiting[seq] = _Awaiting(max(attempts, 1), now)

    def attempts(self, seq: int) -> int:
        """How often ``seq`` was sent (0: never)."""
        entry = self._awaiting.get(seq)
        return 0 if entry is None else entry.attempts

    def is_awaiting(self, seq: int) -> bool:
        return seq in self._awaiting

    @property
    def awaiting(self) -> int:
        """Updates sent and waiting for a receipt."""
        return len(self._awaiting)

    # -- decisions --

    def due(self, spooled: Iterable[int], now: float) -> list[int]:
        """The spooled seqs to send now, in sequence order: never sent, or awaiting and due."""
        out = []
        for seq in sorted(spooled):
            entry = self._awaiting.get(seq)
            if entry is None or entry.due <= now:
                out.append(seq)
        return out

    def next_due(self) -> float | None:
        """When the earliest resend is due (None: nothing awaits a receipt)."""
        return min((e.due for e in self._awaiting.values()), default=None)

    # -- events --

    def sent(self, seq: int, now: float) -> int:
        """``seq`` was sent and the broker acknowledged it; returns its number of sends."""
        entry = self._awaiting.get(seq)
        attempts = 1 if entry is None else entry.attempts + 1
        if entry is not None:
            self.resends += 1
        due = now + self.policy.delay(attempts, self._jitter())
        self._awaiting[seq] = _Awaiting(attempts, due)
        return attempts

    def reconnected(self, now: float) -> None:
        """A new connection: every awaiting update is due at once (in sequence order)."""
        for entry in self._awaiting.values():
            entry.due = min(entry.due, now)

    def forget(self, seq: int) -> None:
        """``seq`` left the spool (deleted, dropped as corrupt)."""
        self._awaiting.pop(seq, None)

    def prune(self, spooled: Iterable[int]) -> None:
        """Forget every seq that is no longer spooled."""
        keep = set(spooled)
        for seq in [s for s in self._awaiting if s not in keep]:
            del self._awaiting[seq]

    def on_receipt(self, receipt: Receipt, spooled: Iterable[int], now: float) -> ReceiptEffect:
        """Apply a receipt to the spooled seqs: what to delete, what to resend at once. The
        settled seqs are forgotten here; the caller deletes them from the spool."""
        settled: dict[int, tuple[Settlement, str | None]] = {}
        resend: list[int] = []
        for seq in sorted(spooled):
            if receipt.is_committed(seq):
                settled[seq] = (Settlement.COMMITTED, None)
            elif seq in receipt.rejected:
                settled[seq] = (Settlement.REJECTED, receipt.rejected[seq])
            elif receipt.through is not None and seq <= receipt.through:
                entry = self._awaiting.get(seq)
                if entry is not None and entry.due > now:
                    entry.due = now
                    resend.append(seq)
        for seq in settled:
            self.forget(seq)
        return ReceiptEffect(settled, tuple(resend))
