"""MqttTransport over WebSockets (ws://, wss://) against Mosquitto's websockets listener.

Mosquitto 2.0.11 (Debian 12) exits with "Unable to start any listening sockets" when its only
listener speaks websockets, so the broker here has its plain listener (on ``broker.port``, which
the launcher waits for) plus a websockets listener, and for wss:// a TLS websockets listener.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import transport_helpers
from transport_helpers import config, consumer_config

from broker.launcher import MosquittoBroker, find_mosquitto, free_port
from edgefl.transport import (
    BrokerUnreachable,
    ConnectInfo,
    InboundMessage,
    MqttProtocol,
    MqttTransport,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BIG = 300 * 1024  # > 256 KiB: several WebSocket frames per read, several reads per frame


@dataclass
class WsBroker:
    broker: MosquittoBroker
    ws_port: int
    wss_port: int | None
    ca_file: Path | None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/mqtt"

    @property
    def wss_url(self) -> str:
        return f"wss://localhost:{self.wss_port}/mqtt"


def _start(tmp_path: Path, *, tls: bool) -> WsBroker:
    if find_mosquitto() is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed (CI is set)")
        pytest.skip("mosquitto is not installed")
    ws_port = free_port()
    extra = [f"listener {ws_port} 127.0.0.1", "protocol websockets"]
    wss_port = ca = None
    if tls:
        from test_transport_tls import _write_pki  # same throwaway CA as the mqtts:// tests

        certs = tmp_path / "certs"
        _write_pki(certs)
        ca = certs / "ca.pem"
        wss_port = free_port()
        extra += [
            f"listener {wss_port} 127.0.0.1",
            "protocol websockets",
            f"cafile {ca}",
            f"certfile {certs / 'server.pem'}",
            f"keyfile {certs / 'server.key'}",
        ]
    broker = MosquittoBroker(state_dir=tmp_path / "mosquitto", extra_config=extra)
    broker.start()
    return WsBroker(broker, ws_port, wss_port, ca)


@pytest.fixture
def ws_broker(tmp_path: Path) -> Iterator[WsBroker]:
    started = _start(tmp_path, tls=False)
    yield started
    started.broker.stop()


@pytest.fixture
def wss_broker(tmp_path: Path) -> Iterator[WsBroker]:
    pytest.importorskip("cryptography.x509")
    started = _start(tmp_path, tls=True)
    yield started
    started.broker.stop()


async def receive(transport: MqttTransport, count: int) -> list[InboundMessage]:
    return await transport_helpers.receive(transport, count, within=10.0)


async def next_connect(queue: asyncio.Queue[ConnectInfo]) -> ConnectInfo:
    async with asyncio.timeout(15):
        return await queue.get()


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
async def test_ws_qos1_manual_ack_and_a_payload_over_256_kib(
    ws_broker: WsBroker, protocol: MqttProtocol
) -> None:
    payloads = [b"small", os.urandom(BIG), os.urandom(BIG), b"last"]

    sub_cfg = consumer_config(ws_broker.ws_url, f"ws-sub-{protocol.value}", protocol=protocol)
    async with MqttTransport(sub_cfg) as sub, MqttTransport(config(ws_broker.ws_url)) as pub:
        # Arrange
        await sub.subscribe("ws/#", qos=1)

        # Act
        for i, payload in enumerate(payloads):
            await pub.publish(f"ws/{i}", payload, qos=1)
        got = await receive(sub, len(payloads))
        await sub.ack_many(got)

        # Assert: order, content, QoS, and every one acknowledged on this connection
        assert [m.topic for m in got] == [f"ws/{i}" for i in range(len(payloads))]
        assert [m.payload for m in got] == payloads
        assert all(m.qos == 1 and m.ack_token for m in got)
        stats = sub.statistics()
        assert (stats.protocol, stats.acked, stats.stale_acks) == (protocol.value, 4, 0)
        assert pub.statistics().published == len(payloads)

    # nothing was left unacknowledged: the session's first message is a fresh marker
    async with MqttTransport(sub_cfg) as again:
        await again.publish("ws/marker", b"marker")
        [first] = await receive(again, 1)
        assert first.topic == "ws/marker"


async def test_ws_session_survives_a_broker_restart_and_redelivers_what_was_not_acked(
    ws_broker: WsBroker,
) -> None:
    connects: asyncio.Queue[ConnectInfo] = asyncio.Queue()

    async def on_connect(info: ConnectInfo) -> None:
        connects.put_nowait(info)

    sub_cfg = consumer_config(ws_broker.ws_url, "ws-restart")
    async with MqttTransport(sub_cfg, on_connect=on_connect) as sub:
        first = await next_connect(connects)
        await sub.subscribe("r/#")
        async with MqttTransport(config(ws_broker.ws_url)) as pub:
            await pub.publish("r/held", b"held")
        [held] = await receive(sub, 1)  # taken, never acknowledged

        # Act: graceful restart (Mosquitto saves the session), the transport reconnects
        ws_broker.broker.restart()
        second = await next_connect(connects)

        # Assert: same session, the unacknowledged message comes again, new traffic flows
        assert (first.connects, second.connects) == (1, 2)
        assert second.session_present
        [again] = await receive(sub, 1)
        assert (again.topic, again.payload, again.duplicate) == ("r/held", b"held", True)
        async with MqttTransport(config(ws_broker.ws_url)) as pub:
            await pub.publish("r/after", os.urandom(BIG))
        [after] = await receive(sub, 1)
        assert after.topic == "r/after"
        assert len(after.payload) == BIG
        await sub.ack_many([held, again, after])
        stats = sub.statistics()
        assert (stats.reconnects, stats.acked, stats.stale_acks) == (1, 2, 1)


async def test_wss_roundtrip_verifies_the_broker_certificate(wss_broker: WsBroker) -> None:
    assert wss_broker.ca_file is not None
    payload = os.urandom(BIG)

    cfg = config(wss_broker.wss_url, ca_file=wss_broker.ca_file, manual_ack=True)
    async with MqttTransport(cfg) as sub, MqttTransport(cfg) as pub:
        await sub.subscribe("wss/#")
        await pub.publish("wss/big", payload)
        await pub.publish("wss/small", b"s")
        got = await receive(sub, 2)
        await sub.ack_many(got)
        assert [m.payload for m in got] == [payload, b"s"]
        assert sub.statistics().acked == 2


async def test_wss_refuses_an_untrusted_broker_with_broker_unreachable(
    wss_broker: WsBroker,
) -> None:
    strict = config(wss_broker.wss_url, start_timeout=1.0, reconnect_min_delay=0.1)
    with pytest.raises(BrokerUnreachable, match="CERTIFICATE_VERIFY_FAILED") as caught:
        async with MqttTransport(strict):
            pass
    assert caught.value.url == wss_broker.wss_url
    assert caught.value.reason is not None
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.reason
