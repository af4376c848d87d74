"""Shared internals of the transports: counters and the bounded inbound queue with backpressure."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from edgefl.transport.base import (
    Backpressure,
    DropReason,
    InboundMessage,
    TransportClosed,
    TransportStatistics,
)


@dataclass
class Counters:
    """Mutable counters behind :class:`TransportStatistics` (owned by one transport)."""

    connects: int = 0
    connect_failures: int = 0
    published: int = 0
    published_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    acked: int = 0
    stale_acks: int = 0
    queue_high_water: int = 0
    read_pauses: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    failovers: int = 0

    def drop(self, reason: DropReason, count: int = 1) -> None:
        """Count ``count`` discarded messages under ``reason``."""
        if count:
            self.dropped[reason.value] = self.dropped.get(reason.value, 0) + count

    def snapshot(
        self, *, connected: bool, protocol: str | None, queued: int, broker_url: str | None = None
    ) -> TransportStatistics:
        """Freeze the counters into a :class:`TransportStatistics` (the counters of the same
        name, and the reconnects: every connect after the first)."""
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dropped"}
        return TransportStatistics(
            connected=connected,
            protocol=protocol,
            reconnects=max(0, self.connects - 1),
            queued=queued,
            broker_url=broker_url,
            dropped_by_reason=dict(self.dropped),
            **counts,
        )


class InboundQueue:
    """Bounded FIFO between the connection (producer) and ``messages()`` consumers.

    * ``Backpressure.PAUSE``: :meth:`offer` always accepts; once the queue holds ``maxsize``
      messages it calls ``pause`` (the transport stops reading its connection). When a consumer
      has drained it to ``maxsize // 2`` it calls ``resume``. Messages already decoded when the
      pause takes effect are still accepted, so the length can briefly exceed ``maxsize`` (the
      high-water mark shows by how much).
    * ``Backpressure.DROP_NEWEST``: a message arriving at a full queue is rejected and counted as
      ``queue_full``.

    ``pause`` is called on every offer that finds the queue full, so it must be idempotent; this
    also re-applies the pause to a fresh connection.
    """

    def __init__(
        self,
        maxsize: int,
        policy: Backpressure,
        counters: Counters,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._maxsize = maxsize
        self._low_water = maxsize // 2
        self._policy = policy
        self._counters = counters
        self._pause = pause
        self._resume = resume
        self._items: deque[InboundMessage] = deque()
        self._nonempty = asyncio.Event()
        self._paused = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def paused(self) -> bool:
        """True while the producer is asked not to read (PAUSE policy, queue full)."""
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, message: InboundMessage, *, may_pause: bool = True) -> bool:
        """Add ``message``; False when it was dropped (and counted). ``may_pause=False`` when
        another mechanism already bounds such messages (MQTT 5 Receive Maximum for QoS 1)."""
        if self._closed:
            self._counters.drop(DropReason.UNCONSUMED_AT_CLOSE)
            return False
        if self._policy is Backpressure.DROP_NEWEST and len(self._items) >= self._maxsize:
            self._counters.drop(DropReason.QUEUE_FULL)
            return False
        self._items.append(message)
        self._counters.received += 1
        self._counters.received_bytes += len(message.payload)
        self._counters.queue_high_water = max(self._counters.queue_high_water, len(self._items))
        self._nonempty.set()
        if may_pause and self._policy is Backpressure.PAUSE and len(self._items) >= self._maxsize:
            if not self._paused:
                self._paused = True
                self._counters.read_pauses += 1
            self._pause()
        return True

    async def get(self) -> InboundMessage:
        """Next message; raises :class:`TransportClosed` once closed (remaining items are
        discarded by :meth:`close`)."""
        while not self._items:
            if self._closed:
                raise TransportClosed("transport closed")
            self._nonempty.clear()
            await self._nonempty.wait()
        message = self._items.popleft()
        if self._paused and len(self._items) <= self._low_water:
            self._paused = False
            self._resume()
        return message

    def close(self) -> None:
        """Wake all consumers; count queued messages as ``unconsumed_at_close``."""
        if self._closed:
            return
        self._closed = True
        self._counters.drop(DropReason.UNCONSUMED_AT_CLOSE, len(self._items))
        self._items.clear()
        self._nonempty.set()
