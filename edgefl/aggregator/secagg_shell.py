"""The asyncio shell both secure-aggregation roles share: one MQTT persistent session with manual
acknowledgements, one message at a time, a periodic tick.

Contract for a role (:class:`RoleHandler`): ``handle(message)`` does everything a message causes
(decode, the sans-IO change, the durable write, the messages it enables) and returns; only then
does the shell acknowledge it. A crash anywhere before the acknowledgement makes the broker
redeliver the message (persistent session, QoS 1), and the roles treat a redelivery
idempotently. A publication that fails (the broker went away) leaves its message
unacknowledged, to be redelivered after the reconnection. ``tick(now)`` runs every ``tick_s``
seconds (timeouts). Messages are handled in arrival order on the event loop; each SQLite write
runs inline (one role process per host; its cost: docs/PRIVACY.md, "Costs").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Protocol

from edgefl.errors import EdgeflError
from edgefl.transport import InboundMessage, Transport, TransportError

__all__ = ["RoleHandler", "RoleShell"]

log = logging.getLogger("edgefl.aggregator.secagg")


class RoleHandler(Protocol):
    async def handle(self, message: InboundMessage) -> None: ...

    async def tick(self, now: float) -> None: ...


class RoleShell:
    """Runs a :class:`RoleHandler` on a connected transport until :meth:`stop`."""

    def __init__(self, handler: RoleHandler, *, tick_s: float = 1.0) -> None:
        self._handler = handler
        self._tick_s = tick_s
        self._stop = asyncio.Event()
        self.rejected: Counter[str] = Counter()  # undecodable messages, by RejectReason value
        self.handled = 0

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, transport: Transport) -> None:
        """Handle messages (acknowledging each after its handler returned) and ticks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[InboundMessage] = asyncio.Queue(maxsize=64)

        async def read() -> None:
            async for message in transport.messages():
                await queue.put(message)

        reader = asyncio.create_task(read(), name="edgefl-secagg-reader")
        next_tick = loop.time()
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_tick - loop.time())
                getting = asyncio.ensure_future(queue.get())
                stopping = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait(
                    {getting, stopping, reader},
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                stopping.cancel()
                if reader in done:
                    reader.result()  # the transport closed: re-raise its error
                    return
                # a get that finished after the wait is not lost: cancel() is False then
                if getting in done or not getting.cancel():
                    message = getting.result()
                    if await self._one(message):
                        await transport.ack(message)
                if loop.time() >= next_tick:
                    await self._handler.tick(time.time())
                    next_tick = loop.time() + self._tick_s
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _one(self, message: InboundMessage) -> bool:
        """Handle one message; whether to acknowledge it (not when a publication it caused
        failed: the broker redelivers it after the reconnection, and the handler repeats the
        publication idempotently)."""
        try:
            await self._handler.handle(message)
        except EdgeflError as exc:  # malformed or unauthentic: counted, acknowledged, dropped
            self.rejected[exc.reason.value] += 1
            log.debug("refused %s: %s", message.topic, exc)
        except TransportError as exc:
            log.warning(
                "publishing for %s failed (%s): redelivered after reconnecting", message.topic, exc
            )
            return False
        self.handled += 1
        return True
