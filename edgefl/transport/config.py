"""Connection settings of :class:`~edgefl.transport.mqtt.MqttTransport`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgefl.transport.base import Backpressure, validate_qos, validate_topic

_PLAIN_SCHEMES = {"mqtt": 1883, "tcp": 1883}
_TLS_SCHEMES = {"mqtts": 8883, "ssl": 8883, "tls": 8883}


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
class MqttConfig:
    """Everything needed to reach a broker. Build it with :meth:`from_url` plus overrides.

    ``persistent_session`` keeps subscriptions and unacknowledged QoS 1 messages at the broker
    across disconnects (MQTT 5: Clean Start 0 + Session Expiry ``session_expiry``; 3.1.1:
    clean_session=False); it needs a fixed ``client_id``.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    """CA bundle for the broker certificate; None uses the system trust store."""
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    """Skip certificate and host name verification. Never in production."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""
    """Empty: a random ``edgefl-<hex>`` id per transport."""
    persistent_session: bool = False
    session_expiry: int = 86400
    """MQTT 5 Session Expiry Interval (seconds) of a persistent session."""
    keepalive: int = 30
    will: Will | None = None
    protocol: MqttProtocol = MqttProtocol.AUTO
    protocol_probe_timeout: float = 2.0
    """``auto`` only, until the version is known: how long to wait for the CONNACK of an MQTT 5
    CONNECT before trying 3.1.1 (amqtt ignores an MQTT 5 CONNECT that carries properties, e.g.
    session expiry, Will or Receive Maximum, instead of refusing it)."""
    manual_ack: bool = False
    """QoS 1 messages are acknowledged only by ``Transport.ack`` (after durable recording).
    Otherwise the transport acknowledges a QoS 1 message when a consumer takes it from the
    inbound queue (not on arrival), so a message still queued at a crash is redelivered to a
    persistent session."""
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

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if self.persistent_session and not self.client_id:
            raise ValueError("a persistent session needs a fixed client_id")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if not self.tls and (self.ca_file or self.cert_file or self.tls_insecure):
            raise ValueError("TLS options given for a plain (mqtt://) connection")
        if self.password is not None and self.username is None:
            raise ValueError("password without username")
        if self.keepalive < 0 or self.keepalive > 65535:
            raise ValueError("keepalive must be 0..65535")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ValueError("session_expiry out of range")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535")
        if self.max_queued_messages < 1:
            raise ValueError("max_queued_messages must be >= 1")
        if self.max_packet_size is not None and self.max_packet_size < 64:
            raise ValueError("max_packet_size too small")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if self.connect_timeout <= 0 or self.protocol_probe_timeout <= 0:
            raise ValueError("connect_timeout and protocol_probe_timeout must be > 0")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttConfig:
        """Parse ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, port 8883 by
        default); ``tcp``/``ssl``/``tls`` are accepted aliases. Other settings come as keyword
        overrides, e.g. ``MqttConfig.from_url(url, client_id="agg", manual_ack=True)``."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in _PLAIN_SCHEMES:
            tls, default_port = False, _PLAIN_SCHEMES[scheme]
        elif scheme in _TLS_SCHEMES:
            tls, default_port = True, _TLS_SCHEMES[scheme]
        else:
            raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"broker URL takes no path, query or fragment: {url!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL without host: {url!r}")
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise ValueError(f"bad port in broker URL {url!r}") from exc
        values: dict[str, Any] = {"host": parts.hostname, "port": port, "tls": tls}
        if parts.username is not None:
            values["username"] = unquote(parts.username)
        if parts.password is not None:
            values["password"] = unquote(parts.password)
        values.update(overrides)
        return cls(**values)

    @property
    def url(self) -> str:
        """The broker URL without credentials, e.g. ``mqtt://127.0.0.1:1883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def replace(self, **changes: Any) -> MqttConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
