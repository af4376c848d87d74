"""The aggregator service over the in-memory broker: steps, manifests, rejections, restarts."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import eventually

from edgefl.aggregation import (
    ConstantStaleness,
    ExampleWeighting,
    FedBuff,
    NormBound,
)
from edgefl.aggregator import Aggregator, AggregatorConfig, AggregatorStatistics
from edgefl.aggregator.service import initial_state
from edgefl.aggregator.updates import build_update_envelope, build_update_packets
from edgefl.codec import CodecConfig, Quantization
from edgefl.protocol import (
    EnvelopeKind,
    ModelManifest,
    Reassembler,
    ServerState,
    ServerStatus,
    UpdateHeader,
    decode_chunk,
    decode_envelope,
    decode_message,
    encode_message,
    manifest_topic,
    model_chunk_topic,
    packetize,
    server_state_topic,
    update_topic,
)
from edgefl.protocol.messages import message_from_envelope
from edgefl.transport import MemoryBroker, MemoryTransport

FLEET = "lab"
MODEL = "digits-mlp"
FP32 = CodecConfig(quantization=Quantization.FP32)


def make_config(tmp_path: Path, **overrides: Any) -> AggregatorConfig:
    values: dict[str, Any] = {
        "broker_url": "mqtt://127.0.0.1:1",
        "fleet": FLEET,
        "model": MODEL,
        "state_dir": tmp_path / "state",
        "buffer_size": 2,
        "staleness": "constant",
        "norm_bound": "off",
        "example_weighting": "examples",
        "metrics_interval_s": 0.2,
        "batch_linger_s": 0.0,
    }
    values.update(overrides)
    return AggregatorConfig.build(**values)


def delta(seed: int, n: int = 2410, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def update(device: str, seq: int, d: np.ndarray, **fields: Any) -> dict[str, Any]:
    """The fields of an FP32 update of the fleet's model from version 0; ``fields`` override."""
    values = {"fleet": FLEET, "model": MODEL, "base_version": 0, "codec": FP32, **fields}
    return {"device": device, "seq": seq, "delta": d, **values}


class Harness:
    """One aggregator on a MemoryBroker plus a device connection to publish with."""

    def __init__(self, broker: MemoryBroker, config: AggregatorConfig) -> None:
        self.broker = broker
        self.config = config
        self.transport = MemoryTransport(
            broker, "aggregator", persistent_session=True, manual_ack=True
        )
        self.versions: list[int] = []
        self.agg = Aggregator(
            config, transport=self.transport, on_version=lambda r: self.versions.append(r.version)
        )
        self.device = MemoryTransport(broker, "device")

    async def __aenter__(self) -> Harness:
        ready = asyncio.Event()
        self.task = asyncio.create_task(self.agg.run(ready))
        await asyncio.wait_for(ready.wait(), 10)
        await self.device.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.agg.stop()
        await asyncio.wait_for(self.task, 10)
        await self.device.close()

    async def send(self, device: str, seq: int, base: int, d: np.ndarray, **kw: Any) -> None:
        topic, packets = build_update_packets(**update(device, seq, d, base_version=base, **kw))
        for p in packets:
            await self.device.publish(topic, p, qos=1)

    def stats(self) -> AggregatorStatistics:
        return self.agg.statistics()

    async def until(self, cond: Callable[[AggregatorStatistics], bool]) -> AggregatorStatistics:
        await eventually(lambda: cond(self.stats()))
        return self.stats()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def retained_model(broker: MemoryBroker) -> tuple[ModelManifest, np.ndarray]:
    retained = broker.retained()
    manifest = decode_message(retained[manifest_topic(FLEET)], ModelManifest)
    reassembler = Reassembler()
    data = None
    for i in range(manifest.num_chunks):
        chunk = decode_chunk(
            decode_envelope(
                retained[model_chunk_topic(FLEET, manifest.version, i)], max_payload=1 << 20
            )
        )
        assert chunk.kind is EnvelopeKind.MODEL_CHUNK
        done = reassembler.add(chunk, source="agg", now=0.0)
        if done is not None:
            data = done.data
    assert data is not None
    return manifest, np.frombuffer(data, dtype="<f4").copy()


