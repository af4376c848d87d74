"""Model publication: the packets of one version (sans-IO) and retained-chunk bookkeeping.

Protocol (``docs/PROTOCOL.md`` §5): all chunks of version ``v`` (``MODEL_CHUNK`` packets on the
retained topics ``model/<v>/<i>``, and ``model/<v>/onnx/<i>`` for the optional ONNX graph) are
published before the retained manifest. The main artifact is ``fp32-flat``: the little-endian
float32 weights in layout order. When a signer is configured the manifest envelope is signed.

:class:`RetainedChunks` decides when old chunk sets are cleared (empty retained payloads): the
current and the previous published version stay, so a device that saw the previous manifest can
finish its download; anything older goes once ``grace`` seconds passed since it was superseded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgefl.auth import EnvelopeSigner
from edgefl.models import ModelSpec
from edgefl.protocol import (
    EnvelopeKind,
    ModelFormat,
    ModelManifest,
    TensorSpec,
    TrainingHints,
    encode_message,
    manifest_topic,
    model_chunk_topic,
    split_message,
)
from edgefl.protocol.messages import ArtifactInfo
from edgefl.protocol.topics import ModelArtifact

__all__ = ["ModelPackets", "Release", "RetainedChunks", "build_model_packets", "clear_packets"]


@dataclass(frozen=True)
class Release:
    """One committed model version to publish (``created_at``: wall-clock seconds)."""

    version: int
    created_at: float
    weights: NDArray[np.float32]


@dataclass(frozen=True)
class ModelPackets:
    """Everything to publish for one version, in order: ``chunks`` first, then ``manifest``."""

    version: int
    chunks: tuple[tuple[str, bytes], ...]
    manifest_topic: str
    manifest: bytes
    num_chunks: int
    onnx_chunks: int


def build_model_packets(
    *,
    fleet: str,
    spec: ModelSpec,
    version: int,
    weights: NDArray[np.float32],
    created_at: float,
    hints: TrainingHints | None,
    max_packet: int,
    onnx: bytes | None = None,
    signer: EnvelopeSigner | None = None,
) -> ModelPackets:
    """Split the weights (and ONNX graph) into retained chunks and build the manifest."""
    raw = np.ascontiguousarray(weights, dtype="<f4").tobytes()
    chunked = split_message(raw, kind=EnvelopeKind.MODEL_CHUNK, max_packet=max_packet)
    chunks = [(model_chunk_topic(fleet, version, i), p) for i, p in enumerate(chunked.packets)]
    onnx_info = None
    onnx_count = 0
    if onnx is not None:
        graph = split_message(onnx, kind=EnvelopeKind.MODEL_CHUNK, max_packet=max_packet)
        onnx_count = graph.count
        chunks += [
            (model_chunk_topic(fleet, version, i, artifact=ModelArtifact.ONNX), p)
            for i, p in enumerate(graph.packets)
        ]
        onnx_info = ArtifactInfo(
            graph.sha256.hex(), graph.total_size, graph.chunk_size, graph.count
        )
    manifest = ModelManifest(
        fleet=fleet,
        version=version,
        model=spec.name,
        format=ModelFormat.FP32_FLAT,
        sha256=chunked.sha256.hex(),
        size=chunked.total_size,
        chunk_size=chunked.chunk_size,
        num_chunks=chunked.count,
        num_params=spec.num_params,
        created_at=created_at,
        layout=tuple(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in spec.layout),
        hints=hints,
        onnx=onnx_info,
    )
    envelope = encode_message(manifest)
    if signer is not None:
        envelope = signer.sign(envelope)
    return ModelPackets(
        version, tuple(chunks), manifest_topic(fleet), envelope, chunked.count, onnx_count
    )


def clear_packets(fleet: str, version: int, artifact: str, num_chunks: int) -> list[str]:
    """Topics whose retained chunks to delete (publish an empty retained payload to each)."""
    which = ModelArtifact(artifact)
    return [model_chunk_topic(fleet, version, i, artifact=which) for i in range(num_chunks)]


class RetainedChunks:
    """Which chunk sets are on the broker, and which may be cleared now (sans-IO, ``now`` is
    monotonic seconds)."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._sets: dict[tuple[int, str], int] = {}  # (version, artifact) -> num_chunks
        self._superseded: dict[int, float] = {}
        self._current: int | None = None
        self._previous: int | None = None

    def restore(self, entries: list[tuple[int, str, int]], now: float) -> None:
        """Chunk sets a previous run left on the broker (from the state store)."""
        for version, artifact, count in entries:
            self._sets[(version, artifact)] = count
            self._superseded.setdefault(version, now)

    def published(self, version: int, artifact: str, num_chunks: int, now: float) -> None:
        self._sets[(version, artifact)] = num_chunks
        self._superseded.pop(version, None)
        if self._current is not None and self._current != version:
            self._previous = self._current
            self._superseded.setdefault(self._current, now)
        self._current = version
        for v, _ in self._sets:
            if v != version:
                self._superseded.setdefault(v, now)

    def due(self, now: float) -> list[tuple[int, str, int]]:
        """Chunk sets to clear now; they are forgotten (call :meth:`published` order-safe)."""
        keep = {self._current, self._previous}
        out = [
            (v, a, n)
            for (v, a), n in self._sets.items()
            if v not in keep and now - self._superseded.get(v, now) >= self._grace
        ]
        for v, a, _ in out:
            del self._sets[(v, a)]
        for v in {v for v, _, _ in out} - self.versions:
            self._superseded.pop(v, None)
        return out

    @property
    def versions(self) -> set[int]:
        return {v for v, _ in self._sets}
