"""A transport given a list of broker URLs moves to the next node when its node dies.

Two independent Mosquittos stand for two nodes (they share no state, so each has its own
subscriber): a device transport on ``"A,B"`` publishes to A; A is SIGKILLed; the transport
connects to B at once (no backoff before the next node), runs its ``on_connect`` hook there,
renews its subscriptions and publishes on; the statistics name the node and count the failover.
Then B dies and A is back: it goes round the list to A. A list whose first node is down at start
connects to the second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import needs
import pytest
from transport_helpers import config, receive
from waiting import eventually

from broker.launcher import MosquittoBroker
from edgefl.transport import ConnectInfo, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _broker(path: Path) -> MosquittoBroker:
    return MosquittoBroker(state_dir=path, binary=Path(needs.mosquitto()))


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, MosquittoBroker]]:
    a, b = _broker(tmp_path / "a"), _broker(tmp_path / "b")
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        for broker in (a, b):
            if broker.is_running():
                broker.stop()


async def test_node_death_moves_the_client_to_the_next_url_and_back_round_the_list(
    two_nodes: tuple[MosquittoBroker, MosquittoBroker],
) -> None:
    a, b = two_nodes
    connected_to: list[str] = []

    async def hook(info: ConnectInfo) -> None:
        connected_to.append(device.statistics().broker_url or "")

    device = MqttTransport(config(f"{a.url},{b.url}", client_id="dev-1"), on_connect=hook)
    async with (
        MqttTransport(config(a.url)) as on_a,
        MqttTransport(config(b.url)) as on_b,
        device,
    ):
        await on_a.subscribe("t/#")
        await on_b.subscribe("t/#")
        await device.subscribe("cmd")
        await device.publish("t/1", b"on a", qos=1)
        assert [m.payload for m in await receive(on_a)] == [b"on a"]
        assert device.statistics().broker_url == a.url

        # Act 1: A crashes
        a.kill()
        await device.publish("t/2", b"on b", qos=1)  # waits for the next node, then sends

        # Assert 1: delivered by B; the hook ran there; the subscription was renewed there
        assert [m.payload for m in await receive(on_b)] == [b"on b"]
        stats = device.statistics()
        assert (stats.broker_url, stats.failovers) == (b.url, 1)
        await eventually(lambda: connected_to == [a.url, b.url], what="hook on B")
        await on_b.publish("cmd", b"to device", qos=1)
        assert [m.payload for m in await receive(device)] == [b"to device"]

        # Act 2: A comes back, B crashes: round the list to A
        a.start()
        await on_a.publish("probe", b"", qos=1)  # on_a reconnected (its own retry)
        await on_a.subscribe("t/#")
        b.kill()
        await device.publish("t/3", b"back on a", qos=1)

        # Assert 2
        assert [m.payload for m in await receive(on_a, within=20)] == [b"back on a"]
        stats = device.statistics()
        assert (stats.broker_url, stats.failovers) == (a.url, 2)


async def test_a_list_whose_first_node_is_down_connects_to_the_second(
    two_nodes: tuple[MosquittoBroker, MosquittoBroker],
) -> None:
    a, b = two_nodes
    a.kill()
    async with MqttTransport(config(f"{a.url},{b.url}")) as device:
        stats = device.statistics()
        assert (stats.connected, stats.broker_url, stats.failovers) == (True, b.url, 0)
        assert stats.connect_failures >= 1
