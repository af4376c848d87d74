"""A 5 MB update crosses a real Mosquitto in 256 KiB chunks and comes back bit-exact.

This is the foundation's end-to-end check: codec -> envelope -> chunking -> MQTT QoS1 ->
reassembly (chunks shuffled and duplicated on the way) -> envelope -> codec.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from edgefl.codec import CodecConfig, CodecDescriptor, Quantization, encode_update, open_update
from edgefl.protocol.chunking import DEFAULT_MAX_PACKET, Reassembler, decode_chunk, packetize
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import UpdateHeader, decode_update, encode_message
from edgefl.protocol.topics import parse_topic, update_topic, updates_filter
from edgefl.transport import MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NUM_PARAMS = 1_400_000  # 5.6 MB of fp32 (a little less after zstd)
FLEET = "lab"


def _five_megabyte_update() -> tuple[np.ndarray, bytes]:
    delta = np.random.default_rng(7).standard_normal(NUM_PARAMS).astype(np.float32)
    encoded, _ = encode_update(
        delta, CodecConfig(quantization=Quantization.FP32), rng=np.random.default_rng(0)
    )
    header = UpdateHeader(
        fleet=FLEET,
        device_id="pi-07",
        seq=3,
        base_version=12,
        num_examples=250,
        model="mlp-1m",
        codec=encoded.descriptor.to_dict(),
        num_params=NUM_PARAMS,
        created_at=1_700_000_000.0,
    )
    return delta, encode_message(header, encoded.body)


async def test_five_megabyte_update_chunked_through_mosquitto_is_bit_exact(
    mosquitto: MosquittoBroker,
) -> None:
    delta, message = _five_megabyte_update()
    packets = packetize(message)
    assert len(message) > 5_000_000
    assert all(len(p) <= DEFAULT_MAX_PACKET for p in packets)
    assert len(packets) >= 20
    # QoS1 is at-least-once and several publishers may interleave: send every chunk, in a
    # shuffled order, with a few of them twice.
    order = [*range(len(packets)), 0, 5, len(packets) - 1]
    random.Random(1).shuffle(order)
    topic = update_topic(FLEET, "pi-07", 3)

    async def main() -> bytes:
        cfg = MqttConfig.from_url(mosquitto.url, start_timeout=10.0)
        async with MqttTransport(cfg) as sub, MqttTransport(cfg) as pub:
            await sub.subscribe(updates_filter(FLEET), qos=1)
            for i in order:
                await pub.publish(topic, packets[i], qos=1)
            reassembler = Reassembler()
            stream = sub.messages()
            try:
                async with asyncio.timeout(30):
                    async for inbound in stream:
                        assert inbound.topic == topic
                        packet = decode_envelope(inbound.payload, max_payload=DEFAULT_MAX_PACKET)
                        chunk = decode_chunk(packet)
                        done = reassembler.add(chunk, source="pi-07", now=time.monotonic())
                        if done is not None:
                            return bytes(done.data)
            finally:
                await stream.aclose()
        raise AssertionError("stream ended")

    received = await main()

    assert received == message
    header, body = decode_update(received, topic=parse_topic(topic))
    assert (header.device_id, header.seq, header.base_version) == ("pi-07", 3, 12)
    decoded = open_update(
        CodecDescriptor.from_dict(header.codec),
        body,
        num_params=header.num_params,
        max_decompressed=8 * NUM_PARAMS,
    ).to_dense()
    assert decoded.tobytes() == delta.tobytes()
