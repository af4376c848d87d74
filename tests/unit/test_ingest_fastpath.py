"""The pieces of the aggregator's fast ingest path: each must give what the plain path gives."""

from __future__ import annotations

import dataclasses
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.aggregation import FedBuff, FedBuffConfig, ServerOptimizerConfig
from edgefl.aggregator import AggregatorConfig
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.ingest import Ingest, OutcomeKind, ScratchUpdate, StagedUpdate
from edgefl.aggregator.memory import tune_malloc
from edgefl.aggregator.service import initial_state
from edgefl.aggregator.store import BatchRecord, StateStore, decode_state, encode_state
from edgefl.aggregator.updates import build_update_packets
from edgefl.codec import (
    CodecConfig,
    Quantization,
    encode_update,
    inflate_body,
    open_inflated,
    open_update,
)
from edgefl.errors import CodecError, RejectReason
from edgefl.protocol import Reassembler, ReassemblyConfig, decode_chunk, decode_envelope
from edgefl.protocol.chunking import split_message
from edgefl.protocol.envelope import EnvelopeKind, crc32

FLEET, MODEL = "lab", "digits-mlp"
QUANTIZATIONS = [q for q in Quantization]


# ---------------------------------------------------------------------------------------------
# codec: write_dense and ScratchUpdate


