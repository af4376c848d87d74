"""Chunked updates at a partition worker (edgefl.sharding.service), on the in-process broker.

The test plays the root (it grants the take-over and confirms the partial) so it can see the
exactly-once rule on the partition's session: every chunk of an update stays unacknowledged
until the partial covering the update is confirmed, and the partial equals the one of the
update sent whole."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from waiting import eventually

from edgefl.aggregator.updates import build_update_envelope
from edgefl.codec.config import CodecConfig, Quantization
from edgefl.protocol import EnvelopeKind, split_message
from edgefl.protocol.topics import (
    PartitionControl,
    ShardsLeaf,
    partition_control_topic,
    shards_topic,
    update_topic,
)
from edgefl.sharding.partial import PartialId, ShardAccumulator
from edgefl.sharding.service import PartitionWorker, WorkerSettings, fedbuff_config
from edgefl.sharding.wire import decode_partial
from edgefl.transport.memory import MemoryBroker, MemoryTransport

FP32 = CodecConfig(quantization=Quantization.FP32)
FLEET, N, DEVICE = "grove", 2000, "dev-7"
SESSION = "part-0"


def chunked_update(seq: int) -> tuple[np.ndarray, list[bytes]]:
    """An fp32 update of ``N`` params (8 kB) split into packets of at most 1 kB."""
    delta = np.random.default_rng(seq).normal(0, 0.1, N).astype(np.float32)
    whole = build_update_envelope(
        fleet=FLEET, device=DEVICE, seq=seq, base_version=0, num_examples=20, model="m",
        delta=delta, codec=FP32, rng=np.random.default_rng(0), created_at=1.0,
    )  # fmt: skip
    return delta, list(
        split_message(whole, kind=EnvelopeKind.UPDATE_CHUNK, max_packet=1024).packets
    )


async def test_chunks_are_reassembled_and_stay_unacknowledged_until_the_partial_is_confirmed() -> (
    None
):
    # Arrange: a worker of partition 0 (P = 1), granted version 0 by the test
    broker = MemoryBroker()
    settings = WorkerSettings(FLEET, "s0", 0, 1, 0, N, fedbuff_config(2), flush_every=1)
    data = MemoryTransport(broker, SESSION, persistent_session=True, manual_ack=True)
    control = MemoryTransport(broker, "part-0-control", persistent_session=True, manual_ack=True)
    root, device = MemoryTransport(broker, "root"), MemoryTransport(broker, "device")
    for c in (data, control, root, device):
        await c.connect()
    partials: list[bytes] = []
    inbox = root.messages()
    await root.subscribe(shards_topic(FLEET, ShardsLeaf.PARTIAL), qos=1)
    takeover = partition_control_topic(FLEET, 0, PartitionControl.TAKEOVER)
    await root.subscribe(takeover, qos=1)
    takeovers: list[bytes] = []

    async def read() -> None:
        async for message in inbox:
            (takeovers if message.topic == takeover else partials).append(message.payload)

    reader = asyncio.create_task(read())
    worker = asyncio.create_task(PartitionWorker(data, control, settings).run())
    try:
        await eventually(lambda: bool(takeovers), 10, what="the take-over")
        grant = {"epoch": 0, "version": 0, "high_water": {}}
        granted = partition_control_topic(FLEET, 0, PartitionControl.GRANTED)
        await root.publish(granted, json.dumps(grant).encode(), qos=1)
        delta, packets = chunked_update(seq=0)
        assert len(packets) >= 8
        topic = update_topic(FLEET, DEVICE, 0, partition=0)

        # Act 1: every chunk but one, in reverse order, one of them twice
        rest = packets[:-1][::-1]
        for packet in [*rest, rest[0]]:
            await device.publish(topic, packet, qos=1)
        # Act 2: the last chunk completes the update: a partial, all chunks still held
        await device.publish(topic, packets[-1], qos=1)
        await eventually(lambda: len(partials) == 1, 10, what="the partial")
        held_forwarded = broker.queued_for(SESSION)

        # Act 3: the root confirms it
        confirm = {"id": ["s0", 0, 0, 0], "verdict": "applied"}
        confirmed = partition_control_topic(FLEET, 0, PartitionControl.CONFIRM)
        await root.publish(confirmed, json.dumps(confirm).encode(), qos=1)
        await eventually(lambda: broker.queued_for(SESSION) == 0, 10, what="the chunks acked")
    finally:
        for task in (worker, reader):
            task.cancel()
        await asyncio.gather(worker, reader, return_exceptions=True)
        for c in (data, control, root, device):
            await c.close()

    # Assert: every chunk (the duplicate too) unacknowledged until the confirmation; one partial
    assert held_forwarded == len(packets) + 1
    assert len(partials) == 1
    # ... and the partial is the one of the update sent whole
    partial = decode_partial(partials[0], max_params=N)
    whole = ShardAccumulator(
        fedbuff_config(2), num_params=N, version=0, id_prefix=PartialId("s0", 0, 0, 0)
    )
    whole.add(DEVICE, 0, delta, base_version=0, num_examples=20)
    expected = whole.close()
    assert expected is not None
    assert partial.covered == ((DEVICE, 0),)
    assert partial.id == expected.id
    np.testing.assert_array_equal(partial.accumulator, expected.accumulator)
    assert partial.weight_sum == expected.weight_sum
