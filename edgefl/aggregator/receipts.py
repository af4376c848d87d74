"""Publishing receipts: a bounded queue drained by one task, so PUBACKs never slow ingest.

The service builds the receipts of a batch with :class:`~edgefl.protocol.receipts.ReceiptBook`
only after the batch's transaction committed (and every earlier batch's), and hands them to
:meth:`ReceiptQueue.put` without waiting. :meth:`ReceiptSender.run`, one task, publishes them in
order (QoS 1, retained, one at a time), retrying the one in hand on a transport error.

When the broker is slower than ingest the queue fills; the **oldest** receipt is dropped and
counted (``receipts_dropped``). A dropped receipt costs a resend: the device keeps the update
in its spool until a receipt covers it, resends it after its timeout, the aggregator recognises
the ``(device, seq)`` as committed (``DUPLICATE``) and a later receipt reports it. Nothing is
counted twice and nothing is lost (docs/AGGREGATOR.md, "Receipts").
"""

from __future__ import annotations

import asyncio
import collections
import logging

from edgefl.transport import Transport, TransportError

__all__ = ["ReceiptQueue", "ReceiptSender"]

log = logging.getLogger("edgefl.aggregator")

_RETRY_S = 0.5


class ReceiptQueue:
    """A FIFO of ``(topic, payload)`` receipts holding at most ``capacity``; when full, putting
    drops the oldest (counted in :attr:`dropped`). Not thread-safe (event loop only).

    :meth:`get` hands out the oldest, :meth:`done` says it was published; :meth:`join` waits
    until everything put was handed out and done."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_hand = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, receipts: list[tuple[str, bytes]]) -> None:
        """Queue receipts in order, never waiting."""
        for item in receipts:
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
        if self._items:
            self._idle.clear()
            self._ready.set()

    async def get(self) -> tuple[str, bytes]:
        """The oldest receipt (waits for one); call :meth:`done` once it is published."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        self._in_hand += 1
        return self._items.popleft()

    def done(self) -> None:
        """The receipt from :meth:`get` was published."""
        self._in_hand -= 1
        if not self._items and not self._in_hand:
            self._idle.set()

    async def join(self) -> None:
        """Wait until every receipt put so far was published or dropped."""
        await self._idle.wait()


class ReceiptSender:
    """Publishes the receipts of a :class:`ReceiptQueue` on a transport, in order."""

    def __init__(self, queue: ReceiptQueue, transport: Transport) -> None:
        self.queue = queue
        self._transport = transport
        self.sent = 0

    async def run(self) -> None:
        """The sender task: publish each receipt (QoS 1, retained), retrying on errors."""
        while True:
            topic, payload = await self.queue.get()
            while True:
                try:
                    await self._transport.publish(topic, payload, qos=1, retain=True)
                    break
                except TransportError as exc:
                    log.warning("publishing a receipt failed (%s); will retry", exc)
                    await asyncio.sleep(_RETRY_S)
            self.sent += 1
            self.queue.done()
