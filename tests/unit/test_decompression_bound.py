"""One decompression bound: the simulator's decode path and the service's ingest path accept and
reject the same updates (edgefl.codec.max_decompressed is the only bound)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.aggregator import AggregatorConfig
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.ingest import Ingest, OutcomeKind, StagedUpdate, open_body
from edgefl.aggregator.service import initial_state
from edgefl.codec import (
    DECOMPRESSION_SLACK,
    CodecConfig,
    CodecDescriptor,
    EncodedUpdate,
    IndexDtype,
    Quantization,
    encode_update,
    max_body_size,
    max_decompressed,
)
from edgefl.errors import CodecError, RejectReason
from edgefl.protocol import UpdateHeader, encode_message, packetize, update_topic
from firmware_sim.virtual import open_arrival

FLEET, MODEL, MODEL_PARAMS = "lab", "digits-mlp", 2410


def encoded(num_params: int, codec: CodecConfig, seed: int = 0) -> EncodedUpdate:
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(num_params) * 0.01).astype(np.float32)
    return encode_update(delta, codec, rng=rng)[0]


def bomb_declaring_more(num_params: int) -> tuple[CodecDescriptor, bytes]:
    """A valid fp32 descriptor whose zstd frame declares (and holds) 64x the declared size."""
    ok = encoded(num_params, CodecConfig(quantization=Quantization.FP32))
    body = zstandard.ZstdCompressor().compress(bytes(64 * ok.descriptor.raw_size))
    return ok.descriptor, body


def bomb_without_size(num_params: int) -> tuple[CodecDescriptor, bytes]:
    """A frame without a content size that inflates far beyond the declared size."""
    ok = encoded(num_params, CodecConfig(quantization=Quantization.FP32))
    body = zstandard.ZstdCompressor(write_content_size=False).compress(
        bytes(64 * ok.descriptor.raw_size)
    )
    return ok.descriptor, body


def simulator_verdict(descriptor: CodecDescriptor, body: bytes, num_params: int) -> str:
    try:
        open_arrival(descriptor, body, num_params=num_params)
    except CodecError as exc:
        return exc.reason.value
    return "accepted"


def service_decode_verdict(descriptor: CodecDescriptor, body: bytes, num_params: int) -> str:
    try:
        open_body(descriptor, body, num_params)
    except CodecError as exc:
        return exc.reason.value
    return "accepted"


CODECS = {
    "fp32+topk=0.9": CodecConfig(quantization=Quantization.FP32, topk_fraction=0.9),
    "fp32": CodecConfig(quantization=Quantization.FP32),
    "fp16+topk=0.5": CodecConfig(quantization=Quantization.FP16, topk_fraction=0.5),
    "int8": CodecConfig(),
    "int2+topk=0.1+block=4": CodecConfig(
        quantization=Quantization.INT2, topk_fraction=0.1, block_size=4
    ),
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_10k_parameter_updates_are_accepted_by_both_decode_paths(name: str) -> None:
    # Arrange: the case among them: fp32+topk=0.9 is 4.5 bytes a parameter, above the
    # simulator's former 4 P + 1024 and below the service's former 9 P + 65536
    e = encoded(10_000, CODECS[name])

    # Act
    verdicts = {
        simulator_verdict(e.descriptor, e.body, 10_000),
        service_decode_verdict(e.descriptor, e.body, 10_000),
    }

    # Assert
    assert verdicts == {"accepted"}


@pytest.mark.parametrize("bomb", [bomb_declaring_more, bomb_without_size])
def test_10k_parameter_bombs_are_rejected_by_both_decode_paths(bomb: object) -> None:
    descriptor, body = bomb(10_000)  # type: ignore[operator]
    verdicts = {
        simulator_verdict(descriptor, body, 10_000),
        service_decode_verdict(descriptor, body, 10_000),
    }
    assert verdicts == {RejectReason.DECOMPRESSION_BOMB.value}


# ---------------------------------------------------------------------------------------------
# the service's whole ingest path (stage, bounded inflate, decode, finish) against the simulator


def make_ingest(tmp_path: Path) -> Ingest:
    config = AggregatorConfig.build(
        broker_url="mqtt://127.0.0.1:1",
        fleet=FLEET,
        model=MODEL,
        state_dir=tmp_path / "state",
        buffer_size=100,
        norm_bound="off",  # type: ignore[arg-type]
        max_staleness=None,
    )
    return Ingest(config, Engine(config, initial_state(config)))


def update_packet(descriptor: CodecDescriptor, body: bytes, seq: int) -> tuple[str, bytes]:
    header = UpdateHeader(
        fleet=FLEET,
        device_id="d",
        seq=seq,
        base_version=0,
        num_examples=32,
        model=MODEL,
        codec=descriptor.to_dict(),
        num_params=descriptor.num_params,
        created_at=0.0,
    )
    (payload,) = packetize(encode_message(header, body), max_packet=1 << 24)
    return update_topic(FLEET, "d", seq), payload


def ingest_verdict(ingest: Ingest, descriptor: CodecDescriptor, body: bytes, seq: int) -> str:
    staged = ingest.stage(*update_packet(descriptor, body, seq), now=0.0)
    assert isinstance(staged, StagedUpdate), staged
    inflated = ingest.inflate(staged)
    outcome = ingest.finish(staged, ingest.decode(staged, None, inflated), now=0.0)
    if outcome.kind is OutcomeKind.ACCEPTED:
        return "accepted"
    assert outcome.reason is not None
    return outcome.reason.value


def test_simulator_and_service_ingest_agree_on_every_update(tmp_path: Path) -> None:
    # Arrange: legitimate updates under several codecs, and two kinds of real bombs
    ingest = make_ingest(tmp_path)
    cases = [(e.descriptor, e.body) for e in (encoded(MODEL_PARAMS, c) for c in CODECS.values())]
    cases += [bomb_declaring_more(MODEL_PARAMS), bomb_without_size(MODEL_PARAMS)]

    # Act
    service = [ingest_verdict(ingest, d, b, seq) for seq, (d, b) in enumerate(cases, 1)]
    simulator = [simulator_verdict(d, b, MODEL_PARAMS) for d, b in cases]

    # Assert
    assert service == simulator
    assert service == ["accepted"] * len(CODECS) + ["decompression_bomb"] * 2


# ---------------------------------------------------------------------------------------------
# the bound itself


def align8(n: int) -> int:
    return -(-n // 8) * 8


@pytest.mark.parametrize("num_params", [1, 2, 3, 7, 12, 13, 2410, 10_000, 999_334])
def test_the_bound_is_the_largest_body_a_valid_descriptor_declares(num_params: int) -> None:
    # Arrange: by hand, the two widest layouts: fp32 with every value kept and uint32 gaps,
    # and int8 the same way with 4-value blocks (one scale per 4 values, 1-byte codes)
    p = num_params
    fp32_sparse = align8(4 * p) + align8(4 * p)
    int8_sparse = align8(4 * -(-p // 4)) + align8(4 * p) + align8(p)

    # Act: a receiver must accept both descriptors (they validate)
    for quantization, size in ((Quantization.FP32, fp32_sparse), (Quantization.INT8, int8_sparse)):
        CodecDescriptor(
            quantization=quantization,
            num_params=p,
            block_size=4,
            raw_size=size,
            topk=p,
            index_dtype=IndexDtype.UINT32,
        )

    # Assert: the bound is exactly the wider one (no legitimate body is refused, nothing more is
    # admitted than the slack), at most 8 P + 24 as documented
    assert max_body_size(p) == max(fp32_sparse, int8_sparse)
    assert max_body_size(p) <= 8 * p + 24
    assert max_decompressed(p) == max_body_size(p) + DECOMPRESSION_SLACK


@settings(max_examples=80, deadline=None)
@given(
    quantization=st.sampled_from(list(Quantization)),
    num_params=st.integers(min_value=1, max_value=3000),
    topk=st.sampled_from([None, 0.01, 0.3, 0.9, 1.0]),
    block=st.sampled_from([4, 64, 4096]),
)
def test_every_encoded_update_fits_the_bound(
    quantization: Quantization, num_params: int, topk: float | None, block: int
) -> None:
    codec = CodecConfig(quantization=quantization, topk_fraction=topk, block_size=block)
    e = encoded(num_params, codec)
    assert e.descriptor.raw_size <= max_body_size(num_params)
