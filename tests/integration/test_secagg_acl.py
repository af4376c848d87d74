"""The provisioned broker ACL under secure aggregation, against a real Mosquitto with the fleet's
secure config: each share reaches exactly one role. The helper, subscribed to everything of
``secagg/``, receives the sealed seed and never the masked share; the leader (the aggregator
account) the share and never the seed; the monitor neither; a device writes only its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest

from broker.launcher import MosquittoBroker
from edgefl.protocol.topics import secagg_seed_topic, secagg_share_topic
from edgefl.security.provision import FleetDirectory, add_device, init_fleet, mosquitto_for_fleet
from edgefl.transport import BrokerRefused, InboundMessage, MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FLEET = "lab"


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[FleetDirectory, MosquittoBroker]]:
    needs.mosquitto()
    layout = init_fleet(tmp_path / "fleet", FLEET, ["localhost", "127.0.0.1"])
    add_device(layout.root, "dev-a")
    add_device(layout.root, "dev-b")
    broker = mosquitto_for_fleet(layout, tmp_path / "state")
    broker.start()
    try:
        yield layout, broker
    finally:
        broker.stop()


def _config(layout: FleetDirectory, broker: MosquittoBroker, user: str) -> MqttConfig:
    directory = {
        "aggregator": layout.aggregator_dir,
        "helper": layout.helper_dir,
        "monitor": layout.monitor_dir,
    }.get(user, layout.device_dir(user))
    return MqttConfig.from_url(
        f"mqtts://localhost:{broker.port}",
        ca_file=layout.broker_dir / "ca.pem",
        username=user,
        password=(directory / "mqtt-password").read_text().strip(),
        client_id=f"acl-{user}",
        start_timeout=5.0,
        operation_timeout=5.0,
    )


async def _drain(sub: MqttTransport, seconds: float) -> list[InboundMessage]:
    got: list[InboundMessage] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in sub.messages():
                got.append(message)
    return got


async def test_each_share_reaches_exactly_its_role(
    secure: tuple[FleetDirectory, MosquittoBroker],
) -> None:
    layout, broker = secure
    roles = ("aggregator", "helper", "monitor", "dev-b")
    everything = f"edgefl/v1/{FLEET}/secagg/#"
    async with contextlib.AsyncExitStack() as stack:
        subs = {
            r: await stack.enter_async_context(MqttTransport(_config(layout, broker, r)))
            for r in roles
        }
        device = await stack.enter_async_context(MqttTransport(_config(layout, broker, "dev-a")))
        for sub in subs.values():
            with contextlib.suppress(BrokerRefused):  # granted, "read" is checked on delivery
                await sub.subscribe(everything, qos=1)

        # Act: dev-a sends its shares, and tries to send some as dev-b
        await device.publish(secagg_share_topic(FLEET, "dev-a", 1), b"masked", qos=1)
        await device.publish(secagg_seed_topic(FLEET, "dev-a", 1), b"sealed", qos=1)
        for topic in (secagg_share_topic(FLEET, "dev-b", 1), secagg_seed_topic(FLEET, "dev-b", 1)):
            with contextlib.suppress(BrokerRefused):
                await device.publish(topic, b"forged", qos=1)
        got = {r: [(m.topic, m.payload) for m in await _drain(s, 0.7)] for r, s in subs.items()}

    # Assert
    assert got["aggregator"] == [(secagg_share_topic(FLEET, "dev-a", 1), b"masked")]
    assert got["helper"] == [(secagg_seed_topic(FLEET, "dev-a", 1), b"sealed")]
    assert got["monitor"] == []
    assert got["dev-b"] == []
