"""In-process broker and transport for unit tests: same contract as ``MqttTransport``, no sockets.

:class:`MemoryBroker` implements the MQTT behaviour edgefl relies on, simplified:

* topic matching with ``+``/``#`` (paho's matcher), ``$``-topics not matched by leading wildcards;
* retained messages (an empty retained payload deletes), sent on a *new* subscription only
  (like MQTT 5 retain handling 1), with the retain flag set;
* effective QoS = min(publish QoS, subscription QoS), one copy per session;
* sessions: a persistent session keeps subscriptions, QoS 1 messages published while offline and
  unacknowledged deliveries; on reconnect it redelivers unacknowledged messages first (with
  ``duplicate=True``). QoS 0 messages for an offline session are dropped and counted. As in
  ``MqttTransport``, a QoS 1 message is acknowledged by ``ack`` (``manual_ack``) or else when a
  consumer takes it from the inbound queue;
* Last Will on an abrupt disconnect or close; takeover of a client id disconnects the old
  connection (no Will);
* shared subscriptions ``$share/<group>/<filter>``: each message to one member (round robin,
  connected members first); no retained messages for them;
* flow control: a session stops delivering while the transport's inbound queue is full
  (``Backpressure.PAUSE``) and continues when the consumer drains it.

Delivery is synchronous inside ``publish`` (everything runs on one event loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field

from edgefl.lifecycle import AsyncLifecycle
from edgefl.transport._inbound import Counters, InboundQueue
from edgefl.transport.base import (
    Backpressure,
    ConnectInfo,
    InboundMessage,
    NotConnectedError,
    OnConnect,
    TransportClosed,
    TransportStatistics,
    topic_matches,
    validate_filter,
    validate_qos,
    validate_topic,
)
from edgefl.transport.config import Will

log = logging.getLogger("edgefl.transport.memory")

OFFLINE_QOS0 = "offline_qos0"
"""Broker-side drop reason: a QoS 0 message for a disconnected persistent session."""


@dataclass
class _Session:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    pending: deque[InboundMessage] = field(default_factory=deque)
    inflight: dict[int, InboundMessage] = field(default_factory=dict)
    transport: MemoryTransport | None = None


class MemoryBroker:
    """A tiny in-process MQTT broker (see the module docstring for what it models)."""

    def __init__(self) -> None:
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._sessions: dict[str, _Session] = {}
        self._share_cursor: dict[tuple[str, str], int] = {}
        self._tokens = itertools.count(1)
        self.dropped_by_reason: dict[str, int] = {}
        """Messages the broker itself discarded, by reason (``offline_qos0``)."""

    # -- inspection helpers for tests

    def retained(self) -> dict[str, bytes]:
        """Current retained messages by topic."""
        return {topic: payload for topic, (payload, _) in self._retained.items()}

    def has_session(self, client_id: str) -> bool:
        return client_id in self._sessions

    def queued_for(self, client_id: str) -> int:
        """Messages waiting in a session (offline, or receiver full), plus unacked in flight."""
        session = self._sessions.get(client_id)
        return 0 if session is None else len(session.pending) + len(session.inflight)

    # -- the broker

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Route a message to every matching session (and store it if retained)."""
        validate_topic(topic)
        validate_qos(qos)
        payload = bytes(payload)
        if retain:
            if payload:
                self._retained[topic] = (payload, qos)
            else:
                self._retained.pop(topic, None)
        direct: dict[str, int] = {}
        shared: dict[tuple[str, str], list[tuple[_Session, int]]] = {}
        for session in list(self._sessions.values()):
            for topic_filter, sub_qos in session.subscriptions.items():
                if topic_filter.startswith("$share/"):
                    _, group, real_filter = topic_filter.split("/", 2)
                    if topic_matches(real_filter, topic):
                        shared.setdefault((group, real_filter), []).append((session, sub_qos))
                elif topic_matches(topic_filter, topic):
                    direct[session.client_id] = max(direct.get(session.client_id, 0), sub_qos)
        for client_id, sub_qos in direct.items():
            self._enqueue(self._sessions[client_id], topic, payload, min(qos, sub_qos), False)
        for key, members in shared.items():
            online = [m for m in members if m[0].transport is not None] or members
            cursor = self._share_cursor.get(key, 0)
            session, sub_qos = online[cursor % len(online)]
            self._share_cursor[key] = cursor + 1
            self._enqueue(session, topic, payload, min(qos, sub_qos), False)

    def _enqueue(
        self, session: _Session, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        if session.transport is None and qos == 0:
            self.dropped_by_reason[OFFLINE_QOS0] = self.dropped_by_reason.get(OFFLINE_QOS0, 0) + 1
            return
        session.pending.append(InboundMessage(topic, payload, qos, retain))
        self._pump(session)

    def _pump(self, session: _Session) -> None:
        transport = session.transport
        while transport is not None and session.pending and transport._can_accept():
            message = session.pending.popleft()
            if message.qos == 1:
                token = next(self._tokens)
                session.inflight[token] = message
                message = dataclasses.replace(message, ack_token=token)
            if not transport._accept(message) and message.ack_token:
                session.inflight.pop(message.ack_token, None)  # dropped (and counted) by the client
            transport = session.transport

    # -- called by MemoryTransport

    def _connect(self, transport: MemoryTransport) -> bool:
        """Attach ``transport`` to its session; True if an existing session was resumed."""
        client_id = transport.client_id
        session = self._sessions.get(client_id)
        if session is not None and session.transport is not None:
            old = session.transport
            session.transport = None
            old._taken_over()
        present = session is not None and session.persistent and transport.persistent_session
        if not present:
            session = _Session(client_id, transport.persistent_session)
            self._sessions[client_id] = session
        assert session is not None
        session.transport = transport
        redeliver = [dataclasses.replace(m, duplicate=True) for m in session.inflight.values()]
        session.inflight.clear()
        session.pending.extendleft(reversed(redeliver))
        self._pump(session)
        return present

    def _disconnect(self, transport: MemoryTransport, *, abrupt: bool) -> None:
        session = self._sessions.get(transport.client_id)
        if session is None or session.transport is not transport:
            return
        session.transport = None
        if not session.persistent:
            del self._sessions[transport.client_id]
        will = transport.will
        if abrupt and will is not None:
            self.publish(will.topic, will.payload, will.qos, will.retain)

    def _subscribe(self, transport: MemoryTransport, topic_filter: str, qos: int) -> None:
        session = self._session_of(transport)
        is_new = topic_filter not in session.subscriptions
        session.subscriptions[topic_filter] = qos
        if is_new and not topic_filter.startswith("$share/"):
            for topic, (payload, retained_qos) in list(self._retained.items()):
                if topic_matches(topic_filter, topic):
                    self._enqueue(session, topic, payload, min(qos, retained_qos), True)

    def _ack(self, transport: MemoryTransport, token: int) -> bool:
        session = self._sessions.get(transport.client_id)
        if session is None or session.transport is not transport:
            return False
        return session.inflight.pop(token, None) is not None

    def _resume(self, transport: MemoryTransport) -> None:
        session = self._sessions.get(transport.client_id)
        if session is not None and session.transport is transport:
            self._pump(session)

    def _session_of(self, transport: MemoryTransport) -> _Session:
        session = self._sessions.get(transport.client_id)
        if session is None or session.transport is not transport:
            raise RuntimeError(f"{transport.client_id} is not connected")
        return session


class MemoryTransport(AsyncLifecycle):
    """:class:`~edgefl.transport.base.Transport` on a :class:`MemoryBroker`.

    ``disconnect(abrupt=...)`` and ``connect()`` simulate a dropped and restored connection
    (re-subscribing and running ``on_connect`` like the real transport); a new transport with the
    same ``client_id`` and ``persistent_session=True`` resumes the session.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str = "",
        *,
        persistent_session: bool = False,
        manual_ack: bool = False,
        will: Will | None = None,
        max_queued_messages: int = 1000,
        backpressure: Backpressure = Backpressure.PAUSE,
        operation_timeout: float | None = None,
        on_connect: OnConnect | None = None,
    ) -> None:
        if persistent_session and not client_id:
            raise ValueError("a persistent session needs a fixed client_id")
        self._broker = broker
        self.client_id = client_id or f"edgefl-{secrets.token_hex(6)}"
        self.persistent_session = persistent_session
        self.manual_ack = manual_ack
        self.will = will
        self._backpressure = backpressure
        self._operation_timeout = operation_timeout
        self._on_connect_hook = on_connect
        self._counters = Counters()
        self._inbound = InboundQueue(
            max_queued_messages, backpressure, self._counters, pause=_noop, resume=self._resume
        )
        self._subscriptions: dict[str, int] = {}
        self._unacked: dict[int, int] = {}
        self._gen = 0
        self._connected = False
        self._closed = False
        self._state_changed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        """(Re)connect: resume or create the session, re-subscribe, run ``on_connect``."""
        if self._closed:
            raise TransportClosed("transport closed")
        if self._connected:
            return
        self._gen += 1
        self._connected = True
        self._counters.connects += 1
        present = self._broker._connect(self)
        for topic_filter, qos in self._subscriptions.items():
            self._broker._subscribe(self, topic_filter, qos)
        self._notify()
        if self._on_connect_hook is not None:
            info = ConnectInfo(present, "memory", self._counters.connects)
            try:
                await self._on_connect_hook(info)
            except Exception:
                log.exception("%s: on_connect hook failed", self.client_id)

    open = connect

    async def disconnect(self, *, abrupt: bool = False) -> None:
        """Drop the connection but keep the transport (``connect()`` restores it). Abrupt: the
        broker publishes the Will. Queued inbound messages stay queued."""
        if not self._connected:
            return
        self._connected = False
        self._broker._disconnect(self, abrupt=abrupt)
        self._notify()

    async def close(self, *, abrupt: bool = False) -> None:
        """Close for good; queued inbound messages are counted as ``unconsumed_at_close``."""
        if self._closed:
            return
        await self.disconnect(abrupt=abrupt)
        self._closed = True
        self._inbound.close()
        self._notify()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        validate_topic(topic)
        validate_qos(qos)
        await self._wait_connected()
        self._broker.publish(topic, payload, qos, retain)
        self._counters.published += 1
        self._counters.published_bytes += len(payload)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        validate_filter(topic_filter)
        validate_qos(qos)
        self._subscriptions[topic_filter] = qos
        await self._wait_connected()
        self._broker._subscribe(self, topic_filter, qos)

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        while True:
            try:
                message = await self._inbound.get()
            except TransportClosed:
                return
            if message.ack_token and not self.manual_ack:
                self._send_ack(message.ack_token)  # auto mode: acknowledged when handed out
                message = dataclasses.replace(message, ack_token=0)
            yield message

    async def ack(self, message: InboundMessage) -> None:
        if message.ack_token:
            self._send_ack(message.ack_token)

    async def ack_many(self, messages: Iterable[InboundMessage]) -> None:
        for message in messages:
            if message.ack_token:
                self._send_ack(message.ack_token)

    def statistics(self) -> TransportStatistics:
        return self._counters.snapshot(
            connected=self._connected,
            protocol="memory" if self._counters.connects else None,
            queued=len(self._inbound),
        )

    # -- called by MemoryBroker

    def _can_accept(self) -> bool:
        return self._backpressure is Backpressure.DROP_NEWEST or not self._inbound.paused

    def _accept(self, message: InboundMessage) -> bool:
        if message.ack_token:
            self._unacked[message.ack_token] = self._gen
        accepted = self._inbound.offer(message)
        if not accepted and message.ack_token:
            self._unacked.pop(message.ack_token, None)
        return accepted

    def _taken_over(self) -> None:
        self._connected = False
        self._notify()

    # -- internals

    def _send_ack(self, token: int) -> None:
        gen = self._unacked.pop(token, None)
        if gen is None:
            return
        if gen == self._gen and self._connected and self._broker._ack(self, token):
            self._counters.acked += 1
        else:
            self._counters.stale_acks += 1

    def _resume(self) -> None:
        if self._connected:
            self._broker._resume(self)

    async def _wait_connected(self) -> None:
        try:
            async with asyncio.timeout(self._operation_timeout):
                while True:
                    if self._closed:
                        raise TransportClosed("transport closed")
                    if self._connected:
                        return
                    await self._state_changed.wait()
        except TimeoutError:
            raise NotConnectedError(
                f"{self.client_id} not connected within {self._operation_timeout}s"
            ) from None

    def _notify(self) -> None:
        event, self._state_changed = self._state_changed, asyncio.Event()
        event.set()


def _noop() -> None:
    """The memory broker polls ``_can_accept`` instead of being told to pause."""
