"""Real device agents keep training against a sharded tree: the root publishes every model version.

A real Mosquitto, a root process serving ``digits-mlp`` (``--model``: it publishes the retained
manifest, model chunks and server state as the single aggregator does) and one shard process
owning both partitions (P = 2), three real agents training with torch, K = 2. The agents start
on the root's version 0 (nobody else publishes a model), and the tree must go through at least
three root steps: that needs updates trained on versions 1 and 2, which only the root published,
and the shard must count them against those versions (it follows the root's manifest). The
final manifest's weights are the root's model. The root publishes METRICS as the single aggregator
does, and when it is SIGKILLed the broker publishes its Last Will: the retained server state
says ``lost``."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_parts import stop_agents
from test_monitor_fleet import FLEET, agent
from test_sharded_fedbuff import Procs
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.config import BrokerConfig, ReceiptMode, SpoolConfig
from device_agent.fetch import ModelFetch
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.protocol import ServerMetrics, ServerState, ServerStatus, decode_message
from edgefl.protocol.chunking import Reassembler, decode_chunk
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope
from edgefl.protocol.messages import ModelManifest, decode_update
from edgefl.protocol.topics import (
    ModelChunkTopic,
    ShardsLeaf,
    UpdateTopic,
    manifest_topic,
    parse_topic,
    server_metrics_topic,
    server_state_topic,
    shards_topic,
)
from edgefl.sharding.partitions import partition_of
from edgefl.transport.config import MqttConfig
from edgefl.transport.mqtt import MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

MODEL, P, K, STEPS = "digits-mlp", 2, 2, 3  # FLEET: the agents' (test_monitor_fleet)
DEVICES = ("pi-1", "pi-2", "pi-3")
PARAMS = get_model_spec(MODEL).num_params


@pytest.mark.parametrize("max_packet", [None, 1024], ids=["whole", "chunked"])
async def test_agents_keep_training_on_the_versions_the_root_publishes(
    mosquitto: MosquittoBroker, tmp_path: Path, max_packet: int | None
) -> None:
    """``chunked``: the agents publish every update in packets of at most 1 kB (digits-mlp's
    int8 update takes 3), which the shard reassembles; the root's model chunks are as small."""
    # Arrange: both partitions have devices; one shard owns them both
    assert {partition_of(d, P) for d in DEVICES} == {0, 1}
    procs = Procs([mosquitto.url] * 3, tmp_path, fleet=FLEET, params=PARAMS)
    wire = _Wire()
    write_fake_sysfs(tmp_path / "fs", mains=True)
    no_receipts = SpoolConfig(receipts=ReceiptMode.OFF)  # the shells send none yet
    small = {} if max_packet is None else {"broker": _broker(mosquitto.url, max_packet)}
    agents = [
        agent(tmp_path, mosquitto.url, d, seed, spool=no_receipts, **small)
        for seed, d in enumerate(DEVICES)
    ]
    tasks: list[asyncio.Task[None]] = []
    try:
        async with MqttTransport(MqttConfig.from_url(mosquitto.url)) as client:
            watcher = await wire.watch(client)
            state = str(tmp_path / "root.state")
            root = ["root", "--state", state, "--model", MODEL, "--lr", "0.05"]
            root += ["--metrics-interval-s", "0.5"]
            if max_packet is not None:  # the agents take no larger model chunk either
                root += ["--max-packet", str(max_packet)]
            procs.start("root", *root, partitions=P, k=K)
            await eventually(lambda: wire.manifests[:1] == [0], 60, what="version 0 published")
            procs.start("shard", "shard", "--own", "0,1", "--flush-every", "1", partitions=P, k=K)
            await eventually(lambda: wire.status.get("epochs") == {"0": 0, "1": 0}, 60)

            # Act: the agents train on whatever the root publishes
            tasks = [asyncio.create_task(a.run()) for a in agents]
            await eventually(
                lambda: wire.status.get("version", 0) >= STEPS and len(wire.bases - {0}) >= 2,
                300,
                what=f"{STEPS} root steps, updates trained on two versions after 0",
            )
            await eventually(
                lambda: all((a.statistics().model_version or 0) >= STEPS for a in agents),
                60,
                what=f"every agent on version {STEPS} or newer",
            )
            last = wire.manifests[-1]
            final = await wire.published_model(last)
            await eventually(
                lambda: any(m.extra["steps"] >= STEPS for m in wire.metrics), 10, what="METRICS"
            )
            # the root crashes: its Will replaces the retained server state
            assert wire.server_statuses[-1] is ServerStatus.ONLINE
            procs.kill("root")
            await eventually(
                lambda: wire.server_statuses[-1] is ServerStatus.LOST, 10, what="the root's Will"
            )
            watcher.cancel()
    finally:
        await stop_agents(agents, tasks)
        procs.close()

    # Assert: the root published its versions in order, from version 0 (the model's init)
    assert wire.manifests[0] == 0
    assert wire.manifests == sorted(set(wire.manifests))
    assert last >= STEPS
    assert max(wire.server_versions) >= STEPS
    # ... the agents trained on (at least two) versions only the root published, and the shard
    # counted those updates against them
    assert len(wire.bases - {0}) >= 2, wire.bases
    assert (wire.chunks_seen > 0) == (max_packet is not None)
    assert wire.status["verdicts"].get("future_version", 0) == 0
    # ... and what the root published is the root's model of that version
    np.testing.assert_array_equal(final[:64], np.asarray(wire.weights[last], np.float32))
    assert not np.array_equal(final, init_weights_numpy(get_model_spec(MODEL), 0))
    # ... its METRICS counted the updates of the applied partials and the steps
    newest = wire.metrics[-1]
    assert newest.extra["steps"] >= STEPS
    assert newest.applied >= STEPS * K
    assert newest.extra["partials"]["applied"] >= 1


