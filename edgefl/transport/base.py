"""The transport seam: typed messages, statistics, errors and the :class:`Transport` protocol.

Everything above the transport (aggregator, device agent, monitor, live simulator) talks to MQTT
through :class:`Transport` only, so unit tests run on
:class:`~edgefl.transport.memory.MemoryTransport` and production on
:class:`~edgefl.transport.mqtt.MqttTransport` with the same code.

Delivery contract shared by every implementation:

* ``publish`` returns once the broker has the message: for QoS 1 when its PUBACK arrived, for
  QoS 0 when it was handed to the connection. While disconnected it waits for the next connection
  (bounded by the transport's operation timeout). A QoS 1 message already handed over is
  retransmitted after a reconnect until it is acknowledged or the transport is closed.
* ``subscribe`` is remembered and renewed after every reconnect.
* ``messages()`` yields inbound messages from a bounded queue. With ``manual_ack`` the consumer
  must ``ack`` every QoS 1 message once it has durably recorded it; otherwise the transport
  acknowledges a QoS 1 message when it hands it out (never merely on arrival). Unacknowledged
  messages are redelivered by the broker after a reconnect of a persistent session
  (at-least-once, so consumers deduplicate).
* Nothing is dropped silently: every message the transport discards is counted in
  ``statistics().dropped_by_reason`` under a :class:`DropReason`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from paho.mqtt.client import topic_matches_sub

#: Largest topic length in bytes that MQTT can encode (a 16-bit length prefix).
MAX_TOPIC_BYTES = 65535


class DropReason(StrEnum):
    """Why a transport discarded an inbound message. Values are stable metric labels."""

    QUEUE_FULL = "queue_full"
    """The inbound queue was full and the backpressure policy is ``drop_newest``."""
    INVALID_TOPIC = "invalid_topic"
    """The broker delivered a PUBLISH whose topic is not valid UTF-8."""
    UNCONSUMED_AT_CLOSE = "unconsumed_at_close"
    """The message was still queued when the transport was closed (with ``manual_ack`` the
    broker redelivers it to the next connection of a persistent session)."""


class Backpressure(StrEnum):
    """What a transport does when its inbound queue is full."""

    PAUSE = "pause"
    """Stop reading from the connection until the consumer drained the queue to half; the broker
    then queues for this client (Mosquitto: ``max_queued_messages``). Nothing is dropped here."""
    DROP_NEWEST = "drop_newest"
    """Discard the arriving message and count it as ``queue_full``; suits monitors of QoS 0
    telemetry that prefer fresh data to a stalled connection."""


@dataclass(frozen=True)
class InboundMessage:
    """One message delivered by the broker.

    ``ack_token`` is opaque: it identifies the delivery (connection and packet id) for
    :meth:`Transport.ack`. It is 0 when there is nothing to acknowledge (QoS 0, or the transport
    acknowledged it already because ``manual_ack`` is off).
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    duplicate: bool = False
    ack_token: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True)
class ConnectInfo:
    """Passed to the ``on_connect`` hook after every successful (re)connection."""

    session_present: bool
    """The broker resumed an existing session (subscriptions and queued messages survived)."""
    protocol: str
    """``"5"``, ``"3.1.1"`` or ``"memory"``."""
    connects: int
    """1 for the first connection of this transport, 2 after the first reconnect, ..."""


OnConnect = Callable[[ConnectInfo], Awaitable[None]]
"""Async hook run after every (re)connection, e.g. to republish a retained presence message."""


@dataclass(frozen=True)
class TransportStatistics:
    """A snapshot of a transport's counters. All counters are totals since construction."""

    connected: bool
    protocol: str | None
    """Protocol of the current or last connection: ``"5"``, ``"3.1.1"``, ``"memory"``."""
    connects: int
    """Successful connections (CONNACK accepted)."""
    reconnects: int
    """Successful connections after the first one."""
    connect_failures: int
    """Connection attempts that failed (network error, refused CONNACK, timeout)."""
    published: int
    """Publishes confirmed by the broker (QoS 1) or handed to the connection (QoS 0)."""
    published_bytes: int
    received: int
    """Messages accepted into the inbound queue."""
    received_bytes: int
    acked: int
    """QoS 1 acknowledgements sent to the broker (by ``ack``, or on dequeue without manual_ack)."""
    stale_acks: int
    """Manual acks for a delivery of an earlier connection; not sent (the broker redelivers)."""
    queued: int
    """Messages currently waiting in the inbound queue."""
    queue_high_water: int
    """Largest inbound queue length seen."""
    read_pauses: int
    """How often reading was paused because the inbound queue was full (backpressure)."""
    dropped_by_reason: Mapping[str, int] = field(default_factory=dict)
    """Discarded inbound messages by :class:`DropReason` value. Never anything silent."""
    last_error: str | None = None
    failovers: int = 0
    """Connections made to another broker node than the previous connection's (a list of
    broker URLs, ``MqttConfig.fallbacks``)."""
    broker_url: str | None = None
    """The node of the current or last connection attempt, without credentials."""

    @property
    def dropped(self) -> int:
        """Total discarded inbound messages."""
        return sum(self.dropped_by_reason.values())