def test_version_zero_is_published_with_hints(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, local_epochs=3, lr=0.05)

    async def body() -> None:
        async with Harness(broker, config):
            manifest, weights = retained_model(broker)
            assert manifest.version == 0
            assert manifest.model == MODEL
            assert manifest.num_params == 2410
            assert manifest.hints is not None
            assert manifest.hints.local_epochs == 3
            assert manifest.hints.codec == CodecConfig().to_dict()
            np.testing.assert_array_equal(weights, initial_state(config).weights)
            state = decode_message(broker.retained()[server_state_topic(FLEET)], ServerState)
            assert state.status is ServerStatus.ONLINE
            assert state.buffer_size == 2
        state = decode_message(broker.retained()[server_state_topic(FLEET)], ServerState)
        assert state.status is ServerStatus.OFFLINE

    run(body)


def test_two_updates_make_the_weighted_mean_step(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path)
    w0 = initial_state(config).weights
    d1, d2 = delta(1), delta(2)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("dev-a", 1, 0, d1, num_examples=10)
            s = await h.until(lambda s: s.applied == 1)
            assert (s.version, s.buffer_fill) == (0, 1)
            await h.send("dev-b", 7, 0, d2, num_examples=30)
            s = await h.until(lambda s: s.version == 1)
            await eventually(lambda: retained_model(broker)[0].version == 1)
            assert h.versions == [1]
            assert [r.version for r in h.agg.history()] == [0, 1]
            assert h.agg.history()[1].applied == 2
        _manifest, weights = retained_model(broker)
        expected = w0 + (10 * d1 + 30 * d2) / 40
        np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-6)
        assert broker.queued_for("aggregator") == 0

    run(body)


def test_every_rejection_is_counted_and_acknowledged(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=1, max_staleness=0, rate_limit_per_minute=2)

    async def body() -> None:
        async with Harness(broker, config) as h:
            dev = h.device
            await dev.publish(
                update_topic(FLEET, "junk", 1), b"not an envelope, just 32 bytes!!", qos=1
            )
            await h.send("d1", 1, 0, delta(1), model="mnist1d-cnn")  # wrong model (any size)
            await h.send("d1", 2, 0, delta(2, n=100))  # right name, wrong size
            await h.send("d1", 3, 5, delta(3))  # trained on a version never published
            await h.send("d1", 300, 0, delta(4))  # accepted -> version 1
            await h.until(lambda s: s.version == 1)
            await h.send("d1", 300, 0, delta(4))  # same (device, seq) again
            await h.send("d1", 44, 1, delta(3))  # 256 below the highest: outside the seq window
            await h.send("d2", 1, 0, delta(5))  # base 0 at version 1, max_staleness 0
            envelope = build_update_envelope(
                fleet=FLEET, model=MODEL, device="d2", seq=2, base_version=1, delta=delta(6)
            )
            await dev.publish(update_topic(FLEET, "d2", 3), envelope, qos=1)  # topic != header
            await h.send("d3", 1, 1, delta(7))  # accepted -> version 2
            await h.send("d3", 2, 2, delta(8))  # accepted -> version 3
            await h.send("d3", 3, 3, delta(9))  # third in a minute: rate limited
            s = await h.until(lambda s: s.received == 12)
        assert s.applied == 3
        assert s.version == 3
        assert dict(s.rejected) == {
            "bad_magic": 1,
            "wrong_model": 1,
            "shape_mismatch": 1,
            "future_version": 1,
            "duplicate": 1,
            "replay": 1,
            "stale": 1,
            "bad_header": 1,
            "rate_limited": 1,
        }
        assert s.staleness == {0: 3}
        assert broker.queued_for("aggregator") == 0
        assert h.transport.statistics().acked == 12

    run(body)


