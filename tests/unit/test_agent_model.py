"""Model fetching (chunk checks, digests, duplicates) and the on-disk model store (atomic swap,
re-verification, corruption)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from device_agent.fetch import ModelFetch, check_manifest_size
from device_agent.model_store import CurrentModel, ModelStore
from device_agent.release import ModelRelease, model_release
from edgefl.errors import ProtocolError, RejectReason
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope, encode_envelope
from edgefl.protocol.topics import ModelArtifact, ModelChunkTopic, parse_topic

SPEC = get_model_spec("digits-mlp")  # 2,410 parameters = 9,640 bytes


def release(
    version: int = 0, *, onnx: bytes | None = None, max_packet: int = 1024
) -> tuple[ModelRelease, NDArray[np.float32]]:
    weights = init_weights_numpy(SPEC, version)
    rel = model_release("f", version, "digits-mlp", weights, onnx=onnx, max_packet=max_packet)
    return rel, weights


def chunk_messages(rel: ModelRelease) -> list[tuple[ModelChunkTopic, bytes]]:
    out = []
    for topic, payload in rel.messages[:-1]:
        parsed = parse_topic(topic)
        assert isinstance(parsed, ModelChunkTopic)
        out.append((parsed, payload))
    return out


def test_fetch_completes_once_from_shuffled_duplicated_chunks_with_onnx() -> None:
    # Arrange: 10+ chunks of weights plus an ONNX blob, delivered shuffled with duplicates
    onnx = bytes(range(256)) * 9
    rel, weights = release(onnx=onnx)
    chunks = chunk_messages(rel)
    delivery = chunks + chunks[:3]
    random.Random(1).shuffle(delivery)
    fetch = ModelFetch(rel.manifest, rel.messages[-1][1], max_packet=1024)

    # Act
    results = [fetch.offer(topic, payload) for topic, payload in delivery]

    # Assert
    done = [r for r in results if r is not None]
    assert len(done) == 1
    model = done[0]
    np.testing.assert_array_equal(model.weights, weights)
    assert model.onnx == onnx
    assert model.version == 0
    assert fetch.stats.duplicates == 3
    assert fetch.done
    assert fetch.missing() == 0
    assert len(chunks) > 10


def test_fetch_rejects_chunk_of_other_version_and_conflicting_duplicate() -> None:
    # Arrange
    rel0, _ = release(0)
    rel1, _ = release(1)
    fetch = ModelFetch(rel0.manifest, rel0.messages[-1][1], max_packet=1024)
    (topic0, payload0), *_ = chunk_messages(rel0)
    (topic1, payload1), *_ = chunk_messages(rel1)
    env = decode_envelope(payload0, max_payload=1024)
    altered = bytearray(env.payload)
    altered[-1] ^= 1
    conflicting = encode_envelope(EnvelopeKind.MODEL_CHUNK, env.header, bytes(altered))

    # Act / Assert: a v1 chunk presented as v0, and v1's chunk on its own topic
    with pytest.raises(ProtocolError) as wrong_topic:
        fetch.offer(topic0, payload1)
    assert wrong_topic.value.reason is RejectReason.BAD_CHUNK
    with pytest.raises(ProtocolError) as other_version:
        fetch.offer(topic1, payload1)
    assert other_version.value.reason is RejectReason.BAD_CHUNK
    assert fetch.offer(topic0, payload0) is None
    with pytest.raises(ProtocolError) as conflict:
        fetch.offer(topic0, conflicting)
    assert conflict.value.reason is RejectReason.CHUNK_CONFLICT
    onnx_topic = ModelChunkTopic("f", 0, 0, ModelArtifact.ONNX)
    with pytest.raises(ProtocolError) as no_onnx:
        fetch.offer(onnx_topic, payload0)
    assert no_onnx.value.reason is RejectReason.BAD_CHUNK


def test_fetch_detects_digest_mismatch_after_reassembly() -> None:
    # Arrange: every chunk keeps its header (claimed digest) but one byte of data differs
    rel, _ = release(0, max_packet=1 << 20)  # a single chunk
    ((topic, payload),) = chunk_messages(rel)
    env = decode_envelope(payload, max_payload=1 << 20)
    data = bytearray(env.payload)
    data[100] ^= 0x40
    tampered = encode_envelope(EnvelopeKind.MODEL_CHUNK, env.header, bytes(data))
    fetch = ModelFetch(rel.manifest, rel.messages[-1][1], max_packet=1 << 20)

    # Act / Assert
    with pytest.raises(ProtocolError) as err:
        fetch.offer(topic, tampered)
    assert err.value.reason is RejectReason.BAD_CHECKSUM


def test_manifest_size_limit() -> None:
    rel, _ = release(0)
    check_manifest_size(rel.manifest, 9640)
    with pytest.raises(ProtocolError) as err:
        check_manifest_size(rel.manifest, 9639)
    assert err.value.reason is RejectReason.TOO_LARGE


def _complete(rel: ModelRelease) -> CurrentModel:
    fetch = ModelFetch(rel.manifest, rel.messages[-1][1], max_packet=1024)
    model = None
    for topic, payload in chunk_messages(rel):
        model = fetch.offer(topic, payload) or model
    assert model is not None
    return model


def test_store_swaps_atomically_keeps_only_current_and_reloads_verified(tmp_path: Path) -> None:
    # Arrange
    store = ModelStore(tmp_path / "model")
    m0 = _complete(release(0, onnx=b"onnx-zero")[0])
    m1 = _complete(release(1)[0])

    # Act
    store.install(m0)
    store.install(m1)
    loaded = ModelStore(tmp_path / "model").load()

    # Assert
    assert loaded is not None
    assert loaded.version == 1
    np.testing.assert_array_equal(loaded.weights, init_weights_numpy(SPEC, 1))
    assert loaded.onnx is None
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "current",
        "manifest-1.edfl",
        "weights-1.bin",
    ]


def test_store_refuses_corrupted_weights(tmp_path: Path) -> None:
    # Arrange
    store = ModelStore(tmp_path / "model")
    store.install(_complete(release(0)[0]))
    path = tmp_path / "model/weights-0.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))

    # Act
    loaded = store.load()

    # Assert
    assert loaded is None
    assert store.corrupt == 1
