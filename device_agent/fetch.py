"""Fetching one model version from its retained chunks (sans-IO).

A :class:`ModelFetch` is created for an accepted manifest. The agent feeds it every MODEL_CHUNK
packet received under ``model/<version>/#``; each packet is decoded, checked against the manifest
and its topic (``ModelManifest.check_chunk``: fleet, version, index, artifact geometry and
digest), and kept by index. When every chunk of the weights (and of the ONNX graph, when the
manifest lists one) is in, the artifacts are joined, their SHA-256 is verified against the
manifest, and :meth:`ModelFetch.offer` returns the :class:`CurrentModel` exactly once.

Memory is bounded by the manifest's declared sizes, which the caller checks against its limit
before creating the fetch (:func:`check_manifest_size`). Duplicates (QoS 1 redeliveries) are
counted and ignored; a chunk whose bytes differ from the copy held is ``CHUNK_CONFLICT``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from device_agent.model_store import CurrentModel, weights_from_bytes
from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.chunking import decode_chunk
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import ModelManifest
from edgefl.protocol.topics import ModelArtifact, ModelChunkTopic

__all__ = ["FetchStatistics", "ModelFetch", "check_manifest_size"]


def check_manifest_size(manifest: ModelManifest, max_model_bytes: int) -> None:
    """``TOO_LARGE`` when the weights plus the ONNX graph exceed ``max_model_bytes``."""
    total = manifest.size + (manifest.onnx.size if manifest.onnx is not None else 0)
    if total > max_model_bytes:
        raise ProtocolError(
            RejectReason.TOO_LARGE, f"model of {total} B > the agent's limit {max_model_bytes} B"
        )


@dataclass
class FetchStatistics:
    chunks: int = 0
    duplicates: int = 0


@dataclass
class _Artifact:
    count: int
    sha256: str
    pieces: dict[int, bytes] = field(default_factory=dict)
    data: bytes | None = None


class ModelFetch:
    """Collects and verifies the artifacts of one manifest (see the module docstring)."""

    def __init__(self, manifest: ModelManifest, manifest_envelope: bytes, *, max_packet: int):
        self.manifest = manifest
        self.manifest_envelope = manifest_envelope
        self._max_packet = max_packet
        self._artifacts: dict[ModelArtifact, _Artifact] = {
            ModelArtifact.WEIGHTS: _Artifact(manifest.num_chunks, manifest.sha256)
        }
        if manifest.onnx is not None:
            self._artifacts[ModelArtifact.ONNX] = _Artifact(
                manifest.onnx.num_chunks, manifest.onnx.sha256
            )
        self._done = False
        self.stats = FetchStatistics()

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def done(self) -> bool:
        return self._done

    def missing(self) -> int:
        """Chunks still missing over all artifacts."""
        return sum(a.count - len(a.pieces) for a in self._artifacts.values() if a.data is None)

    def offer(self, topic: ModelChunkTopic, payload: bytes) -> CurrentModel | None:
        """Take one MODEL_CHUNK packet received on ``topic``. Returns the verified model when this
        packet completes it (once); None otherwise. Raises ``ProtocolError`` for a packet that
        does not belong to this manifest (``BAD_CHUNK``), a conflicting duplicate
        (``CHUNK_CONFLICT``), a digest mismatch (``BAD_CHECKSUM``) or any envelope error."""
        if self._done:
            self.stats.duplicates += 1
            return None
        artifact = self._artifacts.get(topic.artifact)
        if artifact is None:
            raise ProtocolError(RejectReason.BAD_CHUNK, "the manifest lists no ONNX artifact")
        chunk = decode_chunk(decode_envelope(payload, max_payload=self._max_packet))
        self.manifest.check_chunk(chunk, topic)
        index = chunk.header.index
        held = artifact.pieces.get(index)
        if held is not None:
            if held != bytes(chunk.data):
                raise ProtocolError(RejectReason.CHUNK_CONFLICT, f"chunk {index} differs")
            self.stats.duplicates += 1
            return None
        artifact.pieces[index] = bytes(chunk.data)
        self.stats.chunks += 1
        if len(artifact.pieces) == artifact.count:
            data = b"".join(artifact.pieces[i] for i in range(artifact.count))
            artifact.pieces.clear()
            if hashlib.sha256(data).hexdigest() != artifact.sha256:
                raise ProtocolError(
                    RejectReason.BAD_CHECKSUM, f"{topic.artifact.value} digest mismatch"
                )
            artifact.data = data
        if any(a.data is None for a in self._artifacts.values()):
            return None
        weights_data = self._artifacts[ModelArtifact.WEIGHTS].data
        assert weights_data is not None
        try:
            weights = weights_from_bytes(weights_data, self.manifest)
        except ValueError as exc:
            raise ProtocolError(RejectReason.BAD_HEADER, str(exc)) from None
        onnx = self._artifacts.get(ModelArtifact.ONNX)
        self._done = True
        return CurrentModel(
            self.manifest, self.manifest_envelope, weights, None if onnx is None else onnx.data
        )