class TransportError(Exception):
    """Base of transport failures (not input rejections: those are ``edgefl.errors``)."""


class TransportClosed(TransportError):
    """The transport was closed; the operation cannot complete."""


class TransportTimeout(TransportError, TimeoutError):
    """An operation did not complete within the operation timeout."""


class NotConnectedError(TransportTimeout):
    """No connection came up within the timeout. Nothing was handed to the broker."""


class BrokerUnreachable(NotConnectedError):
    """Gave up connecting: no connection to the broker came up within the start timeout
    (``async with`` / ``wait_connected``). ``url`` is the broker URL without credentials,
    ``reason`` the last connection error (None if no attempt finished, e.g. a connect that
    hung). Command-line tools map it to exit code 69 (``edgefl.clierror.BrokerUnavailable``)."""

    def __init__(self, url: str, reason: str | None, timeout: float | None) -> None:
        within = f" within {timeout:g}s" if timeout is not None else ""
        last = f" (last error: {reason})" if reason else ""
        super().__init__(f"cannot reach the MQTT broker at {url}{within}{last}")
        self.url = url
        self.reason = reason
        self.timeout = timeout


class AckTimeout(TransportTimeout):
    """The message was handed to the client but not acknowledged in time. It stays queued for
    retransmission and may still be delivered (at-least-once)."""


class BrokerRefused(TransportError):
    """The broker refused a publish or subscription (MQTT 5 reason code, or SUBACK 0x80)."""

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"broker refused {operation}: {reason}")
        self.operation = operation
        self.reason = reason


class PayloadTooLarge(TransportError):
    """The packet would exceed the broker's (MQTT 5 CONNACK) or the configured maximum size."""


@runtime_checkable
class Transport(Protocol):
    """Async MQTT-like transport; see the module docstring for the delivery contract."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; returns when the broker has it (QoS 1: PUBACK). Raises
        :class:`NotConnectedError`/:class:`AckTimeout` on timeout, :class:`TransportClosed`,
        :class:`BrokerRefused`, :class:`PayloadTooLarge`, ``ValueError`` for a bad topic/QoS."""
        ...

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe (renewed after reconnects); returns once the broker granted it."""
        ...

    def messages(self) -> AsyncIterator[InboundMessage]:
        """Iterate inbound messages until the transport is closed."""
        ...

    async def ack(self, message: InboundMessage) -> None:
        """Acknowledge a QoS 1 message (``manual_ack`` only; otherwise a no-op). Idempotent."""
        ...

    async def ack_many(self, messages: Iterable[InboundMessage]) -> None:
        """:meth:`ack` each message, in order, handing the PUBACKs to the network together."""
        ...

    def statistics(self) -> TransportStatistics:
        """A snapshot of the counters."""
        ...

    async def close(self, *, abrupt: bool = False) -> None:
        """Close; ``abrupt=True`` drops the connection without DISCONNECT, so the broker
        publishes the Last Will (what a crash looks like). ``__aexit__`` closes gracefully."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` matches ``topic_filter`` (``+``/``#`` wildcards, ``$`` topics are not
    matched by a leading wildcard). Thin wrapper over paho's ``topic_matches_sub``."""
    return topic_matches_sub(topic_filter, topic)


def validate_topic(topic: str) -> None:
    """Raise ``ValueError`` unless ``topic`` is a valid topic name to publish to."""
    if not topic:
        raise ValueError("empty topic")
    if "+" in topic or "#" in topic:
        raise ValueError(f"wildcards are not allowed in a topic name: {topic!r}")
    _check_common(topic)


def validate_filter(topic_filter: str) -> None:
    """Raise ``ValueError`` unless ``topic_filter`` is a valid subscription filter."""
    if not topic_filter:
        raise ValueError("empty topic filter")
    _check_common(topic_filter)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")
    if topic_filter.startswith("$share/") and (len(levels) < 3 or not levels[1]):
        raise ValueError(f"shared subscription needs $share/<group>/<filter>: {topic_filter!r}")


def validate_qos(qos: int) -> None:
    """edgefl uses QoS 0 and 1 only (QoS 2 buys nothing over idempotent QoS 1 handling)."""
    if qos not in (0, 1):
        raise ValueError(f"QoS must be 0 or 1, got {qos!r}")


def _check_common(text: str) -> None:
    if "\x00" in text:
        raise ValueError("NUL character in topic")
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError("topic longer than 65535 bytes")
