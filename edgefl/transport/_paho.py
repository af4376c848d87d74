"""paho-mqtt 2.x plumbing for :class:`~edgefl.transport.mqtt.MqttTransport`.

* :func:`make_client` builds a paho ``Client`` from an :class:`MqttConfig` (protocol, session,
  Will, TLS, CONNECT properties). paho always runs with ``manual_ack=True``: the transport decides
  when a QoS 1 message is acknowledged.
* :class:`SocketDriver` runs that client's socket on an asyncio loop without a network thread:
  paho's socket callbacks register the socket with ``add_reader``/``add_writer``, readiness calls
  ``loop_read``/``loop_write``. paho calls ``on_socket_open`` and ``on_socket_register_write``
  from whichever thread runs ``Client.reconnect`` (the transport runs it in the executor because
  it blocks on TCP connect and TLS handshake); those two hop to the loop thread. The transport
  never lets paho *close* a socket off the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefl.transport.config import BrokerUrl, MqttConfig, MqttProtocol

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = logging.getLogger("edgefl.transport")
paho_log = logging.getLogger("edgefl.transport.paho")

_MAX_PACKETS_PER_WAKEUP = 64
_READ_SIZE = 256 * 1024  # bytes asked of the socket per recv: several update packets at once
# websockets only, see SocketDriver._arm_nudge: PINGREQs sent at once when a packet stalls; the
# first after _STALL_S without new bytes, then every _NUDGE_S while each nudge brought bytes
_NUDGE_BURST = 8
_STALL_S = 0.05
_NUDGE_S = 0.002

# The private paho members BufferedClient and WebSocketConnection rely on (paho-mqtt is pinned
# to the tested minor, 2.2). Checked once at import: a paho without any of them gets the plain
# paho paths (slower, and without the WebSocket send fix and the close barrier), with a warning.
_CLIENT_METHODS = (
    "_sock_recv",
    "_handle_publish",
    "_send_pingreq",
    "_handle_pingresp",
    "_create_socket",
    "_handle_on_message",
    "_call_socket_register_write",
    "_sock_close",
)
_CLIENT_STATE = ("_in_packet", "_sock", "_manual_ack", "_protocol")
_WRAPPER_CLASS_MEMBERS = ("_create_frame", "OPCODE_BINARY", "send", "write")
_WRAPPER_STATE = ("_sendbuffer", "_socket", "_requested_size")


def missing_paho_internals(module: Any = mqtt) -> tuple[str, ...]:
    """The private members of paho's ``module`` (``paho.mqtt.client``) that the fast paths use
    and this paho lacks; empty when all are there."""
    client = getattr(module, "Client", None)
    if client is None:
        return ("Client",)
    missing = [f"Client.{n}" for n in _CLIENT_METHODS if not callable(getattr(client, n, None))]
    try:
        probe = client(CallbackAPIVersion.VERSION2)
    except Exception as exc:  # a paho whose constructor changed: nothing can be relied on
        return (*missing, f"Client(): {exc!r}")
    missing += [f"Client().{n}" for n in _CLIENT_STATE if not hasattr(probe, n)]
    wrapper = getattr(module, "_WebsocketWrapper", None)
    if wrapper is None:
        return (*missing, "_WebsocketWrapper")
    missing += [f"_WebsocketWrapper.{n}" for n in _WRAPPER_CLASS_MEMBERS if not hasattr(wrapper, n)]
    assigned = getattr(getattr(wrapper, "__init__", None), "__code__", None)
    names = set(assigned.co_names) if assigned is not None else set()
    missing += [f"_WebsocketWrapper().{n}" for n in _WRAPPER_STATE if n not in names]
    for name in ("MQTTMessage", "time_func", "MQTTv5"):
        if not hasattr(module, name):
            missing.append(name)
    return tuple(missing)


def fast_path_available(missing: tuple[str, ...]) -> bool:
    """True when nothing is missing; otherwise warn once (naming what is missing) and fall back
    to the plain paho client: the fast paths are an optimisation, never a requirement."""
    if missing:
        log.warning(
            "paho-mqtt %s lacks %s: using paho's plain read/write paths (slower; edgefl is "
            "tested with paho-mqtt 2.2)",
            getattr(mqtt, "__version__", "?"),
            ", ".join(missing),
        )
    return not missing


FAST_PATH: bool = fast_path_available(missing_paho_internals())


class BufferedClient(mqtt.Client):
    """A paho ``Client`` with a cheaper inbound path; everything else is paho's.

    * **Buffered reads.** paho reads each packet with one ``recv`` for the command byte, one per
      byte of the remaining length and one or more for the body. Here one ``recv`` of up to
      ``_READ_SIZE`` bytes feeds many packets, and paho's reads are served from it as
      memoryview slices of that (immutable) buffer, without copying.
    * **QoS 1 PUBLISH with manual acknowledgement and no properties** (every update a device
      sends) is decoded in place: paho's decoder copies the payload three times through
      ``struct.unpack`` and builds a ``Properties`` object per message. Anything else (QoS 0/2,
      automatic acks, MQTT 5 properties present, an empty MQTT 3 topic) goes to paho's decoder.

    Measured on a socketpair with 90 kB PUBLISH packets: 240 -> ~60 us per message (MQTT 5).
    Relies on private paho 2.x methods, ``_sock_recv``, ``_handle_publish``, ``_send_pingreq``
    and ``_handle_pingresp`` (paho is pinned below 3); the transport's integration tests run
    through all of them, over TCP, TLS and WebSockets. Over ``ws://``/``wss://`` paho's
    ``_WebsocketWrapper`` is the socket: its ``recv`` returns (part of) one WebSocket frame's
    payload per call, which the buffered read serves exactly like a TCP read.
    * **WebSockets.** The wrapper paho builds for ``ws://``/``wss://`` becomes a
      :class:`WebSocketConnection` (paho's own loses data when a frame is sent in parts).
    * **Ping barrier.** :meth:`ping` sends a PINGREQ and counts the PINGRESPs, so a graceful
      close can wait until the broker processed everything sent before it (acknowledgements).
    """

    fast_path: bool = FAST_PATH
    """Whether the overrides below are used (False: every call goes to paho's own code)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = memoryview(b"")
        self._rpos = 0
        self._rsock: object | None = None
        self.pings_sent = 0
        self.pings_answered = 0
        self.on_pingresp: Callable[[], None] | None = None
        """Called (on the reading thread) after every PINGRESP."""

    def aim(self, node: BrokerUrl) -> None:
        """Point the next ``reconnect()`` at ``node`` (another node of a clustered broker).
        Only between connections: paho's ``host`` setter refuses while a socket is open, and
        this is called before each attempt, when none is. The client's session state
        (unacknowledged QoS 1 messages, retransmitted after the CONNACK) stays."""
        self._host, self._port = node.host, node.port
        if node.websocket_path is not None:
            self._websocket_path = node.websocket_path

    def ping(self) -> int:
        """Send a PINGREQ now (keepalive ones are sent by ``loop_misc``); returns the value
        ``pings_answered`` reaches once the broker answered it. A broker handles the packets of
        a connection in order, so that answer proves it processed all that was sent before."""
        if not self.fast_path:
            raise ConnectionError("no ping barrier with this paho version")
        if self._send_pingreq() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError("PINGREQ not sent: not connected")
        return self.pings_sent

    def _send_pingreq(self) -> MQTTErrorCode:
        rc = super()._send_pingreq()
        if self.fast_path and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.pings_sent += 1
        return rc

    def _handle_pingresp(self) -> MQTTErrorCode:
        rc = super()._handle_pingresp()
        if self.fast_path and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.pings_answered += 1
            if self.on_pingresp is not None:
                self.on_pingresp()
        return rc

    def _create_socket(self) -> SocketLike:
        sock = super()._create_socket()
        if self.fast_path and type(sock) is mqtt._WebsocketWrapper:  # noqa: SLF001 (fenced, see FAST_PATH)
            sock.__class__ = WebSocketConnection
        return sock

    def buffered_bytes(self) -> int:
        """Bytes received from the socket that paho has not consumed yet."""
        if self._rsock is not self._sock:
            return 0
        return len(self._rbuf) - self._rpos

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.fast_path:
            return super()._sock_recv(bufsize)
        sock = self._sock
        if sock is None:
            raise ConnectionError("self._sock is None")
        if self._rsock is not sock or self._rpos >= len(self._rbuf):
            try:
                data = sock.recv(max(bufsize, _READ_SIZE))
            except ssl.SSLWantReadError as err:
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                self._call_socket_register_write()
                raise BlockingIOError() from err
            if not data:
                return data
            self._rbuf, self._rpos, self._rsock = memoryview(data), 0, sock
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        # paho only indexes, measures and appends what it gets: a view does (typed as bytes)
        return self._rbuf[start : self._rpos]  # type: ignore[return-value]

    def _handle_publish(self) -> MQTTErrorCode:
        if not self.fast_path:
            return super()._handle_publish()
        header = self._in_packet["command"]
        if (header & 0x06) >> 1 != 1 or not self._manual_ack:
            return super()._handle_publish()
        with memoryview(self._in_packet["packet"]) as view:
            size = len(view)
            topic_end = 2 + ((view[0] << 8) | view[1]) if size >= 2 else size + 1
            pos = topic_end + 2
            v5 = self._protocol == mqtt.MQTTv5
            if (
                pos + (1 if v5 else 0) > size
                or (not v5 and topic_end == 2)
                or (v5 and view[pos] != 0)  # properties present
            ):
                return super()._handle_publish()
            message = mqtt.MQTTMessage(
                mid=(view[topic_end] << 8) | view[topic_end + 1], topic=bytes(view[2:topic_end])
            )
            message.payload = bytes(view[pos + (1 if v5 else 0) :])
        message.dup = bool(header & 0x08)
        message.qos = 1
        message.retain = bool(header & 0x01)
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


if TYPE_CHECKING:
    _WebsocketWrapper = mqtt._WebsocketWrapper  # noqa: SLF001 (fenced, see FAST_PATH)
else:  # a paho without it gets a class that is never installed (FAST_PATH is False)
    _WebsocketWrapper = getattr(mqtt, "_WebsocketWrapper", object)


class WebSocketConnection(_WebsocketWrapper):
    """paho's WebSocket wrapper with a send path that does not lose data.

    paho 2.2's wrapper returns 0 from ``send`` when the kernel took only part of a frame, and
    paho's ``_packet_write`` then drops the packet from its queue (it re-queues a packet only on
    ``BlockingIOError``); the rest of the frame stays in the wrapper and the next packet's
    accounting is wrong. Measured: a 300 KiB publish over ``ws://`` to Mosquitto, then nothing
    after it arrived. Here ``send`` frames a packet once, keeps what the kernel did not take and
    raises ``BlockingIOError`` until the whole frame is out; paho re-queues the packet and calls
    again with the same bytes, and the call that finishes the frame reports the packet as
    written. Masking (every client frame is masked, RFC 6455) XORs whole integers instead of
    paho's loop over each byte (300 KiB: ~40 ms -> well under 1 ms).

    Installed by :meth:`BufferedClient._create_socket` on the wrapper paho built (after the
    HTTP upgrade), by changing its class: no state of its own.
    """

    def send(self, data: bytes | bytearray) -> int:
        if not self._sendbuffer:
            self._sendbuffer = self._create_frame(self.OPCODE_BINARY, bytearray(data))
            self._requested_size = len(data)
        sent = self._socket.send(self._sendbuffer)
        del self._sendbuffer[:sent]  # O(1) at the front of a bytearray
        if self._sendbuffer:
            raise BlockingIOError("WebSocket frame partly sent")
        return self._requested_size

    write = send

    def _create_frame(self, opcode: int, data: bytearray, do_masking: int = 1) -> bytearray:
        length = len(data)
        mask_bit = 0x80 if do_masking else 0
        frame = bytearray((0x80 | opcode,))
        if length < 126:
            frame.append(mask_bit | length)
        elif length < 65536:
            frame.append(mask_bit | 126)
            frame += length.to_bytes(2, "big")
        else:
            frame.append(mask_bit | 127)
            frame += length.to_bytes(8, "big")
        if not do_masking:
            return frame + data
        key = os.urandom(4)
        stream = (key * (length // 4 + 1))[:length]
        masked = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
        return frame + key + masked.to_bytes(length, "big")


def ssl_context(config: MqttConfig) -> ssl.SSLContext:
    """TLS context: CA file or system trust store, optional client certificate; verification
    of certificate and host name unless ``tls_insecure``."""
    context = ssl.create_default_context(
        cafile=str(config.tls_files.ca_file) if config.tls_files.ca_file is not None else None
    )
    if config.tls_files.cert_file is not None and config.tls_files.key_file is not None:
        context.load_cert_chain(str(config.tls_files.cert_file), str(config.tls_files.key_file))
    if config.tls_files.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def make_client(
    config: MqttConfig,
    client_id: str,
    protocol: MqttProtocol,
    tls: ssl.SSLContext | None,
    receive_maximum: int,
) -> BufferedClient:
    """A paho client for one protocol version, ready for ``reconnect()`` (no callbacks set)."""
    v5 = protocol is MqttProtocol.V5
    client = BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else not config.persistent_session,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        transport="tcp" if config.websocket_path is None else "websockets",
        reconnect_on_failure=False,
        manual_ack=True,
    )
    if config.websocket_path is not None:
        client.ws_set_options(path=config.websocket_path)
    client.enable_logger(paho_log)
    client.max_inflight_messages_set(config.flow.max_inflight)
    client.max_queued_messages_set(0)
    client.connect_timeout = config.timing.connect_timeout
    if config.username is not None:
        client.username_pw_set(config.username, config.password)
    if tls is not None:
        client.tls_set_context(tls)
        if config.tls_files.tls_insecure:
            client.tls_insecure_set(True)
    if config.will is not None:
        will_props = None
        if v5 and config.will.delay:
            will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            will_props.WillDelayInterval = config.will.delay
        client.will_set(
            config.will.topic, config.will.payload, config.will.qos, config.will.retain, will_props
        )
    connect_props = None
    if v5:
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if config.persistent_session:
            connect_props.SessionExpiryInterval = config.session_expiry
        connect_props.ReceiveMaximum = receive_maximum
    client.connect_async(
        config.host,
        config.port,
        config.keepalive,
        clean_start=not config.persistent_session if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=connect_props,
    )
    return client


class SocketDriver:
    """Drives one paho client's socket from an asyncio loop.

    ``progress`` must be bumped by the owner's paho callbacks (message, publish, subscribe,
    connect): a read wake-up keeps calling ``loop_read`` while it makes progress. ``on_error``
    is called (on the loop) when reading or writing raised; the owner then drops the connection.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: mqtt.Client,
        on_error: Callable[[str], None],
    ) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self.client = client
        self._on_error = on_error
        self._sock: SocketLike | None = None
        self._fd = -1
        self._reading = False
        self._writing = False
        self.closed = False
        self.progress = 0
        self.nudges = 0
        self._nudge_timer: asyncio.TimerHandle | None = None
        self._nudge_mark = -1
        self._nudging = False
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    @property
    def reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        """Stop reading (inbound queue full): TCP flow control pushes back to the broker."""
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and self._sock is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
            self._loop.call_soon(
                self._on_readable
            )  # bytes already buffered (TLS) do not wake epoll

    def flush(self) -> None:
        """Write what paho has queued now instead of on the next loop iteration."""
        self._on_writable()

    def detach(self) -> None:
        """Stop driving the socket without touching it (its connect was abandoned; another
        thread closes it)."""
        self.closed = True
        self._unregister()

    def close_socket(self) -> None:
        """Close the socket without DISCONNECT (the broker then publishes the Will)."""
        if self.client.socket() is not None:
            if BufferedClient.fast_path:
                # paho has no public "close without DISCONNECT" (fenced, see FAST_PATH)
                self.client._sock_close()  # noqa: SLF001
            else:
                sock = self.client.socket()
                if sock is not None:
                    sock.close()
        self._unregister()

    # -- paho socket callbacks

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._in_loop(self._register, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        if sock is self._sock:
            self._unregister()

    def _on_socket_register_write(
        self, client: mqtt.Client, userdata: Any, sock: SocketLike
    ) -> None:
        self._in_loop(self._register_writer, sock)

    def _on_socket_unregister_write(
        self, client: mqtt.Client, userdata: Any, sock: SocketLike
    ) -> None:
        self._in_loop(self._unregister_writer, sock)

    # -- on the loop thread

    def _in_loop(self, fn: Callable[[SocketLike], None], sock: SocketLike) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(sock)
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(fn, sock)

    def _register(self, sock: SocketLike) -> None:
        if self.closed:
            return
        if self._sock is not None:
            self._unregister()
        self._sock = sock
        self._fd = sock.fileno()
        tcp = getattr(sock, "_socket", sock)  # under paho's _WebsocketWrapper (ws/wss)
        if isinstance(tcp, socket.socket) and tcp.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Always read a fresh connection (its CONNACK); a still-full queue pauses it again.
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _register_writer(self, sock: SocketLike) -> None:
        if sock is self._sock and not self._writing:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def _unregister_writer(self, sock: SocketLike) -> None:
        if sock is self._sock and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _unregister(self) -> None:
        if self._nudge_timer is not None:
            self._nudge_timer.cancel()
            self._nudge_timer = None
        if self._fd >= 0:
            if self._reading:
                self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._sock = None
        self._fd = -1
        self._reading = self._writing = False

    def _on_readable(self) -> None:
        if self._sock is None or not self._reading:
            return
        try:
            for _ in range(_MAX_PACKETS_PER_WAKEUP):
                before = self.progress
                rc = self.client.loop_read()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is None or not self._reading:
                    break
                if self.progress == before and not self._buffered():
                    break
            else:
                if self._buffered():  # bytes already read from the socket do not wake epoll
                    self._loop.call_soon(self._on_readable)
        except Exception as exc:
            log.exception("error while reading from the broker")
            self._on_error(f"read error: {exc!r}")
            return
        if isinstance(self._sock, WebSocketConnection):
            self._arm_nudge()

    # -- Mosquitto 2.0.11 websockets: a large outgoing message stalls half-sent

    def _arm_nudge(self) -> None:
        """Mosquitto 2.0.11's websockets listener (libwebsockets) stops sending a large packet
        once its socket would block, and goes on only when this client sends it something
        (measured: 256 KiB packets stalled for good; with these nudges 12-20 per second pass).
        So while a packet has been read in part: after ``_STALL_S`` without new bytes send a
        burst of PINGREQs, and again every ``_NUDGE_S`` as long as each burst was followed by
        new bytes. A broker without the bug never stalls this way, and a slow link costs at
        most one burst (16 bytes) per ``_STALL_S`` of silence."""
        if self._nudge_timer is not None:
            self._nudge_timer.cancel()
            self._nudge_timer = None
        if not self._partial_packet():
            self._nudging = False
            return
        mark = self._received_mark()
        helped = self._nudging and mark != self._nudge_mark
        self._nudge_mark = mark
        self._nudging = helped
        delay = _NUDGE_S if helped else _STALL_S
        self._nudge_timer = self._loop.call_later(delay, self._nudge)

    def _nudge(self) -> None:
        self._nudge_timer = None
        if self._sock is None or not self._reading or not self._partial_packet():
            return
        if self._received_mark() != self._nudge_mark:  # bytes came without us: not stalled
            self._nudging = False
            self._arm_nudge()
            return
        ping = getattr(self.client, "ping", None)
        if ping is None:
            return
        with contextlib.suppress(ConnectionError):
            for _ in range(_NUDGE_BURST):
                ping()
            self.nudges += 1
            self.flush()
        self._nudging = True  # the next read (or the next timer) sees whether it helped
        self._nudge_timer = self._loop.call_later(_STALL_S, self._nudge)

    def _partial_packet(self) -> bool:
        in_packet = getattr(self.client, "_in_packet", None)
        return bool(in_packet and in_packet.get("command")) or bool(
            getattr(self._sock, "_readbuffer", b"")
        )

    def _received_mark(self) -> int:
        in_packet = getattr(self.client, "_in_packet", None) or {}
        return int(in_packet.get("pos", 0)) + len(getattr(self._sock, "_readbuffer", b""))

    def _buffered(self) -> bool:
        """Received bytes not yet parsed: TLS records decrypted but not read, or bytes in the
        client's own read buffer."""
        pending = getattr(self._sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        buffered = getattr(self.client, "buffered_bytes", None)
        return buffered is not None and buffered() > 0

    def _on_writable(self) -> None:
        if self._sock is None:
            return
        try:
            self.client.loop_write()
        except Exception as exc:
            log.exception("error while writing to the broker")
            self._on_error(f"write error: {exc!r}")
