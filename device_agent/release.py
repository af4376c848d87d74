"""Build the retained messages of one model version, as an aggregator publishes them.

The agent never publishes models; this exists for what surrounds it: its tests, the footprint
benchmark and simulations that run agents without an aggregator. It follows ``docs/PROTOCOL.md``
§5 exactly (chunks of the fp32-flat weights and of the optional ONNX graph, each a MODEL_CHUNK
packet on its own retained topic, then the manifest), using the same protocol functions as the
aggregator, so whatever an agent accepts from it, it accepts from the aggregator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgefl.auth import EnvelopeSigner
from edgefl.models.spec import get_model_spec
from edgefl.protocol.chunking import DEFAULT_MAX_PACKET, split_message
from edgefl.protocol.envelope import EnvelopeKind
from edgefl.protocol.messages import (
    ArtifactInfo,
    ModelFormat,
    ModelManifest,
    TensorSpec,
    TrainingHints,
    encode_message,
)
from edgefl.protocol.topics import ModelArtifact, manifest_topic, model_chunk_topic

__all__ = ["ModelRelease", "model_release"]


@dataclass(frozen=True)
class ModelRelease:
    """``messages``: ``(topic, payload)`` pairs to publish retained, QoS 1, in this order."""

    manifest: ModelManifest
    messages: tuple[tuple[str, bytes], ...]


def model_release(
    fleet: str,
    version: int,
    model: str,
    weights: NDArray[np.float32],
    *,
    onnx: bytes | None = None,
    hints: TrainingHints | None = None,
    max_packet: int = DEFAULT_MAX_PACKET,
    signer: EnvelopeSigner | None = None,
) -> ModelRelease:
    """Chunks of ``weights`` (and ``onnx``) for ``model/<version>/...`` plus the manifest."""
    spec = get_model_spec(model)
    flat = spec.check_flat(np.ascontiguousarray(weights, dtype=np.float32))
    data = flat.astype("<f4").tobytes()
    weights_chunks = split_message(data, kind=EnvelopeKind.MODEL_CHUNK, max_packet=max_packet)
    messages = [
        (model_chunk_topic(fleet, version, i), packet)
        for i, packet in enumerate(weights_chunks.packets)
    ]
    onnx_info: ArtifactInfo | None = None
    if onnx is not None:
        onnx_chunks = split_message(onnx, kind=EnvelopeKind.MODEL_CHUNK, max_packet=max_packet)
        messages += [
            (model_chunk_topic(fleet, version, i, artifact=ModelArtifact.ONNX), packet)
            for i, packet in enumerate(onnx_chunks.packets)
        ]
        onnx_info = ArtifactInfo(
            onnx_chunks.sha256.hex(), len(onnx), onnx_chunks.chunk_size, onnx_chunks.count
        )
    manifest = ModelManifest(
        fleet=fleet,
        version=version,
        model=model,
        format=ModelFormat.FP32_FLAT,
        sha256=weights_chunks.sha256.hex(),
        size=len(data),
        chunk_size=weights_chunks.chunk_size,
        num_chunks=weights_chunks.count,
        num_params=spec.num_params,
        created_at=time.time(),
        layout=tuple(TensorSpec(t.name, t.shape) for t in spec.layout),
        hints=hints,
        onnx=onnx_info,
    )
    envelope = encode_message(manifest)
    if signer is not None:
        envelope = signer.sign(envelope)
    messages.append((manifest_topic(fleet), envelope))
    return ModelRelease(manifest, tuple(messages))
