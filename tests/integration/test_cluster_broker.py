"""edgefl's MQTT traffic over a 3-node clustered broker (NATS Server's MQTT gateway on JetStream).

* a retained model manifest published on node A is read by a subscriber of node C (the retained
  store is cluster-wide), on loopback and with every node on a host (network namespace) of its
  own;
* QoS 1 updates published on node B reach an aggregator subscribed on node C;
* a node dies (SIGKILL): a publisher and a persistent-session aggregator, each given a list of
  broker URLs (``MqttConfig.from_url("B,A")``), fail over to other nodes, and every update whose
  publish was acknowledged reaches the aggregator (the same client retransmits its unacknowledged
  QoS 1 publishes on the new node; the session, cluster-wide, redelivers the unacknowledged
  updates to the aggregator).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster import NatsCluster, running_cluster
from waiting import eventually

from edgefl.protocol.messages import ModelFormat, ModelManifest, decode_message, encode_message
from edgefl.protocol.topics import manifest_topic, update_topic, updates_filter
from edgefl.transport.base import InboundMessage
from edgefl.transport.config import MqttConfig, MqttProtocol
from edgefl.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FLEET = "f1"
FAST = {"protocol": MqttProtocol.V311, "reconnect_min_delay": 0.2, "reconnect_max_delay": 1.0}


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three NATS nodes on loopback ports."""
    yield from running_cluster(tmp_path / "nats", netns=False)


@pytest.fixture(params=[False, True], ids=["loopback", "netns"])
def any_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NatsCluster]:
    """Three NATS nodes, on loopback and on three hosts (network namespaces)."""
    yield from running_cluster(tmp_path / "nats", netns=bool(request.param))


def _manifest(version: int) -> ModelManifest:
    artifact = bytes(4 * 10)
    return ModelManifest(
        fleet=FLEET,
        version=version,
        model="m",
        format=ModelFormat.FP32_FLAT,
        sha256=hashlib.sha256(artifact).hexdigest(),
        size=len(artifact),
        chunk_size=len(artifact),
        num_chunks=1,
        num_params=10,
        created_at=1.0,
    )


async def _next(messages: AsyncIterator[InboundMessage], within: float = 30.0) -> InboundMessage:
    async with asyncio.timeout(within):
        return await anext(messages)


async def test_retained_manifest_published_on_a_is_read_on_c(any_cluster: NatsCluster) -> None:
    node_a, _, node_c = any_cluster.urls
    manifest = _manifest(7)

    async with MqttTransport(MqttConfig.from_url(node_a, **FAST)) as publisher:
        await publisher.publish(manifest_topic(FLEET), encode_message(manifest), retain=True)
    async with MqttTransport(MqttConfig.from_url(node_c, **FAST)) as device:
        messages = device.messages()
        await device.subscribe(manifest_topic(FLEET))
        got = await _next(messages)

    assert got.retain
    assert decode_message(got.payload, ModelManifest) == manifest


async def test_qos1_updates_published_on_b_reach_c(nats_cluster: NatsCluster) -> None:
    _, node_b, node_c = nats_cluster.urls
    sent = {update_topic(FLEET, f"d{i % 3}", i): bytes([i]) * 100 for i in range(20)}
    received: dict[str, bytes] = {}

    async with MqttTransport(MqttConfig.from_url(node_c, manual_ack=True, **FAST)) as aggregator:
        messages = aggregator.messages()
        await aggregator.subscribe(updates_filter(FLEET), qos=1)
        async with MqttTransport(MqttConfig.from_url(node_b, **FAST)) as device:
            for topic, payload in sent.items():
                await device.publish(topic, payload, qos=1)
        while len(received) < len(sent):
            message = await _next(messages)
            assert message.qos == 1
            received[message.topic] = message.payload
            await aggregator.ack(message)

    assert received == sent


async def _publish_all(device: MqttTransport, seqs: range, acked: set[int]) -> None:
    for seq in seqs:
        await device.publish(update_topic(FLEET, "d1", seq), seq.to_bytes(4, "big"), qos=1)
        acked.add(seq)


async def test_node_death_fails_over_and_loses_no_acknowledged_update(
    nats_cluster: NatsCluster,
) -> None:
    node_a, node_b, node_c = nats_cluster.urls
    device = MqttTransport(MqttConfig.from_url(f"{node_b},{node_a}", **FAST))
    aggregator = MqttTransport(
        MqttConfig.from_url(
            f"{node_b},{node_c}",
            client_id="edgefl-agg",
            persistent_session=True,
            manual_ack=True,
            **FAST,
        )
    )
    acked: set[int] = set()
    received: list[int] = []

    async def consume() -> None:
        async for message in aggregator.messages():
            received.append(int.from_bytes(message.payload, "big"))
            await aggregator.ack(message)

    async with aggregator, device:
        consumer = asyncio.get_running_loop().create_task(consume())
        await aggregator.subscribe(updates_filter(FLEET), qos=1)
        await _publish_all(device, range(10), acked)
        await eventually(lambda: set(received) >= acked, what="updates before the kill")

        nats_cluster.kill(1)  # node B: both clients were connected there
        await _publish_all(device, range(10, 30), acked)
        await eventually(lambda: set(received) >= acked, within=60, what="every acked update")
        consumer.cancel()

    assert acked == set(range(30))
    assert set(received) == acked  # duplicates are allowed (at-least-once), losses are not
    assert (device.statistics().broker_url, device.statistics().failovers) == (node_a, 1)
    assert (aggregator.statistics().broker_url, aggregator.statistics().failovers) == (node_c, 1)
