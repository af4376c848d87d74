"""What the sharded root publishes (edgefl.sharding.release, RootService): the single aggregator's
model release, on the in-process broker.

A root and one real partition worker (P = 1, K = 2): the root publishes version 0 (the model's
initial weights, the training hints, chunked by ``max_packet``) and the server state at start;
after each step the committed version, which the worker follows, so updates trained on it are
counted against it. The root's connection has the server state ``lost`` as its Last Will, and it
publishes METRICS as the single aggregator does."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from waiting import eventually

from device_agent.fetch import ModelFetch
from edgefl.aggregation.fedbuff import FedBuff
from edgefl.aggregator.publisher import RateMeter
from edgefl.aggregator.updates import build_update_envelope
from edgefl.codec.config import CodecConfig, Quantization
from edgefl.models import get_model_spec, init_weights_numpy
from edgefl.protocol import (
    ServerMetrics,
    ServerState,
    ServerStatus,
    TrainingHints,
    decode_message,
    encode_message,
    server_metrics_topic,
    server_state_topic,
)
from edgefl.protocol.messages import ModelManifest
from edgefl.protocol.topics import (
    ModelChunkTopic,
    ShardsLeaf,
    manifest_topic,
    model_chunk_topic,
    parse_topic,
    shards_topic,
    update_topic,
)
from edgefl.sharding.release import (
    ModelSettings,
    PublishedFile,
    RootTotals,
    release_config,
    root_metrics,
)
from edgefl.sharding.service import PartitionWorker, RootService, WorkerSettings, fedbuff_config
from edgefl.transport.memory import MemoryBroker, MemoryTransport

FP32 = CodecConfig(quantization=Quantization.FP32)
FLEET, MODEL, K = "grove", "mlp-1k", 2
SPEC = get_model_spec(MODEL)
N = SPEC.num_params
SETTINGS = ModelSettings(
    model=MODEL, seed=3, local_epochs=3, batch_size=16, lr=0.05, max_packet=1024
)


def retained_model(broker: MemoryBroker) -> tuple[ModelManifest, np.ndarray]:
    """The retained manifest and its weights, fetched and verified as an agent does."""
    retained = broker.retained()
    envelope = retained[manifest_topic(FLEET)]
    manifest = decode_message(envelope, ModelManifest)
    fetch = ModelFetch(manifest, envelope, max_packet=SETTINGS.max_packet)
    model = None
    for i in range(manifest.num_chunks):
        topic = model_chunk_topic(FLEET, manifest.version, i)
        parsed = parse_topic(topic, expected_fleet=FLEET)
        assert isinstance(parsed, ModelChunkTopic)
        model = fetch.offer(parsed, retained[topic]) or model
    assert model is not None
    return manifest, np.asarray(model.weights, np.float32)


def server_state(broker: MemoryBroker) -> ServerState:
    return decode_message(broker.retained()[server_state_topic(FLEET)], ServerState)


def version_out(broker: MemoryBroker, version: int) -> bool:
    """Both the retained manifest and the server state say ``version``."""
    retained = broker.retained()
    if server_state_topic(FLEET) not in retained:
        return False
    manifest = decode_message(retained[manifest_topic(FLEET)], ModelManifest)
    return manifest.version == version == server_state(broker).version


def update(device: str, seq: int, base: int, examples: int) -> tuple[str, bytes, np.ndarray]:
    delta = np.random.default_rng(seq).normal(0, 0.1, N).astype(np.float32)
    envelope = build_update_envelope(
        fleet=FLEET, device=device, seq=seq, base_version=base, num_examples=examples,
        model=MODEL, delta=delta, codec=FP32, rng=np.random.default_rng(0), created_at=1.0,
    )  # fmt: skip
    return update_topic(FLEET, device, seq, partition=0), envelope, delta


@dataclass
class Tree:
    broker: MemoryBroker
    root: RootService
    device: MemoryTransport
    published: PublishedFile
    root_connection: MemoryTransport


@asynccontextmanager
async def tree(
    tmp_path: Path, epoch: int = 0, settings: ModelSettings = SETTINGS
) -> AsyncIterator[Tree]:
    """A root (publishing; its connection with the root's Will) and the worker of partition 0
    (owner ``epoch``), running, on a new in-process broker; a device's connection."""
    broker, state = MemoryBroker(), tmp_path / "root.state"
    config = release_config(
        settings, broker_url="mqtt://memory", fleet=FLEET, state_dir=tmp_path, buffer_size=K
    )
    published = PublishedFile(tmp_path / "root.published")
    buffer, assignment = RootService.load(
        fedbuff_config(K),
        state,
        partitions=1,
        params=N,
        shards=["s0"],
        initial=init_weights_numpy(SPEC, SETTINGS.seed),
    )
    worker_settings = WorkerSettings(
        FLEET, "s0", 0, 1, epoch, N, fedbuff_config(K), flush_every=1, flush_after=60.0
    )
    root = RootService(buffer, FLEET, state, assignment, (config, published))
    will = root.will()
    connections = [
        MemoryTransport(broker, "root", persistent_session=True, manual_ack=True, will=will),
        MemoryTransport(broker, "part-0", persistent_session=True, manual_ack=True),
        MemoryTransport(broker, "part-0-control", persistent_session=True, manual_ack=True),
        MemoryTransport(broker, "device"),
    ]
    for c in connections:
        await c.connect()
    root_t, data, control, device = connections
    worker = PartitionWorker(data, control, worker_settings)
    tasks = [asyncio.create_task(root.run(root_t)), asyncio.create_task(worker.run())]
    try:  # the worker subscribed to its updates before it asked for the partition
        status = shards_topic(FLEET, ShardsLeaf.ROOT_STATUS)
        await eventually(
            lambda: b'"epochs":{"0":%d}' % epoch in broker.retained().get(status, b""),
            10,
            what="grant",
        )
        yield Tree(broker, root, device, published, root_t)
    finally:
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled()]
        failed = [exc for exc in failed if exc is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert failed == [], failed  # neither the root nor the worker may have died
        for c in connections:
            await c.close()


async def test_root_publishes_version_zero_then_every_step_which_the_worker_follows(
    tmp_path: Path,
) -> None:
    async with tree(tmp_path) as t:
        # Arrange: version 0 is out, with the aggregator's fields
        await eventually(lambda: manifest_topic(FLEET) in t.broker.retained(), 10, what="v0")
        manifest, weights = retained_model(t.broker)
        init = init_weights_numpy(SPEC, SETTINGS.seed)
        assert (manifest.version, manifest.model) == (0, MODEL)
        assert manifest.num_chunks > 1
        expected_hints = TrainingHints(
            local_epochs=3, batch_size=16, lr=0.05, codec=CodecConfig().to_dict()
        )
        assert manifest.hints == expected_hints
        np.testing.assert_array_equal(weights, init)
        first = server_state(t.broker)
        assert (first.version, first.buffer_size, first.session) == (0, K, 1)

        # Act: two updates on version 0, then two trained on the version 1 the root published
        round0 = [update("a", 0, 0, 10), update("b", 1, 0, 30)]
        for topic, payload, _ in round0:
            await t.device.publish(topic, payload, qos=1)

        await eventually(lambda: version_out(t.broker, 1), 10, what="version 1 published")
        manifest1, weights1 = retained_model(t.broker)
        for topic, payload, _ in [update("a", 2, 1, 10), update("b", 3, 1, 30)]:
            await t.device.publish(topic, payload, qos=1)
        await eventually(lambda: version_out(t.broker, 2), 10, what="version 2 published")

    # Assert: version 1 is FedBuff's step over round 0 from the initial weights
    reference = FedBuff(fedbuff_config(K), init)
    for (_, _, delta), examples in zip(round0, (10, 30), strict=True):
        reference.add(delta, base_version=0, num_examples=examples)
    reference.step()
    np.testing.assert_allclose(weights1, reference.weights, rtol=1e-6, atol=1e-7)
    assert manifest1.hints == expected_hints
    # ... version 2 counted the updates on version 1 (none refused as from the future)
    final = server_state(t.broker)
    assert (final.version, final.applied, final.buffer_fill) == (2, 4, 0)
    # ... and the chunk sets on the broker are recorded for a restarted root to clear
    recorded = PublishedFile(tmp_path / "root.published")
    assert recorded.retained(30.0).versions == {0, 1, 2}
    assert recorded.start_session() == 2


async def test_restarted_root_publishes_its_committed_version_with_a_new_session(
    tmp_path: Path,
) -> None:
    async with tree(tmp_path) as t:
        for topic, payload, _ in [update("a", 0, 0, 10), update("b", 1, 0, 30)]:
            await t.device.publish(topic, payload, qos=1)
        await eventually(lambda: version_out(t.broker, 1), 10, what="version 1")
        _, before = retained_model(t.broker)

    async with tree(tmp_path, epoch=1) as again:  # a new broker: only the root's files carry over
        await eventually(lambda: version_out(again.broker, 1), 10, what="republished")
        manifest, weights = retained_model(again.broker)
        state = server_state(again.broker)
    assert (manifest.version, state.version, state.session) == (1, 1, 2)
    np.testing.assert_array_equal(weights, before)


async def test_a_crashed_roots_will_leaves_the_server_state_lost(tmp_path: Path) -> None:
    async with tree(tmp_path) as t:
        for topic, payload, _ in [update("a", 0, 0, 10), update("b", 1, 0, 30)]:
            await t.device.publish(topic, payload, qos=1)
        await eventually(lambda: version_out(t.broker, 1), 10, what="version 1")
        assert server_state(t.broker).status is ServerStatus.ONLINE

        # Act: the root's connection ends without DISCONNECT (a crash)
        await t.root_connection.disconnect(abrupt=True)

        # Assert: the broker put the root's Will in place of the retained server state
        lost = server_state(t.broker)
        assert lost.status is ServerStatus.LOST
        assert (lost.fleet, lost.session, lost.buffer_size) == (FLEET, 1, K)


async def test_a_root_closing_cleanly_leaves_no_lost_state(tmp_path: Path) -> None:
    async with tree(tmp_path) as t:
        await eventually(lambda: version_out(t.broker, 0), 10, what="version 0")
        await t.root_connection.disconnect()  # DISCONNECT: the broker drops the Will
        assert server_state(t.broker).status is ServerStatus.ONLINE


async def test_the_root_publishes_metrics_of_its_partials_and_steps(tmp_path: Path) -> None:
    seen: list[ServerMetrics] = []
    fast = dataclasses.replace(SETTINGS, metrics_interval_s=0.05)
    async with tree(tmp_path, settings=fast) as t:
        messages = t.device.messages()
        await t.device.subscribe(server_metrics_topic(FLEET), qos=0)

        async def watch() -> None:
            async for message in messages:
                seen.append(decode_message(message.payload, ServerMetrics))

        watcher = asyncio.create_task(watch())
        # Act: three updates, one partial each (flush_every=1): one step (K = 2), one buffered
        sent = [update("a", 0, 0, 10), update("b", 1, 0, 30), update("c", 2, 0, 20)]
        for topic, payload, _ in sent:
            await t.device.publish(topic, payload, qos=1)
        await eventually(lambda: bool(seen) and seen[-1].applied == 3, 10, what="METRICS")
        watcher.cancel()

    # Assert: the figures of the applied partials, as the single aggregator's fields
    last = seen[-1]
    assert (last.fleet, last.version, last.buffer_fill, last.buffer_size) == (FLEET, 1, 1, K)
    assert (last.received, last.applied) == (3, 3)
    assert last.bytes_ingested > 3 * N * 4  # three float32 partial sums, and their headers
    assert last.extra["steps"] == 1
    assert last.extra["partials"]["applied"] == 3
    assert last.extra["session"] == 1
    assert last.extra["staleness_max"] in (0, 1)  # "c" (on 0) is counted against 0 or 1
    assert any(m.updates_per_s > 0 and m.bytes_per_s > 0 for m in seen)


def test_root_metrics_report_the_staleness_the_partials_carry() -> None:
    totals = RootTotals(received=5, applied=4, bytes=900, staleness_sum=6, staleness_max=3)
    metrics = root_metrics(
        FLEET,
        version=7,
        buffer_fill=4,
        buffer_size=3,
        totals=totals,
        rates=(2.0, 450.0),
        verdicts={"applied": 2, "duplicate": 1},
        session=2,
    )
    assert (metrics.received, metrics.applied, metrics.bytes_ingested) == (5, 4, 900)
    assert (metrics.updates_per_s, metrics.bytes_per_s) == (2.0, 450.0)
    assert metrics.buffer_fill == 3  # a buffer over K (the partial that crossed it) shows full
    assert metrics.staleness == {}  # partials carry no histogram
    assert (metrics.extra["staleness_mean"], metrics.extra["staleness_max"]) == (1.5, 3)
    assert metrics.extra["partials"] == {"applied": 2, "duplicate": 1}
    assert decode_message(encode_message(metrics), ServerMetrics) == metrics  # a valid message


def test_rate_meter_gives_per_second_rates_since_the_previous_reading() -> None:
    meter = RateMeter(10.0, (0, 0))
    assert meter.read(12.0, (6, 100)) == (3.0, 50.0)
    assert meter.read(14.0, (6, 300)) == (0.0, 100.0)
    assert meter.read(15.0, (2, 300)) == (0.0, 0.0)  # a total that went down: no negative rate
