"""Devices publish to their partition (protocol revision 1.3, PROTOCOL.md §11): the router's
partition is the shards' own function, the agent follows the root's retained assignment, and a
changed assignment moves the next update, never a chunk of the one being sent.

Real parts: the agent, its spool and its chunked sends on the in-process MemoryBroker."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from agent_helpers import DATA, DEVICE, FLEET, collect, make_config, publish_model
from receipt_helpers import spool_updates
from waiting import eventually

from device_agent.agent import DeviceAgent
from device_agent.partition import PartitionRouter
from edgefl.errors import RejectReason
from edgefl.protocol.topics import (
    ShardsLeaf,
    UpdateTopic,
    parse_topic,
    shards_topic,
    update_topic,
)
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.partitions import check_owner, partition_of
from edgefl.transport import MemoryBroker, MemoryTransport, OnConnect, Will
from firmware_sim.fake_sysfs import write_fake_sysfs

ASSIGNMENT = shards_topic(FLEET, ShardsLeaf.ASSIGNMENT)


def _assignment(partitions: int) -> bytes:
    return Assignment.initial(partitions, ["s0", "s1"]).to_json()


def test_a_devices_partition_is_the_one_the_shards_check() -> None:
    rejected: list[tuple[RejectReason, str]] = []
    for partitions in (1, 2, 7, 64, 65536):
        for i in range(50):
            device = f"dev{i}"
            router = PartitionRouter(FLEET, device)
            router.on_message(_assignment(partitions), reject=lambda r, d: rejected.append((r, d)))
            topic = parse_topic(router.update_topic(3), expected_fleet=FLEET)
            assert isinstance(topic, UpdateTopic)
            # the topic's partition is the device's, and the owner's check accepts it
            assert topic.partition == router.partition == partition_of(device, partitions)
            assert check_owner(topic, partitions) == topic.partition
    assert not rejected
    # fixed values (PROTOCOL.md §11): the hash is part of the protocol, not of one process
    router = PartitionRouter(FLEET, "dev0")
    router.on_message(_assignment(64), reject=lambda r, d: None)
    assert router.partition == 27


def test_plain_topic_without_assignment_partition_topic_with_one_back_when_cleared() -> None:
    rejected: list[RejectReason] = []
    router = PartitionRouter(FLEET, DEVICE)
    plain = update_topic(FLEET, DEVICE, 5)
    assert router.handles(ASSIGNMENT)
    assert not router.handles(plain)
    assert router.update_topic(5) == plain  # no tree known: a 1.0 aggregator, unchanged

    router.on_message(_assignment(7), reject=lambda r, d: rejected.append(r))
    assert router.update_topic(5) == update_topic(FLEET, DEVICE, 5, partition=2)

    router.on_message(b'{"partitions": 0}', reject=lambda r, d: rejected.append(r))
    assert rejected == [RejectReason.BAD_HEADER]  # refused, counted, the previous one kept
    assert router.partitions == 7

    router.on_message(b"", reject=lambda r, d: rejected.append(r))  # the retained one cleared
    assert router.update_topic(5) == plain


class _Switching(MemoryTransport):
    """The agent's transport: after the first packet of update 0 it publishes a new retained
    assignment and waits until the agent took it in, so the other chunks go out after it."""

    def __init__(
        self,
        broker: MemoryBroker,
        holder: dict[str, DeviceAgent],
        will: Will,
        on_connect: OnConnect,
    ) -> None:
        super().__init__(broker, DEVICE, will=will, on_connect=on_connect)
        self._b, self._holder = broker, holder

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await super().publish(topic, payload, qos=qos, retain=retain)
        parsed = parse_topic(topic, expected_fleet=FLEET)
        if isinstance(parsed, UpdateTopic) and parsed.seq == 0 and "switched" not in self._holder:
            self._holder["switched"] = self._holder["agent"]
            self._b.publish(ASSIGNMENT, _assignment(7), 1, True)
            router = self._holder["agent"]._routes.partitions  # the test's probe
            await eventually(lambda: router.partitions == 7, what="the new assignment")


async def test_a_new_assignment_moves_the_next_update_never_a_chunk_of_this_one(
    tmp_path: Path,
) -> None:
    # Arrange: two spooled updates, each many chunks (max_packet 1 kB), P = 2 retained
    before, after = partition_of(DEVICE, 2), partition_of(DEVICE, 7)
    assert before != after
    cfg = make_config(tmp_path)
    cfg = dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, max_packet=1024))
    broker = MemoryBroker()
    publish_model(broker, 0)
    broker.publish(ASSIGNMENT, _assignment(2), 1, True)
    spool_updates(tmp_path, 2)
    write_fake_sysfs(tmp_path / "fs", mains=False)  # on battery: no training, only the spool
    seen, stop_observer = await collect(broker, f"edgefl/v1/{FLEET}/#")
    holder: dict[str, DeviceAgent] = {}

    def make(will: Will, on_connect: OnConnect) -> MemoryTransport:
        return _Switching(broker, holder, will, on_connect)

    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=make)
    holder["agent"] = agent
    run = asyncio.create_task(agent.run())
    # Act
    await eventually(lambda: agent.statistics().updates_sent == 2)
    agent.stop()
    await run
    await stop_observer()

    # Assert: every chunk of update 0 on partition 2-of-P=2's topic, update 1 on P=7's
    topics: dict[int, set[str]] = {}
    for message in seen:
        parsed = parse_topic(message.topic, expected_fleet=FLEET)
        if isinstance(parsed, UpdateTopic):
            topics.setdefault(parsed.seq, set()).add(message.topic)
    assert topics == {
        0: {update_topic(FLEET, DEVICE, 0, partition=before)},
        1: {update_topic(FLEET, DEVICE, 1, partition=after)},
    }
    assert "switched" in holder


@pytest.mark.parametrize("retained", [False, True])
async def test_the_agent_publishes_to_its_partition_only_when_an_assignment_is_retained(
    tmp_path: Path, retained: bool
) -> None:
    cfg = make_config(tmp_path)
    broker = MemoryBroker()
    publish_model(broker, 0)
    if retained:
        broker.publish(ASSIGNMENT, _assignment(7), 1, True)
    spool_updates(tmp_path, 1)
    write_fake_sysfs(tmp_path / "fs", mains=False)
    seen, stop_observer = await collect(broker, f"edgefl/v1/{FLEET}/#")

    def make(will: Will, on_connect: OnConnect) -> MemoryTransport:
        return MemoryTransport(broker, DEVICE, will=will, on_connect=on_connect)

    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=make)
    run = asyncio.create_task(agent.run())
    await eventually(lambda: agent.statistics().updates_sent == 1)
    agent.stop()
    await run
    await stop_observer()
    updates = [
        m.topic for m in seen if isinstance(parse_topic(m.topic, expected_fleet=FLEET), UpdateTopic)
    ]

    partition = partition_of(DEVICE, 7) if retained else None
    assert updates == [update_topic(FLEET, DEVICE, 0, partition=partition)]
    assert not agent.statistics().rejected
