"""Connection settings of :class:`~edgefl.transport.mqtt.MqttTransport`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from edgefl.flat_options import flat_values, replace_flat
from edgefl.transport.base import Backpressure, validate_qos, validate_topic

DEFAULT_WEBSOCKET_PATH = "/mqtt"
"""HTTP path of a ``ws://``/``wss://`` URL without one: what EMQX, HiveMQ, AWS IoT Core and
paho expect (Mosquitto accepts any path)."""


@dataclass(frozen=True)
class _Scheme:
    tls: bool
    websockets: bool
    default_port: int


# ws/wss default to the ports of RFC 6455 (80/443), as every other ws:// URL does; brokers that
# listen elsewhere (EMQX 8083/8084, HiveMQ 8000/8884) are written with an explicit port.
_SCHEMES: dict[str, _Scheme] = {
    "mqtt": _Scheme(tls=False, websockets=False, default_port=1883),
    "tcp": _Scheme(tls=False, websockets=False, default_port=1883),
    "mqtts": _Scheme(tls=True, websockets=False, default_port=8883),
    "ssl": _Scheme(tls=True, websockets=False, default_port=8883),
    "tls": _Scheme(tls=True, websockets=False, default_port=8883),
    "ws": _Scheme(tls=False, websockets=True, default_port=80),
    "wss": _Scheme(tls=True, websockets=True, default_port=443),
}
SCHEMES = tuple(_SCHEMES)
"""Accepted broker URL schemes (``tcp``, ``ssl`` and ``tls`` are aliases of mqtt/mqtts)."""

# RFC 3986 path characters (unreserved, sub-delims, ':', '@', '/', percent escapes): nothing that
# could end the HTTP request line of the WebSocket handshake (space, CR, LF) or start a query.
_PATH_RE = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")


def validate_websocket_path(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is an absolute HTTP path without query or fragment
    (it goes verbatim into the ``GET`` line of the WebSocket handshake)."""
    if not _PATH_RE.fullmatch(path):
        raise ValueError(
            f"bad WebSocket path {path!r}: it must start with '/' and hold only URL path "
            "characters (no spaces, query or fragment)"
        )


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL: ``scheme://[user[:password]@]host[:port][/path]``.

    Schemes: ``mqtt`` (TCP, port 1883), ``mqtts`` (TLS, 8883), ``ws`` (MQTT over WebSockets,
    80) and ``wss`` (WebSockets over TLS, 443); ``tcp``/``ssl``/``tls`` are aliases of
    mqtt/mqtts. An explicit port always wins. Only ws/wss take a path (the HTTP path of the
    WebSocket handshake, :data:`DEFAULT_WEBSOCKET_PATH` when absent). Queries and fragments are
    rejected everywhere. User name and password are percent-decoded.
    """

    host: str
    port: int
    tls: bool = False
    websocket_path: str | None = None
    """None: MQTT over TCP. A path: MQTT over WebSockets with that HTTP path."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if self.websocket_path is not None:
            validate_websocket_path(self.websocket_path)

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """Parse ``url``; ``ValueError`` naming what is wrong (scheme, host, port, path)."""
        if not isinstance(url, str):
            raise ValueError(f"broker URL must be a string, got {type(url).__name__}")
        parts = urlsplit(url)
        scheme = _SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ValueError(
                f"unsupported broker URL scheme {parts.scheme!r} in {url!r} "
                f"(use one of: {', '.join(SCHEMES)})"
            )
        if "?" in url or "#" in url:  # unencoded in a password, urlsplit would misparse it too
            raise ValueError(f"broker URL takes no query or fragment: {url!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL without host: {url!r}")
        try:
            explicit = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in broker URL {url!r}") from exc
        if explicit == 0:
            raise ValueError(f"bad port in broker URL {url!r}")
        path: str | None = None
        if scheme.websockets:
            path = parts.path or DEFAULT_WEBSOCKET_PATH
            validate_websocket_path(path)
        elif parts.path not in ("", "/"):
            raise ValueError(f"only ws:// and wss:// broker URLs take a path: {url!r}")
        return cls(
            host=parts.hostname,
            port=explicit or scheme.default_port,
            tls=scheme.tls,
            websocket_path=path,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def scheme(self) -> str:
        """The canonical scheme: ``mqtt``, ``mqtts``, ``ws`` or ``wss``."""
        if self.websocket_path is not None:
            return "wss" if self.tls else "ws"
        return "mqtts" if self.tls else "mqtt"

    @property
    def display_url(self) -> str:
        """The URL without credentials, port always written, e.g. ``ws://broker:80/mqtt``;
        :meth:`parse` of it gives this URL back (less the credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.websocket_path or ''}"


_LIST_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def parse_broker_urls(text: str) -> tuple[BrokerUrl, ...]:
    """A comma-separated list of broker URLs, the nodes of one (clustered) broker, in the order
    to try them (``"mqtt://a:1883,mqtt://b:1883"``; spaces around commas are ignored; a comma
    separates URLs only where a scheme follows, so WebSocket paths keep theirs). All use
    the same kind of connection (TLS or not, TCP or WebSockets) and the same credentials (or
    credentials in the first only): one session, one client, several doors. ``ValueError``
    naming the bad URL."""
    if not isinstance(text, str):
        raise ValueError(f"broker URL must be a string, got {type(text).__name__}")
    parts = _LIST_SEPARATOR.split(text.strip())
    if any(not part or (part.endswith(",") and i < len(parts) - 1) for i, part in enumerate(parts)):
        raise ValueError(f"empty entry in the broker URL list {text!r}")
    urls = tuple(BrokerUrl.parse(part) for part in parts)
    for url, part in zip(urls, parts, strict=True):
        if "," in url.host:
            raise ValueError(
                f"bad host {url.host!r} in {part!r}: each URL of a list starts with its scheme"
            )
    first = urls[0]
    for url, part in zip(urls[1:], parts[1:], strict=True):
        _check_same_kind(first, url, part)
        if url.username is not None and (url.username, url.password) != (
            first.username,
            first.password,
        ):
            raise ValueError(f"every broker URL of a list must carry the same credentials: {part}")
    return urls


def _check_same_kind(first: BrokerUrl, other: BrokerUrl, text: str) -> None:
    if other.tls != first.tls or (other.websocket_path is None) != (first.websocket_path is None):
        raise ValueError(
            f"{text!r} is {other.scheme}:// but the first broker URL is {first.scheme}://:"
            " every node of a list is reached the same way"
        )


class MqttProtocol(StrEnum):
    """MQTT protocol version to speak. ``AUTO`` tries 5 and falls back to 3.1.1 when the broker
    refuses it (the embedded amqtt broker does); the version that first connects is kept."""

    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"


@dataclass(frozen=True)
class Will:
    """Last Will: published by the broker when the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    delay: int = 0
    """MQTT 5 Will Delay Interval in seconds (suppresses flapping presence); ignored on 3.1.1."""

    def __post_init__(self) -> None:
        validate_topic(self.topic)
        validate_qos(self.qos)
        if self.delay < 0:
            raise ValueError("will delay must be >= 0")


@dataclass(frozen=True)
class TlsFiles:
    """The TLS settings of an ``mqtts://`` or ``wss://`` connection."""

    ca_file: Path | None = None
    """CA bundle for the broker certificate; None uses the system trust store."""
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    """Skip certificate and host name verification. Never in production."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    @property
    def given(self) -> bool:
        """Whether any TLS option is set (a plain connection takes none)."""
        return bool(self.ca_file or self.cert_file or self.tls_insecure)


@dataclass(frozen=True)
class FlowControl:
    """The bounds on messages in flight both ways and on packet size."""

    max_inflight: int = 20
    """Outbound QoS 1 messages awaiting PUBACK at once (more are queued in the client)."""
    receive_maximum: int | None = None
    """MQTT 5 Receive Maximum: unacknowledged inbound QoS 1 messages the broker may send us.
    None: ``max_queued_messages`` (capped at 65535), so the broker's flow control keeps QoS 1
    traffic within the inbound queue and reading rarely has to pause."""
    max_queued_messages: int = 1000
    """Bound of the inbound queue between the connection and ``messages()``."""
    backpressure: Backpressure = Backpressure.PAUSE
    max_packet_size: int | None = None
    """Client-side limit on outgoing packets (the broker's MQTT 5 limit applies as well)."""

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535")
        if self.max_queued_messages < 1:
            raise ValueError("max_queued_messages must be >= 1")
        if self.max_packet_size is not None and self.max_packet_size < 64:
            raise ValueError("max_packet_size too small")


@dataclass(frozen=True)
class Timing:
    """Reconnect backoff and the timeouts of connecting and of operations."""

    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    connect_timeout: float = 10.0
    """Per attempt: TCP + TLS handshake, and again for the CONNACK."""
    start_timeout: float | None = 30.0
    """``__aenter__`` waits this long for the first connection (None: return at once and keep
    connecting in the background)."""
    operation_timeout: float | None = None
    """Bound for ``publish``/``subscribe`` (waiting for a connection plus the broker's ack);
    None waits until the transport is closed."""
    protocol_probe_timeout: float = 2.0
    """``auto`` only, until the version is known: how long to wait for the CONNACK of an MQTT 5
    CONNECT before trying 3.1.1 (amqtt ignores an MQTT 5 CONNECT that carries properties, e.g.
    session expiry, Will or Receive Maximum, instead of refusing it)."""

    def __post_init__(self) -> None:
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if self.connect_timeout <= 0 or self.protocol_probe_timeout <= 0:
            raise ValueError("connect_timeout and protocol_probe_timeout must be > 0")


@dataclass(frozen=True)
class MqttConfig:
    """Everything needed to reach a broker. Build it with :meth:`from_url` plus overrides,
    which take the fields of the sections (``tls_files``, ``flow``, ``timing``) by their own
    names, flat: ``MqttConfig.from_url(url, ca_file=..., max_inflight=100)``.

    ``persistent_session`` keeps subscriptions and unacknowledged QoS 1 messages at the broker
    across disconnects (MQTT 5: Clean Start 0 + Session Expiry ``session_expiry``; 3.1.1:
    clean_session=False); it needs a fixed ``client_id``.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    websocket_path: str | None = None
    """None: MQTT over TCP. A path (e.g. ``/mqtt``): MQTT over WebSockets, the path of the
    HTTP upgrade request; TLS settings then apply to ``wss://`` as to ``mqtts://``."""
    tls_files: TlsFiles = field(default_factory=TlsFiles)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    fallbacks: tuple[BrokerUrl, ...] = ()
    """Further nodes of the same clustered broker (host, port, WebSocket path; the scheme must
    match ``tls``/``websocket_path``): after a failed connection attempt the transport tries the
    next node at once, cyclically, and backs off only after every node failed in a row. The
    same client (id, session, unacknowledged QoS 1 messages) moves to the new node, so a
    cluster-wide session (NATS, EMQX, HiveMQ) resumes there. ``from_url`` fills it from a comma
    list."""
    client_id: str = ""
    """Empty: a random ``edgefl-<hex>`` id per transport."""
    persistent_session: bool = False
    session_expiry: int = 86400
    """MQTT 5 Session Expiry Interval (seconds) of a persistent session."""
    keepalive: int = 30
    will: Will | None = None
    protocol: MqttProtocol = MqttProtocol.AUTO
    manual_ack: bool = False
    """QoS 1 messages are acknowledged only by ``Transport.ack`` (after durable recording).
    Otherwise the transport acknowledges a QoS 1 message when a consumer takes it from the
    inbound queue (not on arrival), so a message still queued at a crash is redelivered to a
    persistent session."""
    flow: FlowControl = field(default_factory=FlowControl)
    timing: Timing = field(default_factory=Timing)

    SECTIONS: ClassVar[dict[str, type[TlsFiles | FlowControl | Timing]]] = {
        "tls_files": TlsFiles,
        "flow": FlowControl,
        "timing": Timing,
    }
    """The sections whose fields are flat options of the same name."""

    def __post_init__(self) -> None:
        self._check_endpoint()
        self._check_session()

    def _check_endpoint(self) -> None:
        """Where and as whom to connect: host, port, TLS files, WebSocket path, credentials."""
        if not self.host:
            raise ValueError("host is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if not self.tls and self.tls_files.given:
            raise ValueError("TLS options given for a plain (mqtt:// or ws://) connection")
        if self.websocket_path is not None:
            validate_websocket_path(self.websocket_path)
        if self.password is not None and self.username is None:
            raise ValueError("password without username")
        for node in self.fallbacks:
            _check_same_kind(self.broker_url, node, node.display_url)

    def _check_session(self) -> None:
        """The MQTT session: client id, keepalive, expiry."""
        if self.persistent_session and not self.client_id:
            raise ValueError("a persistent session needs a fixed client_id")
        if self.keepalive < 0 or self.keepalive > 65535:
            raise ValueError("keepalive must be 0..65535")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ValueError("session_expiry out of range")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttConfig:
        """Parse a broker URL (see :class:`BrokerUrl`: ``mqtt://``, ``mqtts://``, ``ws://``,
        ``wss://``, with optional ``user[:password]@``), or a comma-separated list of the nodes
        of a clustered broker (:func:`parse_broker_urls`; the rest become :attr:`fallbacks`).
        Other settings come as keyword overrides, e.g.
        ``MqttConfig.from_url(url, client_id="agg", manual_ack=True)``."""
        parsed, *others = parse_broker_urls(url)
        values: dict[str, Any] = {
            "host": parsed.host,
            "port": parsed.port,
            "tls": parsed.tls,
            "websocket_path": parsed.websocket_path,
            "fallbacks": tuple(BrokerUrl(u.host, u.port, u.tls, u.websocket_path) for u in others),
        }
        if parsed.username is not None:
            values["username"] = parsed.username
        if parsed.password is not None:
            values["password"] = parsed.password
        values.update(overrides)
        return cls.build(**values)

    @classmethod
    def build(cls, **options: Any) -> MqttConfig:
        """A config from flat options (fields of this class or of its sections)."""
        sections = {name: record() for name, record in cls.SECTIONS.items()}
        return replace_flat(cls(**sections), cls.SECTIONS, options)  # type: ignore[arg-type]

    @property
    def broker_url(self) -> BrokerUrl:
        """Where this config connects, without credentials."""
        return BrokerUrl(self.host, self.port, self.tls, self.websocket_path)

    @property
    def endpoints(self) -> tuple[BrokerUrl, ...]:
        """Every node to try, in order: :attr:`broker_url`, then :attr:`fallbacks`."""
        return (self.broker_url, *self.fallbacks)

    @property
    def url(self) -> str:
        """The (first) broker URL without credentials, e.g. ``mqtt://127.0.0.1:1883`` or
        ``wss://broker.example:443/mqtt`` (safe to log)."""
        return self.broker_url.display_url

    @property
    def urls(self) -> str:
        """Every node's URL without credentials, comma-separated (safe to log)."""
        return ",".join(node.display_url for node in self.endpoints)

    def replace(self, **changes: Any) -> MqttConfig:
        """A copy with ``changes`` (fields of this class, or flat section fields) applied,
        validated again."""
        return replace_flat(self, self.SECTIONS, changes)

    def options(self) -> dict[str, Any]:
        """Every flat option and its value (what :meth:`build` takes)."""
        return flat_values(self, self.SECTIONS)
