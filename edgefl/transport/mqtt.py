"""``MqttTransport``: paho-mqtt 2.x driven from the asyncio event loop, with manual acks.

paho runs without a network thread: :class:`~edgefl.transport._paho.SocketDriver` registers its
socket with ``loop.add_reader``/``add_writer``, and a small task calls ``loop_misc`` every second
for keepalive. The only blocking step, name resolution, TCP connect, TLS handshake and WebSocket
upgrade inside ``Client.reconnect``, runs in a daemon thread of its own
(:class:`~edgefl.transport._connect.ConnectJob`, bounded by ``connect_timeout``); closing the
transport abandons it at once, so neither ``close()`` nor the process exit waits for a hanging
connect. Every other paho call happens on the event loop thread. Over ``ws://``/``wss://`` paho
wraps the socket in its WebSocket framing; everything else is the same. A supervisor task owns
the connection lifecycle: connect, protocol fallback (``auto``: MQTT 5, then 3.1.1),
re-subscribe, the ``on_connect`` hook, jittered exponential backoff (cut short by ``close()``).

Several nodes (``MqttConfig.fallbacks``, a comma list of URLs): the supervisor points the same
paho client at the next node after every failed attempt (no backoff in between) and backs off
only after all nodes failed in a row; a lost connection is retried on its own node first. Since
the client is the same, its session state moves with it: unacknowledged QoS 1 publishes are
retransmitted on the new node, subscriptions renewed, the hook run there; a cluster-wide
persistent session (NATS, EMQX, HiveMQ) resumes and redelivers what was not acknowledged.
``statistics().broker_url`` names the node; ``failovers`` counts connections to another node
than the previous connection's.

Delivery: QoS 1 messages handed to paho survive reconnects (paho keeps them until their PUBACK
and resends them after the next CONNACK). Inbound QoS 1 messages are acknowledged only when the
consumer acks them (``manual_ack``) or takes them from the bounded inbound queue; on MQTT 5 the
Receive Maximum equals the queue size, so the broker never sends more unacknowledged messages
than fit. Anything else (QoS 0, MQTT 3.1.1) that finds the queue full stops the reading of the
socket (``Backpressure.PAUSE``), so TCP flow control pushes back to the broker; or it is dropped
and counted (``Backpressure.DROP_NEWEST``). Acks carry the connection generation: an ack for a
delivery of an earlier connection is not sent (the broker redelivers that message).

A graceful close first sends a PINGREQ and waits for its PINGRESP (the ping barrier): a broker
handles a connection's packets in order, so every acknowledgement sent before has then been
processed. Without it, a client that reconnected at once with the same client id could take
over its session while Mosquitto still had PUBACKs of the old connection unread (it reads one
packet per connection and wake-up), and those messages were delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Iterable, Iterator
from enum import Enum
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefl.lifecycle import AsyncLifecycle
from edgefl.transport._backoff import Backoff
from edgefl.transport._connect import ConnectAbandoned, ConnectJob
from edgefl.transport._inbound import Counters, InboundQueue
from edgefl.transport._paho import BufferedClient, SocketDriver, make_client, ssl_context
from edgefl.transport.base import (
    AckTimeout,
    BrokerRefused,
    BrokerUnreachable,
    ConnectInfo,
    DropReason,
    InboundMessage,
    NotConnectedError,
    OnConnect,
    PayloadTooLarge,
    TransportClosed,
    TransportError,
    TransportStatistics,
    TransportTimeout,
    validate_filter,
    validate_qos,
    validate_topic,
)
from edgefl.transport.config import BrokerUrl, MqttConfig, MqttProtocol

log = logging.getLogger("edgefl.transport")

_DISCONNECT_GRACE = 2.0
"""A graceful close waits at most this long for the broker (ping barrier, then DISCONNECT)."""
_BARRIER_GRACE = 1.0
"""Of which at most this long for the PINGRESP of the ping barrier."""
_UNSUPPORTED_PROTOCOL = "Unsupported protocol version"


class _PendingPublish(NamedTuple):
    """A QoS 0/1 publish waiting for paho's ``on_publish`` (PUBACK for QoS 1)."""

    done: asyncio.Future[None]
    size: int  # payload bytes, for the statistics


