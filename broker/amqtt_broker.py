"""amqtt 0.12 adapted to edgefl's traffic, and kept from flooding a terminal.

Imported only on the embedded-broker path (``amqtt`` is an optional dependency).

Why (measured, see ``conf/README.md``): amqtt's broker waits a hard-coded **5 s** for the PUBACK of
every QoS 1 message it sends (``amqtt/mqtt/protocol/handler.py``, ``_handle_qos1_message_flow``:
``asyncio.wait_for(waiter, timeout=5)``; no configuration key). It sends every message at once
(MQTT 3.1.1 has no Receive Maximum and amqtt has no in-flight limit), so a subscriber that
acknowledges late, like the aggregator that acknowledges a batch only after its SQLite commit and
pauses reading when its bounded queue is full, sees timeouts: amqtt then forgets the message
(no retransmission), frees its packet id for reuse while the client still holds it, and logs a
warning plus an ERROR with a full traceback ("Task failed and will be skipped") per message.

What this module changes, for brokers it starts only (no global patching):

* :class:`EdgeflAmqttBroker` sends the retained messages of a new subscription without blocking
  the subscriber's message loop until their PUBACKs (amqtt awaits them there: a device holding
  the retained model's acknowledgement stalled for 5 s per subscription, and the unretrieved
  timeouts were the "Task exception was never retrieved" reports).
* :class:`EdgeflBrokerHandler` waits for a PUBACK as long as the connection lives, as MQTT 3.1.1
  section 4.4 asks (no in-session retransmission timer; keep-alive detects dead clients), and
  bounds the QoS 1/2 messages in flight per client to :data:`INFLIGHT_WINDOW` (Mosquitto's
  ``max_inflight_messages`` in ``conf/dev.conf``), so packet ids are never reused while held.
* :func:`contain_amqtt_logging` routes amqtt's loggers through one handler that shows the first
  record of each kind as one line (no traceback) and counts the repeats.
* :class:`AmqttExceptionHandler` on the broker's loop counts asyncio's "Task exception was never
  retrieved" (and similar) reports from amqtt's tasks and logs each kind once; other reports go
  to the previous handler.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

from amqtt.broker import Broker
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import OUTGOING, IncomingApplicationMessage, OutgoingApplicationMessage

__all__ = [
    "INFLIGHT_WINDOW",
    "AmqttExceptionHandler",
    "EdgeflAmqttBroker",
    "EdgeflBrokerHandler",
    "OncePerKind",
    "contain_amqtt_logging",
]

INFLIGHT_WINDOW = 1000
"""QoS 1/2 messages the broker sends to one client before waiting for acknowledgements."""

LIVENESS_CHECK_S = 5.0
"""While waiting for a PUBACK, how often to check that the connection still lives (a publish
that raced with a disconnect would otherwise wait forever)."""

_AMQTT_LOGGERS = ("amqtt", "transitions")


class EdgeflBrokerHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler without the 5 s PUBACK timeout, with an in-flight
    window per client."""

    _inflight_slots: asyncio.Semaphore | None = None  # created on first use (see adopt)

    @classmethod
    def adopt(cls, handler: BrokerProtocolHandler) -> EdgeflBrokerHandler:
        """Turn the handler amqtt created for a new connection into this class. amqtt builds it
        in ``BrokerProtocolHandler.init_from_connect`` with no way to choose the class; this
        class adds only methods and a lazily created attribute, so switching is safe."""
        handler.__class__ = cls
        assert isinstance(handler, cls)
        return handler

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        """Send one message; QoS 1/2 wait for a free slot of the in-flight window first."""
        if qos not in (QOS_1, QOS_2):
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        if self._inflight_slots is None:
            self._inflight_slots = asyncio.Semaphore(INFLIGHT_WINDOW)
        async with self._inflight_slots:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING or not isinstance(
            app_message, OutgoingApplicationMessage
        ):
            await super()._handle_qos1_message_flow(app_message)
            return
        session = self.session
        packet_id = app_message.packet_id
        if session is None or packet_id is None or app_message.qos != QOS_1:
            await super()._handle_qos1_message_flow(app_message)  # raises amqtt's own error
            return
        session.inflight_out.setdefault(packet_id, app_message)
        dup = app_message.publish_packet is not None  # a retry after a reconnect
        publish_packet = app_message.build_publish_packet(dup=dup)
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter  # before sending: the PUBACK can be quick
        try:
            await self._send_packet(publish_packet)
            app_message.publish_packet = publish_packet
            # No timeout while the connection lives: handler.stop cancels the waiter; a publish
            # that raced with the end of the connection is noticed by the liveness check.
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=LIVENESS_CHECK_S)
                if not waiter.done() and not self._connection_alive():
                    waiter.cancel()
            app_message.puback_packet = waiter.result()  # CancelledError: connection ended
        finally:
            self._puback_waiters.pop(packet_id, None)
            session.inflight_out.pop(packet_id, None)

    def _connection_alive(self) -> bool:
        reader = getattr(self, "_reader_task", None)
        return reader is not None and not reader.done()