def test_non_finite_and_bad_codec_are_rejected(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path)

    async def body() -> None:
        async with Harness(broker, config) as h:
            good = build_update_envelope(**update("d", 1, delta(1)))
            payload = bytearray(good)
            env = decode_envelope(good, max_payload=1 << 20)
            body_offset = len(good) - 4 - len(env.payload)
            # fp32 body inside zstd: corrupt the compressed payload -> bad compression
            payload[body_offset + 20 : body_offset + 28] = b"\xff" * 8
            from edgefl.protocol.envelope import encode_envelope

            forged = encode_envelope(
                EnvelopeKind.UPDATE, env.header, bytes(payload[body_offset:-4])
            )
            await h.device.publish(update_topic(FLEET, "d", 1), forged, qos=1)
            nan = delta(2)
            nan[3] = math.nan
            header = dict(env.header)
            header["seq"] = 2
            import zstandard

            raw = np.zeros(2410, dtype="<f4")
            raw[:] = nan
            nan_body = zstandard.ZstdCompressor().compress(raw.tobytes())
            header["codec"] = dict(header["codec"], raw_size=raw.nbytes)
            await h.device.publish(
                update_topic(FLEET, "d", 2),
                encode_envelope(EnvelopeKind.UPDATE, header, nan_body),
                qos=1,
            )
            s = await h.until(lambda s: s.received == 2)
        assert s.applied == 0
        assert s.rejected.get("non_finite") == 1
        assert sum(s.rejected.values()) == 2

    run(body)


def test_restart_replays_the_buffer_exactly(tmp_path: Path) -> None:
    """K = 3: two updates, stop, restart, third update -> same weights as without a restart."""
    broker = MemoryBroker()
    config = make_config(
        tmp_path,
        buffer_size=3,
        server_momentum=0.9,
        norm_bound="adaptive-clip",
        staleness="polynomial",
    )
    ds = [delta(i, scale=0.01 * i) for i in (1, 2, 3, 4, 5, 6)]
    w0 = initial_state(config).weights

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("a", 1, 0, ds[0], num_examples=5)
            await h.send("b", 1, 0, ds[1], num_examples=7)
            await h.send("c", 1, 0, ds[2], num_examples=9)
            await h.until(lambda s: s.version == 1)
            await h.send("a", 2, 1, ds[3], num_examples=11)
            await h.send("b", 2, 0, ds[4], num_examples=13)
            await h.until(lambda s: s.applied == 5)
        async with Harness(broker, config) as h:
            s = h.stats()
            assert (s.version, s.buffer_fill, s.applied) == (1, 2, 5)
            await h.send("b", 2, 0, ds[4], num_examples=13)  # redelivered by a device spool
            await h.send("c", 2, 1, ds[5], num_examples=17)
            s = await h.until(lambda s: s.version == 2)
            assert s.rejected == {"duplicate": 1}
            await eventually(lambda: len(h.agg.history()) == 3)  # appended once committed
            assert [r.version for r in h.agg.history()] == [0, 1, 2]
        _, weights = retained_model(broker)
        reference = FedBuff(config.fedbuff_config(), w0)
        for d, base, n in [(ds[0], 0, 5), (ds[1], 0, 7), (ds[2], 0, 9)]:
            reference.add(d, base_version=base, num_examples=n)
        reference.step()
        for d, base, n in [(ds[3], 1, 11), (ds[4], 0, 13), (ds[5], 1, 17)]:
            reference.add(d, base_version=base, num_examples=n)
        reference.step()
        np.testing.assert_array_equal(weights, reference.weights)

    run(body)


def test_unacknowledged_messages_are_redelivered_after_a_crash(tmp_path: Path) -> None:
    """Messages that arrive while the aggregator is down wait in its persistent session."""
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=4)

    async def body() -> None:
        async with Harness(broker, config):
            pass
        device = MemoryTransport(broker, "late-device")
        await device.connect()
        for seq in (1, 2, 3):
            topic, packets = build_update_packets(**update("x", seq, delta(seq)))
            await device.publish(topic, packets[0], qos=1)
        assert broker.queued_for("aggregator") == 3
        async with Harness(broker, config) as h:
            s = await h.until(lambda s: s.applied == 3)
            assert s.buffer_fill == 3
        await device.close()

    run(body)