class _Subscription(NamedTuple):
    """The SUBSCRIBE that carries one filter in connection ``generation``: ``suback`` resolves
    to the broker's reason codes, of which this filter's is at ``position``."""

    generation: int
    suback: asyncio.Future[list[ReasonCode]]
    position: int
    qos: int


@dataclasses.dataclass
class _Nodes:
    """The broker URLs of a cluster (``MqttConfig.endpoints``) and where the rotation stands:
    ``current`` is the index of the current or next connection attempt, ``connected`` the node
    of the last successful connection (a change counts as a failover)."""

    urls: tuple[BrokerUrl, ...]
    current: int = 0
    connected: int | None = None

    @property
    def url(self) -> BrokerUrl:
        return self.urls[self.current]


@dataclasses.dataclass
class _SessionState:
    """What the current connection established (generation counts connections)."""

    gen: int = 0
    connected: bool = False
    session_present: bool = False
    server_max_packet: int | None = None
    rm_bounds_qos1: bool = False  # the broker honours Receive Maximum for QoS 1
    unacked_paused: bool = False  # reading paused: too many delivered messages unacknowledged


@dataclasses.dataclass
class _AttemptState:
    """One connection attempt: the CONNACK and the loss of its socket, the connect thread."""

    connack: asyncio.Future[tuple[ReasonCode, bool]] | None = None
    attempt_lost: asyncio.Future[str] | None = None
    connect_job: ConnectJob[MQTTErrorCode] | None = None
    in_executor: bool = False


@dataclasses.dataclass
class _Lifecycle:
    """Closing: requested, announced (event), done; draining for the close barrier."""

    closing: bool = False
    closing_event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    closed: bool = False
    draining: bool = False  # graceful close: reading for the barrier, inbound discarded


@dataclasses.dataclass
class _Operations:
    """Operations in flight and the wanted subscriptions (renewed after every reconnect)."""

    pending_pubs: dict[int, _PendingPublish] = dataclasses.field(default_factory=dict)
    pending_qos0: set[int] = dataclasses.field(default_factory=set)
    pending_subs: dict[int, asyncio.Future[list[ReasonCode]]] = dataclasses.field(
        default_factory=dict
    )
    sub_state: dict[str, _Subscription] = dataclasses.field(default_factory=dict)
    subscriptions: dict[str, int] = dataclasses.field(default_factory=dict)
    unacked: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    tokens: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))


@dataclasses.dataclass
class _Tasks:
    """The transport's background tasks."""

    supervisor: asyncio.Task[None] | None = None
    misc_task: asyncio.Task[None] | None = None
    hook_task: asyncio.Task[None] | None = None


class _ConnectionLost(Exception):
    """Internal: the connection an operation was waiting on went away."""


class _Attempt(Enum):
    CONNECTED = 1
    RETRY_NOW = 2
    FAILED = 3


def _close_quietly(client: mqtt.Client) -> None:
    """Close the socket an abandoned connect opened (no DISCONNECT, no paho callbacks)."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Done-callback that marks a future's exception as retrieved (nobody may await it)."""
    if not fut.cancelled():
        fut.exception()


