"""The model the device holds: verified in memory, swapped atomically on disk.

Layout under ``<state_dir>/model``::

    manifest-<version>.edfl   the manifest envelope exactly as received (signature included)
    weights-<version>.bin     the fp32-flat weights (little-endian float32, layout order)
    model-<version>.onnx      the ONNX export, when the aggregator published one
    current                   pointer: one line ``<version>``, replaced atomically

:meth:`ModelStore.install` writes the version's files (fsync), then replaces ``current``, then
deletes older versions: a crash at any point leaves either the old or the new model current,
never a mix. :meth:`ModelStore.load` re-verifies the SHA-256 of every file against the manifest
and returns None (and counts ``corrupt``) when anything is off, so a damaged SD card costs a
re-download, not a wrong model. Blocking I/O: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from device_agent.spool import atomic_write
from edgefl.errors import EdgeflError
from edgefl.protocol.messages import ModelFormat, ModelManifest, decode_message

__all__ = ["CurrentModel", "ModelStore", "weights_from_bytes"]


@dataclass(frozen=True, eq=False)
class CurrentModel:
    """A verified model version. ``weights`` is read-only float32 of length ``num_params``."""

    manifest: ModelManifest
    manifest_envelope: bytes
    weights: NDArray[np.float32]
    onnx: bytes | None

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def model(self) -> str:
        return self.manifest.model


def weights_from_bytes(data: bytes, manifest: ModelManifest) -> NDArray[np.float32]:
    """Decode an fp32-flat artifact into a read-only float32 vector (ValueError if it does not
    fit the manifest or holds NaN/Inf)."""
    if manifest.format is not ModelFormat.FP32_FLAT:
        raise ValueError(f"unsupported model format {manifest.format.value!r}")
    if len(data) != 4 * manifest.num_params:
        raise ValueError(f"weights have {len(data)} B, expected {4 * manifest.num_params}")
    weights = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(weights)):
        raise ValueError("weights contain NaN or Inf")
    weights.setflags(write=False)
    return weights


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelStore:
    """Persist and reload the current model (see the module docstring)."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self._durable = durable
        self.corrupt = 0
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _paths(self, version: int) -> tuple[Path, Path, Path]:
        d = self.directory
        return (
            d / f"manifest-{version}.edfl",
            d / f"weights-{version}.bin",
            d / f"model-{version}.onnx",
        )

    def install(self, model: CurrentModel) -> None:
        """Make ``model`` the current one on disk (atomic), then drop older versions."""
        manifest_path, weights_path, onnx_path = self._paths(model.version)
        atomic_write(weights_path, model.weights.astype("<f4").tobytes(), durable=self._durable)
        if model.onnx is not None:
            atomic_write(onnx_path, model.onnx, durable=self._durable)
        atomic_write(manifest_path, model.manifest_envelope, durable=self._durable)
        atomic_write(
            self.directory / "current", f"{model.version}\n".encode(), durable=self._durable
        )
        keep = {p.name for p in (manifest_path, weights_path, onnx_path)} | {"current"}
        for path in self.directory.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                with contextlib.suppress(OSError):
                    path.unlink()

    def current_version(self) -> int | None:
        try:
            text = (self.directory / "current").read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def load(self) -> CurrentModel | None:
        """The current model, re-verified; None when there is none or it does not verify."""
        version = self.current_version()
        if version is None:
            return None
        manifest_path, weights_path, onnx_path = self._paths(version)
        try:
            envelope = manifest_path.read_bytes()
            manifest = decode_message(envelope, ModelManifest)
            data = weights_path.read_bytes()
            if manifest.version != version or _sha256(data) != manifest.sha256:
                raise ValueError("weights do not match the manifest")
            weights = weights_from_bytes(data, manifest)
            onnx: bytes | None = None
            if manifest.onnx is not None:
                onnx = onnx_path.read_bytes()
                if _sha256(onnx) != manifest.onnx.sha256:
                    raise ValueError("ONNX file does not match the manifest")
        except (OSError, ValueError, EdgeflError):
            self.corrupt += 1
            return None
        return CurrentModel(manifest, envelope, weights, onnx)

    def onnx_path(self) -> Path | None:
        """Path of the current ONNX export, or None when the current model has none."""
        version = self.current_version()
        if version is None:
            return None
        path = self._paths(version)[2]
        return path if path.is_file() else None