def test_chunked_update_holds_its_acks_until_complete(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=5)

    async def body() -> None:
        async with Harness(broker, config) as h:
            topic, packets = build_update_packets(**update("c", 1, delta(1)), max_packet=2048)
            assert len(packets) > 3
            for p in packets[:-1]:
                await h.device.publish(topic, p, qos=1)
            await h.device.publish(topic, packets[0], qos=1)  # a duplicate chunk
            s = await h.until(lambda s: s.commits.pending_acks == len(packets))
            assert s.applied == 0
            assert broker.queued_for("aggregator") == len(packets)
            await h.device.publish(topic, packets[-1], qos=1)
            s = await h.until(lambda s: s.applied == 1)
            await eventually(lambda: broker.queued_for("aggregator") == 0)
            assert s.commits.pending_acks == 0
            await h.device.publish(topic, packets[1], qos=1)  # late duplicate: acked at once
            await eventually(lambda: h.transport.statistics().acked == len(packets) + 2)

    run(body)


def test_fedavg_rounds_close_on_cohort_or_deadline(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(
        tmp_path, algorithm="fedavg", buffer_size=3, round_deadline_s=1.0, min_fraction=0.3
    )
    w0 = initial_state(config).weights
    ds = [delta(i) for i in range(6)]

    async def body() -> None:
        async with Harness(broker, config) as h:
            for i, dev in enumerate(("a", "b", "c")):
                await h.send(dev, 1, 0, ds[i], num_examples=10)
            s = await h.until(lambda s: s.version == 1)
            assert s.rounds.by_status == {"complete": 1}
            await h.send("a", 2, 0, ds[3])  # trained on version 0: stale in a sync round
            await h.send("b", 2, 1, ds[4], num_examples=10)
            await h.send("b", 3, 1, ds[5], num_examples=10)  # second update of b this round
            s = await h.until(lambda s: s.version == 2)
            assert s.rounds.by_status == {"complete": 1, "partial": 1}
            assert s.rejected == {"stale": 1, "duplicate": 1}
        _, weights = retained_model(broker)
        expected = w0 + (ds[0] + ds[1] + ds[2]) / 3 + ds[4]
        np.testing.assert_allclose(weights, expected, atol=1e-6)

    run(body)


def test_state_dir_of_another_model_is_refused(tmp_path: Path) -> None:
    broker = MemoryBroker()

    async def body() -> None:
        async with Harness(broker, make_config(tmp_path)):
            pass
        agg = Aggregator(
            make_config(tmp_path, model="mnist1d-cnn"),
            transport=MemoryTransport(broker, "aggregator", persistent_session=True),
        )
        with pytest.raises(RuntimeError, match="holds state for model"):
            await agg.run()

    run(body)


def test_norm_bound_and_examples_reach_the_core(tmp_path: Path) -> None:
    """Config knobs map onto the FedBuff core (static reject bound, equal weighting)."""
    config = make_config(
        tmp_path, norm_bound="static-reject", max_norm=1.0, example_weighting="equal"
    )
    core = config.fedbuff_config()
    assert core.norm_bound == NormBound.static(1.0, "reject")  # type: ignore[arg-type]
    assert core.example_weighting is ExampleWeighting.EQUAL
    assert isinstance(core.staleness, ConstantStaleness)
    with pytest.raises(ValueError, match="max_norm"):
        make_config(tmp_path, norm_bound="static-clip")


def test_restart_from_a_checkpoint_is_exact(tmp_path: Path) -> None:
    """Once the stored bodies outweigh the replay bound (4 checkpoints), the buffer is stored as
    a checkpoint (the accumulator); a restart from it plus the bodies stored after it is still
    exact. fp32 bodies (4 B/param) against 12 B/param checkpoints: the 13th update crosses."""
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=16, server_momentum=0.5, staleness="polynomial")
    ds = [delta(i, scale=0.01 * i) for i in range(1, 17)]
    w0 = initial_state(config).weights

    async def body() -> None:
        async with Harness(broker, config) as h:
            for i in range(14):
                await h.send(f"d{i}", 1, 0, ds[i], num_examples=3 + i)
                want = i + 1
                await h.until(lambda s: s.applied == want)  # noqa: B023
        db = sqlite3.connect(config.state_dir / "state.sqlite")
        checkpoints = db.execute("SELECT value FROM counters WHERE name = 'checkpoints'")
        assert checkpoints.fetchone()[0] >= 1
        rows = db.execute("SELECT COUNT(*) FROM buffer").fetchone()[0]
        assert rows < 14  # the earlier updates live in the checkpoint
        db.close()
        async with Harness(broker, config) as h:
            assert (h.stats().buffer_fill, h.stats().applied) == (14, 14)
            for i in (14, 15):
                await h.send(f"d{i}", 1, 0, ds[i], num_examples=3 + i)
            await h.until(lambda s: s.version == 1)
        _, weights = retained_model(broker)
        reference = FedBuff(config.fedbuff_config(), w0)
        for i in range(16):
            reference.add(ds[i], base_version=0, num_examples=3 + i)
        reference.step()
        np.testing.assert_allclose(weights, reference.weights, rtol=0, atol=1e-7)

    run(body)


