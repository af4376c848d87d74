"""Real device agents on a sharded tree (protocol revision 1.3, PROTOCOL.md §11), no ``--legacy``.

A root and two shard processes (one partition each, P = 2) on a real Mosquitto; the root
publishes the retained assignment, four real agents (training the digits MLP with torch) read
P from it and publish their updates to their partition's topic. Exactly those topics reach the
shards (the shards take no plain topic): the root steps at K = 4, so no update was lost, and its
model equals single-process FedBuff over the four updates the test saw on the wire, so none was
counted twice."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_parts import stop_agents
from test_monitor_fleet import agent
from test_sharded_fedbuff import Procs
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.config import ReceiptMode, SpoolConfig
from device_agent.release import model_release
from edgefl.aggregation.fedbuff import FedBuff
from edgefl.codec.config import CodecDescriptor
from edgefl.codec.update import open_update
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.protocol.messages import decode_update
from edgefl.protocol.topics import (
    ShardsLeaf,
    UpdateTopic,
    parse_topic,
    shards_topic,
    updates_filter,
)
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.partitions import partition_of
from edgefl.sharding.service import fedbuff_config
from edgefl.transport.config import MqttConfig
from edgefl.transport.mqtt import MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FLEET, MODEL, P = "orchard", "digits-mlp", 2
DEVICES = ("pi-1", "pi-2", "pi-3", "pi-4")
PARAMS = get_model_spec(MODEL).num_params


async def test_agents_publish_to_their_partitions_and_the_root_steps_on_all_updates(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: both partitions have devices; the root, then one shard process per partition
    assert sorted(partition_of(d, P) for d in DEVICES) == [0, 0, 1, 1]
    procs = Procs([mosquitto.url] * 3, tmp_path, fleet=FLEET, params=PARAMS)
    k = len(DEVICES)
    wire = _Wire()
    status, assignment, partitioned = wire.status, wire.assignments, wire.partitioned
    write_fake_sysfs(tmp_path / "fs", mains=True)
    no_receipts = SpoolConfig(receipts=ReceiptMode.OFF)  # the shells send none yet
    agents = [
        agent(tmp_path, mosquitto.url, d, seed, spool=no_receipts) for seed, d in enumerate(DEVICES)
    ]
    tasks: list[asyncio.Task[None]] = []
    try:
        async with MqttTransport(MqttConfig.from_url(mosquitto.url)) as client:
            watcher = await wire.watch(client)
            state = str(tmp_path / "root.state")
            procs.start("root", "root", "--state", state, "--shards", "s0,s1", partitions=P, k=k)
            await eventually(lambda: "version" in status, 60, what="the root's session")
            await eventually(lambda: bool(assignment), 60, what="the retained assignment")
            for part in range(P):
                shard = ("shard", "--own", str(part), "--shard", f"s{part}", "--flush-every", "1")
                procs.start(f"shard-{part}", *shard, partitions=P, k=k)
            await eventually(lambda: status.get("epochs") == {"0": 0, "1": 0}, 60, what="grants")
            # the assignment follows the grants: s<k> owns partition k
            await eventually(
                lambda: assignment[-1].owners == ("s0", "s1"), 30, what="the owners granted"
            )
            release = model_release(FLEET, 0, MODEL, init_weights_numpy(get_model_spec(MODEL), 0))
            for topic, payload in release.messages:
                await client.publish(topic, payload, qos=1, retain=True)

            # Act: the agents train on version 0 and deliver one update each
            tasks = [asyncio.create_task(a.run()) for a in agents]
            await eventually(lambda: status.get("version") == 1, 180, what="the step at K")
            await eventually(lambda: len(partitioned) == k, 30, what="every update seen")
            watcher.cancel()
    finally:
        await stop_agents(agents, tasks)
        procs.close()

    # Assert: every update on its device's partition topic, none on a plain one
    assert wire.plain == []
    assert sorted(t.device_id for t, _ in partitioned) == sorted(DEVICES)
    assert all(t.partition == partition_of(t.device_id, P) for t, _ in partitioned)
    # ... and the root's step is single-process FedBuff over exactly those updates
    assert status["last_step"] == {"version": 1, "num_updates": k}
    reference = _fedbuff_step(partitioned)
    np.testing.assert_allclose(status["weights"], reference[:64], rtol=1e-5, atol=1e-6)
    assert status["verdicts"]["late"] == 0
    assert set(status["verdicts"]) == {"applied", "late"}  # no partial refused, none twice


@dataclass
class _Wire:
    """What the test sees: the root's status, the assignments, the updates on partition
    topics and the plain update topics."""

    status: dict[str, Any] = field(default_factory=dict)
    assignments: list[Assignment] = field(default_factory=list)
    partitioned: list[tuple[UpdateTopic, bytes]] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)

    async def watch(self, client: MqttTransport) -> asyncio.Task[None]:
        messages = client.messages()
        await client.subscribe(shards_topic(FLEET, ShardsLeaf.ROOT_STATUS))
        await client.subscribe(shards_topic(FLEET, ShardsLeaf.ASSIGNMENT))
        await client.subscribe(f"edgefl/v1/{FLEET}/part/+/device/+/update/+")
        await client.subscribe(updates_filter(FLEET))

        async def record() -> None:
            async for message in messages:
                topic = parse_topic(message.topic, expected_fleet=FLEET)
                if isinstance(topic, UpdateTopic) and topic.partition is not None:
                    self.partitioned.append((topic, message.payload))
                elif isinstance(topic, UpdateTopic):
                    self.plain.append(message.topic)
                elif message.topic.endswith("/assignment"):
                    self.assignments.append(Assignment.from_json(message.payload))
                else:
                    self.status.update(json.loads(message.payload))

        return asyncio.get_running_loop().create_task(record())


def _fedbuff_step(updates: list[tuple[UpdateTopic, bytes]]) -> np.ndarray:
    """The weights after single-process FedBuff's step (K = all) over ``updates``, from 0."""
    reference = FedBuff(fedbuff_config(len(updates)), np.zeros(PARAMS, np.float32))
    for topic, payload in updates:
        header, body = decode_update(payload, topic=topic)
        descriptor = CodecDescriptor.from_dict(header.codec)
        update = open_update(descriptor, body, num_params=PARAMS, max_decompressed=1 << 24)
        reference.add(update.to_dense(), base_version=0, num_examples=header.num_examples)
    reference.step()
    return np.asarray(reference.weights)