@settings(max_examples=60, deadline=None)
@given(
    quantization=st.sampled_from(QUANTIZATIONS),
    n=st.integers(min_value=1, max_value=5000),
    block=st.sampled_from([64, 256, 4096]),
    topk=st.sampled_from([None, 0.1]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_write_dense_equals_zero_then_add(
    quantization: Quantization, n: int, block: int, topk: float | None, seed: int
) -> None:
    # Arrange
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(n) * 0.01).astype(np.float32)
    config = CodecConfig(quantization=quantization, block_size=block, topk_fraction=topk)
    encoded, _ = encode_update(delta, config, rng=rng)
    decoded = open_update(
        encoded.descriptor, encoded.body, num_params=n, max_decompressed=10 * n + 65536
    )
    reference = np.zeros(n, np.float32)
    decoded.add_to(reference, 1.0)
    out = np.full(n, 7.0, np.float32)  # garbage: write_dense overwrites every element

    # Act
    decoded.write_dense(out)

    # Assert (== treats -0.0 and 0.0 alike, as documented)
    assert np.array_equal(out, reference)


def test_scratch_update_norm_and_single_use() -> None:
    # Arrange
    delta = np.array([3.0, -4.0, 0.0, 12.0], np.float32)
    encoded, _ = encode_update(
        delta, CodecConfig(quantization=Quantization.FP32), rng=np.random.default_rng(0)
    )
    decoded = open_update(encoded.descriptor, encoded.body, num_params=4, max_decompressed=65536)
    scratch = np.empty(4, np.float32)
    update = ScratchUpdate(decoded, scratch)
    out = np.ones(4, np.float32)

    # Act
    norm2 = update.squared_norm()
    update.add_to(out, 0.5)

    # Assert: |d|^2 = 9 + 16 + 144; out = 1 + d/2; a consumed update refuses further use
    assert norm2 == 169.0
    assert out.tolist() == [2.5, -1.0, 1.0, 7.0]
    with pytest.raises(RuntimeError, match="consumed"):
        update.squared_norm()


# ---------------------------------------------------------------------------------------------
# ingest: stage / decode / finish


def make_ingest(tmp_path: Path, **overrides: object) -> Ingest:
    values: dict[str, object] = {
        "broker_url": "mqtt://127.0.0.1:1", "fleet": FLEET, "model": MODEL,
        "state_dir": tmp_path / "state", "buffer_size": 100, "norm_bound": "off",
        "max_staleness": None,
    }  # fmt: skip
    values.update(overrides)
    config = AggregatorConfig(**values)  # type: ignore[arg-type]
    return Ingest(config, Engine(config, initial_state(config)))


def packet(device: str, seq: int, *, seed: int = 0) -> tuple[str, bytes]:
    d = (np.random.default_rng(seed).standard_normal(2410) * 0.01).astype(np.float32)
    topic, packets = build_update_packets(
        fleet=FLEET, model=MODEL, device=device, seq=seq, base_version=0, delta=d
    )
    return topic, packets[0]


def test_out_of_order_staging_is_finished_as_if_sequential(tmp_path: Path) -> None:
    # Arrange: seq 6 and 5 of one device, and a second copy of seq 6, all staged before any
    # is finished (as when decoding overlaps): each passes the checks on its own
    ingest = make_ingest(tmp_path)
    staged = [ingest.stage(*packet("d", seq), now=0.0) for seq in (6, 5, 6)]
    assert all(isinstance(s, StagedUpdate) for s in staged)

    # Act: finish in arrival order
    outcomes = []
    for s in staged:
        assert isinstance(s, StagedUpdate)
        outcomes.append(ingest.finish(s, ingest.decode(s, None), now=0.0))

    # Assert: what one-at-a-time processing gives: 6 accepted, 5 a replay, 6 again a duplicate
    assert [o.kind for o in outcomes] == [
        OutcomeKind.ACCEPTED,
        OutcomeKind.REJECTED,
        OutcomeKind.REJECTED,
    ]
    assert [o.reason for o in outcomes[1:]] == [RejectReason.REPLAY, RejectReason.DUPLICATE]


def test_codec_cache_keeps_json_types_apart(tmp_path: Path) -> None:
    # Arrange: the same codec object, once with an int where the other has a bool
    ingest = make_ingest(tmp_path)
    _topic, good = packet("d", 1)
    envelope = decode_envelope(good, max_payload=1 << 24)
    codec = dict(envelope.header["codec"])
    assert isinstance(codec["format"], int)
    ok = ingest._codec(codec)

    # Act / Assert: True == 1 must not reuse the cached descriptor
    with pytest.raises(CodecError, match="format True"):
        ingest._codec({**codec, "format": True})
    assert ingest._codec(codec)[0] is ok[0]  # the int form is served from the cache


# ---------------------------------------------------------------------------------------------
# state blobs


def old_npz_blob(state: object) -> bytes:
    """How releases before the raw format stored a snapshot (np.savez with a JSON meta array)."""
    s = state
    arrays = {"weights": s.weights, "norm_history": s.norm_history}  # type: ignore[attr-defined]
    for key, value in s.optimizer_state.items():  # type: ignore[attr-defined]
        if isinstance(value, np.ndarray):
            arrays[f"opt_{key}"] = value
    scalars = {f"opt_{k}": v for k, v in s.optimizer_state.items() if not isinstance(v, np.ndarray)}  # type: ignore[attr-defined]
    meta = {
        "version": s.version, "optimizer_kind": s.optimizer_kind,  # type: ignore[attr-defined]
        "accepted_total": s.accepted_total, "clipped_total": s.clipped_total,  # type: ignore[attr-defined]
        "steps_total": s.steps_total, "rejected": s.rejected, "scalars": scalars,  # type: ignore[attr-defined]
    }  # fmt: skip
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def trained_fedbuff() -> FedBuff:
    config = FedBuffConfig(
        buffer_size=1, server_optimizer=ServerOptimizerConfig.sgd(lr=1.0, momentum=0.9)
    )
    fb = FedBuff(config, np.arange(6, dtype=np.float32))
    fb.add(np.ones(6, np.float32), base_version=0, num_examples=3)
    fb.step()
    return fb


def test_state_blob_round_trip_and_npz_of_earlier_releases() -> None:
    # Arrange
    state = trained_fedbuff().snapshot(buffer=False)

    # Act
    new = decode_state(encode_state(state))
    old = decode_state(old_npz_blob(state))

    # Assert: both formats give back the same state
    for back in (new, old):
        np.testing.assert_array_equal(back.weights, state.weights)
        np.testing.assert_array_equal(
            back.optimizer_state["momentum_buffer"], state.optimizer_state["momentum_buffer"]
        )
        assert (back.version, back.steps_total, back.accumulator) == (1, 1, None)
    assert encode_state(state)[:4] == b"EFS1"


def test_committed_snapshot_streamed_into_the_blob_loads_back_exactly(tmp_path: Path) -> None:
    # Arrange: a store at version 0, then a checkpoint (buffer included) of a later state
    fb = trained_fedbuff()
    fb.add(np.full(6, 0.5, np.float32), base_version=1, num_examples=2)
    store = StateStore(tmp_path, fsync=False)
    store.initialise(
        identity={"model": "t"},
        initial=FedBuff(fb.config, np.zeros(6, np.float32)).snapshot(buffer=False),
        now=1.0,
    )
    state = fb.snapshot()

    # Act
    store.commit(BatchRecord(generation=3, snapshot=(fb.version, 2.0, state)))
    loaded = store.load()
    blob = store.open_reader().execute("SELECT state FROM model").fetchone()[0]
    store.close()

    # Assert: the blob is byte for byte what encode_state joins, and loads back
    assert bytes(blob) == encode_state(state)
    assert (loaded.version, loaded.generation) == (fb.version, 3)
    np.testing.assert_array_equal(loaded.state.weights, state.weights)
    assert loaded.state.accumulator is not None
    assert state.accumulator is not None
    np.testing.assert_array_equal(loaded.state.accumulator, state.accumulator)
    assert loaded.state.count == 1


def test_truncated_state_blob_is_refused() -> None:
    blob = encode_state(trained_fedbuff().snapshot(buffer=False))
    with pytest.raises(ValueError, match="truncated"):
        decode_state(blob[:-5])


def test_snapshot_without_buffer_copies_no_accumulator() -> None:
    # Arrange: one update buffered (K = 2), not yet applied
    fb = FedBuff(FedBuffConfig(buffer_size=2), np.zeros(3, np.float32))
    fb.add(np.ones(3, np.float32), base_version=0, num_examples=1)

    # Act
    full, model_only = fb.snapshot(), fb.snapshot(buffer=False)

    # Assert
    assert full.count == 1
    assert full.accumulator is not None
    assert (model_only.count, model_only.weight_sum, model_only.accumulator) == (0, 0.0, None)
    np.testing.assert_array_equal(model_only.weights, full.weights)
    assert dataclasses.replace(model_only, weights=full.weights).version == full.version


# ---------------------------------------------------------------------------------------------
# protocol: CRC and reassembly without copies


@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=2**32 - 1))
def test_crc32_is_zlibs(data: bytes, start: int) -> None:
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)


