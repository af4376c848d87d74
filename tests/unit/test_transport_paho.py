"""BufferedClient (edgefl.transport._paho): its inbound path against paho's own decoder.

Both clients read the same byte stream from a socketpair; every message must come out with the
same topic, payload, mid, QoS, retain and dup flags, and properties when there are any.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefl.transport._paho import BufferedClient

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311


def publish_packet(
    topic: bytes, payload: bytes, *, qos: int, mid: int = 0, v5: bool, props: bytes = b"",
    dup: bool = False, retain: bool = False,
) -> bytes:  # fmt: skip
    """One PUBLISH packet as a broker sends it (``props``: encoded MQTT 5 properties)."""
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if v5:
        body += bytes([len(props)]) + props
    body += payload
    length, remaining = bytearray(), len(body)
    while True:
        byte, remaining = remaining % 128, remaining // 128
        length.append(byte | 0x80 if remaining else byte)
        if not remaining:
            break
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes([first]) + bytes(length) + body


def read_all(
    client_cls: type[mqtt.Client], stream: bytes, count: int, protocol: Any, **kw: Any
) -> list[Any]:
    """Feed ``stream`` to a connected-looking client of ``client_cls``; the messages it yields."""
    ours, theirs = socket.socketpair()
    client = client_cls(CallbackAPIVersion.VERSION2, protocol=protocol, **kw)
    got: list[Any] = []
    # properties: paho gives an empty Properties object, the fast path None; both mean none
    client.on_message = lambda _c, _u, m: got.append(
        (m.topic, bytes(m.payload), m.mid, m.qos, bool(m.retain), bool(m.dup),
         m.properties.json() if m.properties is not None else {})
    )  # fmt: skip
    ours.setblocking(False)
    client._sock = ours  # a socket paho treats as connected
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED

    def send() -> None:
        theirs.sendall(stream)  # stays open: paho's PUBACKs (auto ack) must not hit a closed peer

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 10
    try:
        while len(got) < count and time.monotonic() < deadline:
            if client.loop_read(16) != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
    finally:
        sender.join(10)
        ours.close()
        theirs.close()
    return got


@pytest.mark.parametrize("protocol", [V5, V311], ids=["v5", "v311"])
@pytest.mark.parametrize("manual_ack", [True, False], ids=["manual", "auto"])
def test_same_messages_as_paho(
    protocol: Any, manual_ack: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: every kind of PUBLISH, including payloads larger than one socket read
    v5 = protocol is V5
    big = bytes(range(256)) * 2000  # 512 kB: spans several 256 KiB reads
    expiry = b"\x02\x00\x00\x00\x3c"  # Message Expiry Interval = 60 (MQTT 5 only)
    packets = [
        publish_packet(b"edgefl/v1/f/device/d/update/1", b"u" * 90_000, qos=1, mid=1, v5=v5),
        publish_packet(b"a/b", b"", qos=1, mid=2, v5=v5, dup=True, retain=True),
        publish_packet(b"a/big", big, qos=1, mid=3, v5=v5),
        publish_packet(b"a/qos0", b"zero", qos=0, v5=v5),
        publish_packet("ü/ñ".encode(), b"utf8 topic", qos=1, mid=65535, v5=v5),
    ]
    if v5:
        packets.append(publish_packet(b"a/props", b"p", qos=1, mid=4, v5=True, props=expiry))
    stream = b"".join(packets)

    # Act
    expected = read_all(mqtt.Client, stream, len(packets), protocol, manual_ack=manual_ack)
    decoded_by_paho: list[int] = []
    original = mqtt._packet.decode_publish

    def counting(*args: Any) -> Any:
        decoded_by_paho.append(1)
        return original(*args)

    monkeypatch.setattr(mqtt._packet, "decode_publish", counting)
    actual = read_all(BufferedClient, stream, len(packets), protocol, manual_ack=manual_ack)

    # Assert: the same messages; only QoS 0, automatic acks and properties took paho's decoder
    assert len(expected) == len(packets)
    assert actual == expected
    assert len(decoded_by_paho) == (2 if v5 else 1) if manual_ack else len(packets)


def test_bytes_left_in_the_read_buffer_are_reported() -> None:
    # Arrange: two small packets arrive in one read
    ours, theirs = socket.socketpair()
    client = BufferedClient(CallbackAPIVersion.VERSION2, protocol=V5, manual_ack=True)
    got: list[str] = []
    client.on_message = lambda _c, _u, m: got.append(m.topic)
    ours.setblocking(False)
    client._sock = ours
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    theirs.sendall(
        publish_packet(b"x/1", b"a", qos=1, mid=1, v5=True)
        + publish_packet(b"x/2", b"b", qos=1, mid=2, v5=True)
    )

    # Act: paho reads one packet per loop_read(1)
    client.loop_read(1)

    # Assert: the second packet is buffered (epoll will not report it), then read from the buffer
    assert got == ["x/1"]
    assert client.buffered_bytes() > 0
    client.loop_read(1)
    assert got == ["x/1", "x/2"]
    assert client.buffered_bytes() == 0
    ours.close()
    theirs.close()