@dataclass
class _Wire:
    """What the test sees on the broker: the root's status, the manifests' versions in order,
    the server state versions, the base versions of the updates and the model chunks."""

    status: dict[str, Any] = field(default_factory=dict)
    manifests: list[int] = field(default_factory=list)
    envelopes: dict[int, bytes] = field(default_factory=dict)
    server_versions: list[int] = field(default_factory=list)
    server_statuses: list[ServerStatus] = field(default_factory=list)
    metrics: list[ServerMetrics] = field(default_factory=list)
    bases: set[int] = field(default_factory=set)
    chunks: dict[str, bytes] = field(default_factory=dict)
    chunks_seen: int = 0  # update packets that were chunks
    reassembler: Reassembler = field(default_factory=Reassembler)
    weights: dict[int, list[float]] = field(default_factory=dict)  # the root's, by version

    async def watch(self, client: MqttTransport) -> asyncio.Task[None]:
        messages = client.messages()
        await client.subscribe(shards_topic(FLEET, ShardsLeaf.ROOT_STATUS))
        await client.subscribe(manifest_topic(FLEET), qos=1)
        await client.subscribe(server_state_topic(FLEET), qos=1)
        await client.subscribe(server_metrics_topic(FLEET))
        await client.subscribe(f"edgefl/v1/{FLEET}/model/+/+", qos=1)
        await client.subscribe(f"edgefl/v1/{FLEET}/part/+/device/+/update/+", qos=1)

        async def record() -> None:
            async for message in messages:
                topic = parse_topic(message.topic, expected_fleet=FLEET)
                if isinstance(topic, UpdateTopic):
                    data = self._update(topic, message.payload)
                    if data is not None:
                        header, _ = decode_update(data, topic=topic)
                        self.bases.add(header.base_version)
                elif isinstance(topic, ModelChunkTopic):
                    if message.payload:
                        self.chunks[message.topic] = message.payload
                elif message.topic == manifest_topic(FLEET):
                    version = decode_message(message.payload, ModelManifest).version
                    self.manifests.append(version)
                    self.envelopes[version] = message.payload
                elif message.topic == server_state_topic(FLEET):
                    state = decode_message(message.payload, ServerState)
                    self.server_versions.append(state.version)
                    self.server_statuses.append(state.status)
                elif message.topic == server_metrics_topic(FLEET):
                    self.metrics.append(decode_message(message.payload, ServerMetrics))
                else:
                    self.status.update(json.loads(message.payload))
                    self.weights[self.status["version"]] = self.status["weights"]

        return asyncio.get_running_loop().create_task(record())

    def _update(self, topic: UpdateTopic, payload: bytes) -> bytes | None:
        """The update ``payload`` is or completes (None: chunks missing)."""
        outer = decode_envelope(payload, max_payload=1 << 24)
        if outer.kind is not EnvelopeKind.UPDATE_CHUNK:
            return payload
        self.chunks_seen += 1
        done = self.reassembler.add(decode_chunk(outer), source=topic.device_id, now=0.0)
        return None if done is None else bytes(done.data)

    async def published_model(self, version: int) -> np.ndarray:
        """The weights of ``version``, fetched from its chunks as an agent does."""
        envelope = self.envelopes[version]
        manifest = decode_message(envelope, ModelManifest)
        fetch = ModelFetch(manifest, envelope, max_packet=256 * 1024)
        topics = [f"edgefl/v1/{FLEET}/model/{version}/{i}" for i in range(manifest.num_chunks)]
        await eventually(lambda: all(t in self.chunks for t in topics), 30, what="the chunks")
        model = None
        for t in topics:
            parsed = parse_topic(t, expected_fleet=FLEET)
            assert isinstance(parsed, ModelChunkTopic)
            model = fetch.offer(parsed, self.chunks[t]) or model
        assert model is not None
        return np.asarray(model.weights, np.float32).ravel()


def _broker(url: str, max_packet: int) -> BrokerConfig:
    """The agents' broker settings of ``agent_config``, with packets of at most ``max_packet``."""
    return BrokerConfig(url, reconnect_max_s=2.0, max_packet=max_packet)