class EdgeflAmqttBroker(Broker):  # type: ignore[misc]
    """amqtt's :class:`~amqtt.broker.Broker` whose client connections use
    :class:`EdgeflBrokerHandler`."""

    _retained_sends: set[asyncio.Task[Any]] | None = None
    retained_send_failures: Counter[str] | None = None

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        """Send the retained messages matching a new subscription without waiting for their
        PUBACKs. amqtt awaits them inside the client's message loop, so a client that holds
        the acknowledgement of a retained message (a device holds the retained global model
        until it has used it) blocks the broker from reading that client's own publishes: up
        to amqtt's 5 s timeout (then "Task exception was never retrieved"), forever without it.
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        if self._retained_sends is None:
            self._retained_sends = set()
            self.retained_send_failures = Counter()
        topic_filter, qos = subscription
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            task = asyncio.create_task(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            self._retained_sends.add(task)
            task.add_done_callback(self._retained_send_done)

    def _retained_send_done(self, task: asyncio.Task[Any]) -> None:
        if self._retained_sends is not None:
            self._retained_sends.discard(task)
        if task.cancelled() or self.retained_send_failures is None:
            return  # the connection ended
        exc = task.exception()
        if exc is not None:
            self.retained_send_failures[type(exc).__name__] += 1

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Any]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        return EdgeflBrokerHandler.adopt(handler), session

    async def _init_handler(self, session: Any, reader: Any, writer: Any) -> BrokerProtocolHandler:
        handler = await super()._init_handler(session, reader, writer)
        return EdgeflBrokerHandler.adopt(handler)


_DIGITS = re.compile(r"\d+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")


def _kind(name: str, template: str) -> str:
    return f"{name}: {_DIGITS.sub('N', _HEX.sub('0x', template))[:120]}"


class OncePerKind(logging.Filter):
    """Lets the first record of each kind through as one line (the exception's type and text
    appended, the traceback dropped) and counts the rest. A kind is the logger and the message
    template with numbers blanked (``Timeout waiting for PUBACK for packet ID N``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = _kind(record.name, str(record.msg) if not record.args else record.getMessage())
        with self._lock:
            self.counts[kind] += 1
            first = self.counts[kind] == 1
        if not first:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.msg = f"{record.msg} (repeats are counted, not shown)"
        return True

    def repeats(self) -> int:
        """Records suppressed so far (all kinds)."""
        with self._lock:
            return sum(n - 1 for n in self.counts.values())


_contained: OncePerKind | None = None
_contain_lock = threading.Lock()


def contain_amqtt_logging(
    level: int = logging.WARNING, stream: TextIO | None = None
) -> OncePerKind:
    """Route amqtt's loggers (and ``transitions``) to one stderr handler at ``level`` that
    shows each kind of record once, as one line; returns the (process-wide) counting filter.
    Idempotent. Loggers someone set a level on keep it."""
    global _contained
    with _contain_lock:
        if _contained is not None:
            return _contained
        counter = OncePerKind()
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter("edgefl broker (amqtt): %(levelname)s %(message)s"))
        handler.addFilter(counter)
        for name in _AMQTT_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(level)
            logger.addHandler(handler)
            logger.propagate = False
        _contained = counter
        return counter


def _from_amqtt(context: dict[str, Any]) -> bool:
    """Whether an asyncio error report concerns amqtt's code (its task, future or exception)."""
    for key in ("task", "future"):
        obj = context.get(key)
        coro = getattr(obj, "get_coro", lambda: None)()
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and "amqtt" in code.co_filename:
            return True
    exc = context.get("exception")
    tb = exc.__traceback__ if isinstance(exc, BaseException) else None
    while tb is not None:
        if "amqtt" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


_PROBE_NOISE = "Unhandled exception in client_connected_cb"


class AmqttExceptionHandler:
    """An asyncio loop exception handler: reports about amqtt's tasks are counted by kind and
    each kind is logged once (one line, on the ``edgefl.broker`` logger); any other report goes
    to the handler that was installed before (or the loop's default)."""

    def __init__(
        self,
        previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.previous = previous
        self.counts: Counter[str] = Counter()
        self.log = log if log is not None else logging.getLogger("edgefl.broker")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not _from_amqtt(context):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        kind = _kind("asyncio", f"{context.get('message', '')} {type(exc).__name__}")
        self.counts[kind] += 1
        if str(context.get("message", "")).startswith(_PROBE_NOISE):
            return  # an MQTT 5 CONNECT refused (clients probe MQTT 5 first): counted only
        if self.counts[kind] == 1:
            self.log.warning(
                "amqtt: %s %s (repeats are counted, not shown)", context.get("message", ""), what
            )

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> AmqttExceptionHandler:
        """Install on ``loop`` (once; returns the installed handler)."""
        current = loop.get_exception_handler()
        if isinstance(current, AmqttExceptionHandler):
            return current
        handler = cls(current)
        loop.set_exception_handler(handler)
        return handler