def test_reassembly_copies_chunks_of_mutable_buffers() -> None:
    # Arrange: a message in 3 chunks whose packets live in reused (mutable) buffers
    message = bytes(range(256)) * 40
    packets = split_message(message, kind=EnvelopeKind.UPDATE_CHUNK, max_packet=4096).packets
    assert len(packets) >= 3
    reassembler = Reassembler(ReassemblyConfig(max_message_size=1 << 20))
    done = None

    # Act: each packet is decoded from a bytearray that is overwritten right after
    for packet_bytes in packets:
        buffer = bytearray(packet_bytes)
        chunk = decode_chunk(decode_envelope(buffer, max_payload=1 << 20))
        done = reassembler.add(chunk, source="d", now=0.0) or done
        buffer[:] = bytes(len(buffer))

    # Assert
    assert done is not None
    assert done.data == message


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    # glibc is what this project's machines and Raspberry Pi OS run; elsewhere it must say no
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_inflight_window_is_validated_and_sizes_batches(tmp_path: Path) -> None:
    base = {
        "broker_url": "mqtt://127.0.0.1:1", "fleet": FLEET, "model": "mlp-1m",
        "state_dir": tmp_path,
    }  # fmt: skip
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        AggregatorConfig(**base, max_inflight_bytes=1000)  # type: ignore[arg-type]
    small = AggregatorConfig(**base, max_inflight_bytes=16 << 20)  # type: ignore[arg-type]
    large = AggregatorConfig(**base)  # type: ignore[arg-type]
    # 1M int8 updates are 4 chunks of <= 256 KiB: the window never drops below the chunk floor
    # (16 partial updates x 3 held chunks + 32), a batch takes a quarter of the bytes
    assert small.inflight_window() == 16 * 3 + 32
    assert large.inflight_window() == (32 << 20) // (256 * 1024)
    assert large.batch_limits()[1] == 8 << 20


@settings(max_examples=30, deadline=None)
@given(
    quantization=st.sampled_from(QUANTIZATIONS),
    n=st.integers(min_value=1, max_value=3000),
    topk=st.sampled_from([None, 0.2]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_inflate_then_open_is_open_update(
    quantization: Quantization, n: int, topk: float | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(n) * 0.01).astype(np.float32)
    encoded, _ = encode_update(
        delta, CodecConfig(quantization=quantization, topk_fraction=topk), rng=rng
    )
    limit = 10 * n + 65536

    raw = inflate_body(encoded.descriptor, encoded.body, num_params=n, max_decompressed=limit)
    split = open_inflated(encoded.descriptor, raw, num_params=n).to_dense()
    whole = open_update(
        encoded.descriptor, encoded.body, num_params=n, max_decompressed=limit
    ).to_dense()

    assert np.array_equal(split, whole)
    with pytest.raises(CodecError, match="does not fit"):
        open_inflated(encoded.descriptor, raw[:-1], num_params=n)