class MqttTransport(AsyncLifecycle):
    """The :class:`~edgefl.transport.base.Transport` over a real MQTT broker.

    Use as ``async with MqttTransport(config) as transport:``. ``__aenter__`` waits up to
    ``config.start_timeout`` for the first connection and raises :class:`BrokerUnreachable`
    if none came up. Cancelling it, or closing the transport from another task, returns
    promptly, even while a TCP/TLS/WebSocket connect hangs. Afterwards the transport reconnects
    on its own until closed. ``on_connect`` runs after every (re)connection (it is cancelled if that
    connection drops before it finishes).
    """

    def __init__(self, config: MqttConfig, *, on_connect: OnConnect | None = None) -> None:
        self._config = config
        self._client_id = config.client_id or f"edgefl-{secrets.token_hex(6)}"
        self._on_connect_hook = on_connect
        self._ssl_context = ssl_context(config) if config.tls else None
        self._counters = Counters()
        self._inbound = InboundQueue(
            config.flow.max_queued_messages,
            config.flow.backpressure,
            self._counters,
            pause=self._pause_reading,
            resume=self._resume_reading,
        )
        # protocol: fixed, or negotiated once (auto) and then kept
        self._protocol: MqttProtocol | None = (
            None if config.protocol is MqttProtocol.AUTO else config.protocol
        )
        self._try_protocol = (
            MqttProtocol.V311 if config.protocol is MqttProtocol.V311 else (MqttProtocol.V5)
        )
        self._nodes = _Nodes(config.endpoints)
        self._client: BufferedClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state_changed = asyncio.Event()
        self._pong = asyncio.Event()
        self._io: SocketDriver | None = None
        self._session = _SessionState()
        self._attempt_state = _AttemptState()
        self._life = _Lifecycle()
        self._ops = _Operations()
        self._tasks = _Tasks()

    # ------------------------------------------------------------------ public API

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def config(self) -> MqttConfig:
        return self._config

    @property
    def connected(self) -> bool:
        return self._session.connected

    async def open(self) -> None:
        """:meth:`start`, then wait ``config.start_timeout`` (if set) for the first connection;
        closes again if it does not come (``async with`` calls this)."""
        await self.start()
        if self._config.timing.start_timeout is not None:
            try:
                await self.wait_connected(self._config.timing.start_timeout)
            except BaseException:
                await self.close()
                raise

    async def start(self) -> None:
        """Start connecting in the background (``__aenter__`` calls this)."""
        if self._tasks.supervisor is not None:
            raise RuntimeError("transport already started")
        if self._life.closing:
            raise TransportClosed("transport closed")
        self._loop = asyncio.get_running_loop()
        self._tasks.supervisor = self._loop.create_task(
            self._supervise(), name=f"edgefl-mqtt-{self._client_id}"
        )

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until connected: :class:`BrokerUnreachable` (a :class:`NotConnectedError`)
        after ``timeout`` seconds; :class:`TransportClosed` as soon as the transport is closed
        (e.g. by another task while this one waits)."""
        try:
            async with asyncio.timeout(timeout):
                await self._wait_connected()
        except TimeoutError:
            raise BrokerUnreachable(self._config.urls, self._counters.last_error, timeout) from None

    async def close(self, *, abrupt: bool = False) -> None:
        """Close the transport. Graceful: send DISCONNECT (the broker discards the Will).
        ``abrupt=True`` drops the TCP connection instead, so the broker publishes the Will (the
        same as a crash). Pending operations fail with :class:`TransportClosed`; queued inbound
        messages are counted as ``unconsumed_at_close``."""
        if self._life.closed or self._life.closing:
            if self._tasks.supervisor is not None and not self._life.closed:
                await asyncio.shield(self._tasks.supervisor)
            return
        graceful = not abrupt and self._session.connected and self._client is not None
        self._life.closing = True
        self._life.closing_event.set()
        self._notify()
        if self._attempt_state.in_executor:
            self._abandon_connect()
        elif not graceful:
            self._drop_socket("closed abruptly" if abrupt else "closed")
        else:
            try:
                async with asyncio.timeout(_DISCONNECT_GRACE):
                    await self._disconnect_gracefully()
            except TimeoutError:
                log.info("%s: no answer from the broker while closing", self._client_id)
            self._drop_socket("closed")
        try:
            if self._tasks.supervisor is not None:
                await asyncio.shield(self._tasks.supervisor)  # survives the cancellation of a hook
        finally:
            self._finish_close()

    async def _disconnect_gracefully(self) -> None:
        """Ping barrier, then DISCONNECT and wait until paho wrote it (bounded by the caller)."""
        client, lost = self._client, self._attempt_state.attempt_lost
        assert client is not None
        # Read for the PINGRESP even when the inbound queue paused reading; what arrives from
        # now on is not queued (counted as unconsumed_at_close, redelivered to a persistent
        # session since it is not acknowledged).
        self._life.draining = True
        if self._io is not None:
            self._io.resume_reading()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_BARRIER_GRACE):
                target = client.ping()
                if self._io is not None:
                    self._io.flush()
                while client.pings_answered < target and client is self._client:
                    if lost is not None and lost.done():
                        break
                    self._pong.clear()
                    await self._pong.wait()
        if lost is None or lost.done() or client is not self._client:
            return
        client.disconnect()
        await asyncio.shield(lost)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """See :meth:`Transport.publish`. Waits for a connection while disconnected; QoS 1
        retransmits across reconnects until the PUBACK. Bounded by ``operation_timeout``."""
        validate_topic(topic)
        validate_qos(qos)
        data = bytes(payload)
        self._check_size(topic, data, None)
        handed_over = False
        try:
            async with asyncio.timeout(self._config.timing.operation_timeout):
                while True:
                    await self._wait_connected()
                    client = self._client
                    assert client is not None
                    self._check_size(topic, data, self._session.server_max_packet)
                    info = client.publish(topic, data, qos=qos, retain=retain)
                    if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                        raise TransportError("outbound queue full")
                    if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
                        await asyncio.sleep(0.01)
                        continue
                    fut: asyncio.Future[None] = self._running_loop().create_future()
                    self._ops.pending_pubs[info.mid] = _PendingPublish(fut, len(data))
                    if qos == 0:
                        self._ops.pending_qos0.add(info.mid)
                    handed_over = qos > 0
                    try:
                        await fut
                    except _ConnectionLost:
                        continue  # QoS 0 packet discarded with the connection: send again
                    return
        except TimeoutError as exc:
            if isinstance(exc, TransportTimeout):
                raise
            timeout = self._config.timing.operation_timeout
            if handed_over:
                raise AckTimeout(f"no PUBACK for {topic!r} within {timeout}s") from None
            raise NotConnectedError(self._not_connected_message(timeout)) from None

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """See :meth:`Transport.subscribe`; the filter is renewed after every reconnect."""
        validate_filter(topic_filter)
        validate_qos(qos)
        self._ops.subscriptions[topic_filter] = qos
        try:
            async with asyncio.timeout(self._config.timing.operation_timeout):
                while True:
                    await self._wait_connected()
                    entry = self._ops.sub_state.get(topic_filter)
                    if entry is None or entry.generation != self._session.gen or entry.qos != qos:
                        self._send_subscribe({topic_filter: qos})
                        entry = self._ops.sub_state[topic_filter]
                    try:
                        codes = await asyncio.shield(entry.suback)
                    except _ConnectionLost:
                        continue
                    index = entry.position
                    code = codes[index] if index < len(codes) else None
                    if code is None or code.is_failure:
                        self._ops.subscriptions.pop(topic_filter, None)
                        raise BrokerRefused(f"subscribe {topic_filter!r}", str(code))
                    return
        except TimeoutError as exc:
            if isinstance(exc, TransportTimeout):
                raise
            raise NotConnectedError(
                f"subscription {topic_filter!r} not granted within "
                f"{self._config.timing.operation_timeout}s"
            ) from None

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """Inbound messages until the transport is closed. Several consumers share one queue.
        Without ``manual_ack`` a QoS 1 message is acknowledged here, as it is handed out."""
        while True:
            try:
                message = await self._inbound.get()
            except TransportClosed:
                return
            if message.ack_token and not self._config.manual_ack:
                self._send_ack(message.ack_token)
                message = dataclasses.replace(message, ack_token=0)
            yield message

    async def ack(self, message: InboundMessage) -> None:
        """PUBACK ``message`` now (``manual_ack``; otherwise a no-op). Idempotent; an ack for a
        delivery of an earlier connection is not sent (counted as ``stale_acks``: the broker
        redelivers it to a persistent session)."""
        if message.ack_token:
            self._send_ack(message.ack_token)

    async def ack_many(self, messages: Iterable[InboundMessage]) -> None:
        """:meth:`ack` each message; the PUBACKs go to the kernel together, after the last
        (one write wake-up instead of one per message)."""
        for message in messages:
            if message.ack_token:
                self._send_ack(message.ack_token, flush=False)
        if self._io is not None:
            self._io.flush()

    def statistics(self) -> TransportStatistics:
        return self._counters.snapshot(
            connected=self._session.connected,
            protocol=self._protocol.value if self._protocol else None,
            queued=len(self._inbound),
            broker_url=self._node_url,
        )

    @property
    def _node_url(self) -> str:
        """The node of the current or next connection attempt (no credentials)."""
        return self._nodes.url.display_url

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        cfg = self._config
        backoff = Backoff(cfg.timing.reconnect_min_delay, cfg.timing.reconnect_max_delay)
        failed_in_row = 0  # failed attempts since the last connection (for the node list)
        try:
            while not self._life.closing:
                try:
                    outcome = await self._attempt()
                    if outcome is _Attempt.CONNECTED:
                        failed_in_row = 0
                        connected_at = time.monotonic()
                        try:
                            await self._serve_connection()
                        finally:
                            backoff.connection_ended(time.monotonic() - connected_at)
                except Exception:  # never let the supervisor die: that would strand the transport
                    log.exception("%s: connection supervisor error", self._client_id)
                    self._drop_socket("supervisor error")
                    outcome = _Attempt.FAILED
                if self._life.closing:
                    break
                if outcome is _Attempt.RETRY_NOW:
                    continue
                if outcome is _Attempt.FAILED and len(self._nodes.urls) > 1:
                    # a node list: the next node at once; back off once all failed in a row
                    self._nodes.current = (self._nodes.current + 1) % len(self._nodes.urls)
                    failed_in_row += 1
                    if failed_in_row % len(self._nodes.urls):
                        log.info("%s: trying the next node, %s", self._client_id, self._node_url)
                        continue
                pause = backoff.pause()
                log.debug("%s: reconnecting in %.2fs", self._client_id, pause)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._life.closing_event.wait()
        finally:
            if not self._attempt_state.in_executor:
                self._drop_socket("transport closed")

    async def _attempt(self) -> _Attempt:
        """One connection attempt: TCP/TLS in the executor, then wait for the CONNACK."""
        loop = self._running_loop()
        proto = self._try_protocol
        client = self._client_for(proto)
        client.aim(self._nodes.url)
        self._attempt_state.attempt_lost = loop.create_future()
        connack = self._attempt_state.connack = loop.create_future()
        connack.add_done_callback(_consume)
        failed = await self._send_connect(loop, client)
        if failed is not None:
            return failed
        return await self._await_connack(proto, connack)

    async def _send_connect(
        self, loop: asyncio.AbstractEventLoop, client: BufferedClient
    ) -> _Attempt | None:
        """Open the socket and send CONNECT in the executor (abandonable on close); ``None``
        when CONNECT is on its way, else the failed attempt (recorded)."""
        self._attempt_state.in_executor = True
        self._attempt_state.connect_job = ConnectJob(
            loop,
            client.reconnect,
            lambda: _close_quietly(client),
            name=f"edgefl-connect-{self._client_id}",
        )
        try:
            rc = await self._attempt_state.connect_job.result()
        except ConnectAbandoned:
            return _Attempt.FAILED
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS/certificate errors
            self._record_failure(f"cannot connect to {self._node_url}: {exc}")
            return _Attempt.FAILED
        except Exception as exc:
            log.exception("%s: unexpected error while connecting", self._client_id)
            self._record_failure(f"cannot connect to {self._node_url}: {exc!r}")
            return _Attempt.FAILED
        except asyncio.CancelledError:
            self._abandon_connect()  # the job closes its socket; this client is done
            raise
        finally:
            self._attempt_state.in_executor = False
            self._attempt_state.connect_job = None
        if self._life.closing:
            self._drop_socket("transport closed")
            return _Attempt.FAILED
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._drop_socket(f"CONNECT not sent: {rc}")
            self._record_failure(f"cannot send CONNECT to {self._node_url}: {rc}")
            return _Attempt.FAILED
        return None

    async def _await_connack(
        self, proto: MqttProtocol, connack: asyncio.Future[tuple[ReasonCode, bool]]
    ) -> _Attempt:
        """Wait for the broker's CONNACK to the CONNECT of ``proto``; fall back to 3.1.1 when
        the protocol is still being probed and the broker refuses or ignores MQTT 5."""
        # auto, protocol still unknown: amqtt answers a bare MQTT 5 CONNECT with "unsupported
        # protocol version" but ignores one that carries properties, so silence means 3.1.1 too
        probing = self._protocol is None and proto is MqttProtocol.V5
        timeout = self._config.timing.connect_timeout
        if probing:
            timeout = min(timeout, self._config.timing.protocol_probe_timeout)
        try:
            async with asyncio.timeout(timeout):
                reason, _ = await asyncio.shield(connack)
        except TimeoutError:
            return self._no_connack(proto, probing, timeout)
        except _ConnectionLost as exc:
            if self._life.closing:
                return _Attempt.FAILED
            self._record_failure(f"{self._node_url} closed the connection before CONNACK: {exc}")
            self._maybe_fall_back(proto)
            return _Attempt.FAILED
        if reason.is_failure:
            if reason == _UNSUPPORTED_PROTOCOL and self._maybe_fall_back(proto):
                log.info("%s: broker refused MQTT %s, trying 3.1.1", self._client_id, proto.value)
                return _Attempt.RETRY_NOW
            self._record_failure(f"{self._node_url} refused the connection: {reason}")
            return _Attempt.FAILED
        return _Attempt.CONNECTED

    def _no_connack(self, proto: MqttProtocol, probing: bool, timeout: float) -> _Attempt:
        """No CONNACK within ``timeout``: retry at once with 3.1.1 when probing MQTT 5."""
        self._drop_socket("no CONNACK")
        if self._life.closing:
            return _Attempt.FAILED
        if probing and self._maybe_fall_back(proto):
            log.info("%s: no CONNACK for MQTT 5 in %.1fs, trying 3.1.1", self._client_id, timeout)
            return _Attempt.RETRY_NOW
        self._record_failure(f"no CONNACK from {self._node_url} (MQTT {proto.value})")
        self._maybe_fall_back(proto)
        return _Attempt.FAILED

    def _abandon_connect(self) -> None:
        """Stop waiting for the blocking connect (closing): the job's thread closes its socket
        when it returns; this client and its socket driver are never used again."""
        if self._attempt_state.connect_job is not None:
            self._attempt_state.connect_job.abandon()
        if self._io is not None:
            self._io.detach()
        self._io = None
        self._client = None
        self._handle_lost("connection attempt abandoned")

    def _maybe_fall_back(self, proto: MqttProtocol) -> bool:
        """``auto`` before the first connection: alternate 5 -> 3.1.1 -> 5 ... True if switched."""
        if self._protocol is not None:
            return False
        self._try_protocol = MqttProtocol.V311 if proto is MqttProtocol.V5 else MqttProtocol.V5
        return proto is MqttProtocol.V5

    async def _serve_connection(self) -> None:
        """Run while connected: keepalive task, on_connect hook; return when the link drops."""
        client = self._client
        lost = self._attempt_state.attempt_lost
        assert client is not None
        assert lost is not None
        assert self._protocol is not None
        loop = self._running_loop()
        log.info(
            "%s: connected to %s (MQTT %s, session present: %s)",
            self._client_id,
            self._node_url,
            self._protocol.value,
            self._session.session_present,
        )
        self._tasks.misc_task = loop.create_task(self._misc_loop(client))
        if self._on_connect_hook is not None:
            info = ConnectInfo(
                session_present=self._session.session_present,
                protocol=self._protocol.value,
                connects=self._counters.connects,
            )
            self._tasks.hook_task = loop.create_task(self._run_hook(info))
        try:
            reason = await lost
        finally:
            for task in (self._tasks.misc_task, self._tasks.hook_task):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self._tasks.misc_task = self._tasks.hook_task = None
        if not self._life.closing:
            log.warning("%s: connection to %s lost: %s", self._client_id, self._node_url, reason)

    async def _run_hook(self, info: ConnectInfo) -> None:
        assert self._on_connect_hook is not None
        try:
            await self._on_connect_hook(info)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: on_connect hook failed", self._client_id)

    async def _misc_loop(self, client: mqtt.Client) -> None:
        while client is self._client:
            await asyncio.sleep(1.0)
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # ------------------------------------------------------------------ paho client

    def _client_for(self, proto: MqttProtocol) -> BufferedClient:
        """The paho client for ``proto`` (a new one, with its socket driver, on a switch)."""
        want = (
            MQTTProtocolVersion.MQTTv5
            if proto is MqttProtocol.V5
            else (MQTTProtocolVersion.MQTTv311)
        )
        if self._client is not None and self._client.protocol == want:
            return self._client
        if self._io is not None:
            self._io.closed = True
        client = make_client(
            self._config, self._client_id, proto, self._ssl_context, self._receive_maximum()
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_pingresp = self._pong.set
        self._io = SocketDriver(self._running_loop(), client, self._drop_socket)
        self._client = client
        return client

    # paho callbacks: on the loop thread (inside loop_read/loop_write/loop_misc)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._bump()
        if client is not self._client:
            return
        if not reason.is_failure:
            self._session.gen += 1
            self._session.connected = True
            self._session.session_present = bool(flags.session_present)
            self._protocol = self._try_protocol
            self._counters.connects += 1
            nodes = self._nodes
            if nodes.connected is not None and nodes.connected != nodes.current:
                self._counters.failovers += 1
            nodes.connected = nodes.current
            self._session.rm_bounds_qos1 = (
                client.protocol == MQTTProtocolVersion.MQTTv5
                and self._receive_maximum() <= self._config.flow.max_queued_messages
            )
            self._session.server_max_packet = getattr(properties, "MaximumPacketSize", None)
            if self._ops.subscriptions:
                self._send_subscribe(dict(self._ops.subscriptions), renewal=True)
            self._notify()
        if self._attempt_state.connack is not None and not self._attempt_state.connack.done():
            self._attempt_state.connack.set_result((reason, bool(flags.session_present)))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is self._client:
            origin = "broker" if flags.is_disconnect_packet_from_server else "client"
            self._handle_lost(f"{reason} ({origin})")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._bump()
        if self._life.draining:  # closing: not acknowledged, so a persistent session gets it again
            self._counters.drop(DropReason.UNCONSUMED_AT_CLOSE)
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._counters.drop(DropReason.INVALID_TOPIC)
            if msg.qos == 1:
                client.ack(msg.mid, 1)
            return
        token = 0
        if msg.qos == 1:
            token = next(self._ops.tokens)
            self._ops.unacked[token] = (self._session.gen, msg.mid)
            if self._config.manual_ack and len(self._ops.unacked) >= self._receive_maximum():
                # Our Receive Maximum, enforced here too: Mosquitto 2.0 was measured with 175
                # unacknowledged messages in flight to a client whose maximum was 81
                if not self._session.unacked_paused:
                    self._session.unacked_paused = True
                    self._counters.read_pauses += 1
                self._pause_reading()
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        message = InboundMessage(topic, payload, msg.qos, bool(msg.retain), bool(msg.dup), token)
        # QoS 1 inflow is bounded by our Receive Maximum on MQTT 5: pausing the socket for it
        # would only starve paho's keepalive (it could not read the PINGRESP)
        rm_bounded = token != 0 and self._session.rm_bounds_qos1
        if not self._inbound.offer(message, may_pause=not rm_bounded) and token:
            # dropped (and counted): acknowledge so the broker does not hold it in flight forever
            del self._ops.unacked[token]
            client.ack(msg.mid, 1)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._bump()
        if client is not self._client:
            return
        self._ops.pending_qos0.discard(mid)
        entry = self._ops.pending_pubs.pop(mid, None)
        if entry is None:
            return
        fut, size = entry
        if reason.is_failure:
            if not fut.done():
                fut.set_exception(BrokerRefused("publish", str(reason)))
            return
        self._counters.published += 1
        self._counters.published_bytes += size
        if not fut.done():
            fut.set_result(None)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._bump()
        fut = self._ops.pending_subs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(list(reason_codes))

    def _drop_socket(self, reason: str) -> None:
        """Close the connection without DISCONNECT (the broker will publish the Will)."""
        if self._io is not None:
            self._io.close_socket()
        self._handle_lost(reason)

    def _handle_lost(self, reason: str) -> None:
        """The current connection (or attempt) is gone: update state, fail what waited on it."""
        self._session.connected = False
        self._session.server_max_packet = None
        if (
            self._attempt_state.attempt_lost is not None
            and not self._attempt_state.attempt_lost.done()
        ):
            self._attempt_state.attempt_lost.set_result(reason)
        if self._attempt_state.connack is not None and not self._attempt_state.connack.done():
            self._attempt_state.connack.set_exception(_ConnectionLost(reason))
        subs, self._ops.pending_subs = self._ops.pending_subs, {}
        for fut in subs.values():
            if not fut.done():
                fut.set_exception(_ConnectionLost(reason))
        for mid in self._ops.pending_qos0:
            entry = self._ops.pending_pubs.pop(mid, None)
            if entry is not None and not entry.done.done():
                entry.done.set_exception(_ConnectionLost(reason))
        self._ops.pending_qos0.clear()
        self._notify()

    # ------------------------------------------------------------------ helpers

    def _pause_reading(self) -> None:
        if self._io is not None and not self._life.draining:
            self._io.pause_reading()

    def _resume_reading(self) -> None:
        if self._io is not None and not self._session.unacked_paused:
            self._io.resume_reading()

    def _bump(self) -> None:
        if self._io is not None:
            self._io.progress += 1

    def _receive_maximum(self) -> int:
        return self._config.flow.receive_maximum or min(
            self._config.flow.max_queued_messages, 65535
        )

    def _send_ack(self, token: int, *, flush: bool = True) -> None:
        entry = self._ops.unacked.pop(token, None)
        if entry is None:
            return
        if (
            self._session.unacked_paused
            and len(self._ops.unacked) <= self._receive_maximum() * 3 // 4
        ):
            self._session.unacked_paused = False
            if not self._inbound.paused:
                self._resume_reading()
        gen, mid = entry
        client = self._client
        if gen != self._session.gen or not self._session.connected or client is None:
            self._counters.stale_acks += 1
            return
        client.ack(mid, 1)
        self._counters.acked += 1
        if flush and self._io is not None:
            self._io.flush()  # hand the PUBACK to the kernel now, not on the next loop turn

    def _send_subscribe(self, filters: dict[str, int], *, renewal: bool = False) -> None:
        client = self._client
        assert client is not None
        fut: asyncio.Future[list[ReasonCode]] = self._running_loop().create_future()
        fut.add_done_callback(_consume)
        items = list(filters.items())
        if client.protocol == MQTTProtocolVersion.MQTTv5:
            # retained messages only for a subscription the broker does not already have
            rh = SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            rc, mid = client.subscribe(
                [(f, SubscribeOptions(qos=q, retainHandling=rh)) for f, q in items]
            )
        else:
            rc, mid = client.subscribe(items)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            fut.set_exception(_ConnectionLost(f"SUBSCRIBE not sent: {rc}"))
        else:
            self._ops.pending_subs[mid] = fut
        for index, (topic_filter, qos) in enumerate(items):
            self._ops.sub_state[topic_filter] = _Subscription(self._session.gen, fut, index, qos)
        if renewal:
            names = [name for name, _ in items]
            fut.add_done_callback(lambda done: self._log_refusals(done, names))

    def _log_refusals(self, fut: asyncio.Future[list[ReasonCode]], filters: list[str]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for topic_filter, code in zip(filters, fut.result(), strict=False):
            if code.is_failure:
                log.error(
                    "%s: broker refused subscription %r: %s", self._client_id, topic_filter, code
                )

    def _check_size(self, topic: str, payload: bytes, server_limit: int | None) -> None:
        limits = [x for x in (self._config.flow.max_packet_size, server_limit) if x]
        if not limits:
            return
        # fixed header (<= 5) + topic (2 + n) + packet id (2) + empty properties (1) + payload
        size = 5 + 2 + len(topic.encode("utf-8")) + 2 + 1 + len(payload)
        if size > min(limits):
            raise PayloadTooLarge(
                f"{size}-byte packet for {topic!r} exceeds the maximum packet size {min(limits)}"
            )

    async def _wait_connected(self) -> None:
        if self._tasks.supervisor is None and not self._life.closing:
            raise RuntimeError("transport not started: use `async with` or start()")
        while True:
            if self._life.closing:
                raise TransportClosed("transport closed")
            if self._session.connected:
                return
            await self._state_changed.wait()

    def _notify(self) -> None:
        event, self._state_changed = self._state_changed, asyncio.Event()
        event.set()

    def _record_failure(self, message: str) -> None:
        self._counters.connect_failures += 1
        self._counters.last_error = message
        log.info("%s: %s", self._client_id, message)

    def _not_connected_message(self, timeout: float | None) -> str:
        last = self._counters.last_error
        return f"not connected to {self._config.urls} within {timeout}s" + (
            f" (last error: {last})" if last else ""
        )

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("transport not started")
        return self._loop

    def _finish_close(self) -> None:
        self._life.closed = True
        if self._io is not None:
            self._io.closed = True
        closed = TransportClosed("transport closed")
        for fut, _ in self._ops.pending_pubs.values():
            if not fut.done():
                fut.set_exception(closed)
        self._ops.pending_pubs.clear()
        self._ops.pending_qos0.clear()
        for sub_fut in self._ops.pending_subs.values():
            if not sub_fut.done():
                sub_fut.set_exception(closed)
        self._ops.pending_subs.clear()
        self._ops.unacked.clear()
        self._inbound.close()
        self._notify()