def test_fedavg_round_survives_a_restart(tmp_path: Path) -> None:
    """A FedAvg round's members and partial sum come back from the stored updates."""
    broker = MemoryBroker()
    config = make_config(tmp_path, algorithm="fedavg", buffer_size=3, round_deadline_s=30.0)
    w0 = initial_state(config).weights
    ds = [delta(i) for i in range(3)]

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("a", 1, 0, ds[0], num_examples=10)
            await h.send("b", 1, 0, ds[1], num_examples=20)
            await h.until(lambda s: s.applied == 2)
        async with Harness(broker, config) as h:
            assert h.stats().buffer_fill == 2
            await h.send("b", 2, 0, ds[1], num_examples=20)  # b is already in this round
            await h.send("c", 1, 0, ds[2], num_examples=30)
            s = await h.until(lambda s: s.version == 1)
            assert s.rounds.by_status == {"complete": 1}
            assert s.rejected == {"duplicate": 1}
        await eventually(lambda: retained_model(broker)[0].version == 1)
        _, weights = retained_model(broker)
        expected = w0 + (10 * ds[0] + 20 * ds[1] + 30 * ds[2]) / 60
        np.testing.assert_allclose(weights, expected, atol=1e-6)

    run(body)


def test_large_updates_are_inflated_off_the_loop_and_give_the_same_step(tmp_path: Path) -> None:
    """Bodies over 256 KiB (here fp32 updates of a 100k model, 400 kB in two chunks) are
    decompressed on the inflate thread; the step is the same weighted mean, a truncated body is
    still rejected (bad_compression), and everything is acknowledged."""
    broker = MemoryBroker()
    config = make_config(tmp_path, model="mlp-100k", buffer_size=3)
    w0 = initial_state(config).weights
    n = w0.shape[0]
    ds = [delta(i, n=n) for i in range(3)]

    async def body() -> None:
        async with Harness(broker, config) as h:
            for i, d in enumerate(ds):
                await h.send(f"d{i}", 1, 0, d, model="mlp-100k", num_examples=10 * (i + 1))
            await h.until(lambda s: s.version == 1)
            s = h.stats()
            assert s.applied == 3
            running = h.agg._running
            assert running is not None
            assert running.inflater._threads
            # a body whose zstd frame is cut short: refused by the bounded decompression
            whole = decode_envelope(
                build_update_envelope(
                    fleet=FLEET, model="mlp-100k", device="bad", seq=1, base_version=1,
                    delta=ds[0], codec=FP32,
                ),
                max_payload=1 << 24,
            )  # fmt: skip
            header = message_from_envelope(whole, UpdateHeader)
            broken = encode_message(header, bytes(whole.payload)[:-1000])
            for p in packetize(broken):
                await h.device.publish(update_topic(FLEET, "bad", 1), p, qos=1)
            s = await h.until(lambda s: s.rejected_total == 1)
            assert s.rejected == {"bad_compression": 1}
        _manifest, weights = retained_model(broker)
        expected = w0 + (10 * ds[0] + 20 * ds[1] + 30 * ds[2]) / 60
        np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-6)
        assert broker.queued_for("aggregator") == 0

    run(body)
