"""MQTT transport for edgefl: the :class:`Transport` seam and its two implementations.

* :class:`MqttTransport` — paho-mqtt 2.x on the asyncio loop over TCP, TLS or WebSockets;
  MQTT 5 with 3.1.1 fallback, reconnect with backoff, manual QoS 1 acks, bounded inbound
  queue with backpressure.
* :class:`MemoryTransport` over a :class:`MemoryBroker` — in-process, for unit tests.
"""

from edgefl.transport.base import (
    AckTimeout,
    Backpressure,
    BrokerRefused,
    BrokerUnreachable,
    ConnectInfo,
    DropReason,
    InboundMessage,
    NotConnectedError,
    OnConnect,
    PayloadTooLarge,
    Transport,
    TransportClosed,
    TransportError,
    TransportStatistics,
    TransportTimeout,
    topic_matches,
    validate_filter,
    validate_topic,
)
from edgefl.transport.config import (
    DEFAULT_WEBSOCKET_PATH,
    BrokerUrl,
    MqttConfig,
    MqttProtocol,
    Will,
    parse_broker_urls,
)
from edgefl.transport.memory import MemoryBroker, MemoryTransport
from edgefl.transport.mqtt import MqttTransport

__all__ = [
    "DEFAULT_WEBSOCKET_PATH",
    "AckTimeout",
    "Backpressure",
    "BrokerRefused",
    "BrokerUnreachable",
    "BrokerUrl",
    "ConnectInfo",
    "DropReason",
    "InboundMessage",
    "MemoryBroker",
    "MemoryTransport",
    "MqttConfig",
    "MqttProtocol",
    "MqttTransport",
    "NotConnectedError",
    "OnConnect",
    "PayloadTooLarge",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportStatistics",
    "TransportTimeout",
    "Will",
    "parse_broker_urls",
    "topic_matches",
    "validate_filter",
    "validate_topic",
]
