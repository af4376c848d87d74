"""Turning a finished training into the bytes that go to the spool (sans-IO).

Pipeline: ``delta`` → ``edgefl.codec.encode_update`` (with the persisted error-feedback residual
when top-k is on) → ``UpdateHeader`` + codec body in one UPDATE envelope → optional signature
(``EnvelopeSigner.sign``, over the complete envelope) → spool. The spool entry holds the final
envelope; the sender splits it into packets (``packetize``) at publish time, so a spooled update
is re-sent byte-identically after a restart and its chunk message id does not change.

Codec choice: the manifest's ``hints.codec`` when the aggregator asks for one (it decides what it
can aggregate), else the device's ``[codec]`` preferences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from device_agent.config import CodecPrefs
from device_agent.trainer import TrainResult
from edgefl.auth import EnvelopeSigner
from edgefl.codec import CodecConfig, Quantization, Residual, encode_update
from edgefl.protocol.messages import ModelManifest, UpdateHeader, UpdateMeta, encode_message

__all__ = ["BuiltUpdate", "build_update", "codec_config_for", "residual_from_bytes"]


def codec_config_for(prefs: CodecPrefs, manifest: ModelManifest) -> CodecConfig:
    """Manifest hint if present, else the device preference. Raises ``CodecError`` when the
    chosen configuration is invalid."""
    hints = manifest.hints
    if hints is not None and hints.codec is not None:
        return CodecConfig.from_dict(hints.codec)
    return CodecConfig(
        quantization=Quantization(prefs.quantization), topk_fraction=prefs.topk_fraction
    )


def residual_from_bytes(data: bytes | None, num_params: int) -> Residual | None:
    """A stored residual, or None when absent or of another model size."""
    if data is None or len(data) != 4 * num_params:
        return None
    return Residual(np.frombuffer(data, dtype="<f4").astype(np.float32))


@dataclass(frozen=True, eq=False)
class BuiltUpdate:
    envelope: bytes  # the (signed) UPDATE envelope, as spooled and published
    header: UpdateHeader
    residual: Residual | None  # to persist for the next update (None: clear)


def build_update(
    result: TrainResult,
    meta: UpdateMeta,
    *,
    manifest: ModelManifest,
    codec: CodecConfig,
    residual: Residual | None,
    rng: np.random.Generator,
    signer: EnvelopeSigner | None = None,
    extra_metrics: Mapping[str, float] | None = None,
) -> BuiltUpdate:
    """Encode ``result`` as the update ``meta`` describes (trained on ``manifest``: its version
    and model are ``meta``'s, its layout the header's; under lease ``meta.lease_id``, protocol
    1.2). Raises ``CodecError`` (e.g. NaN in the delta) or ``ProtocolError`` for invalid fields."""
    delta: NDArray[np.float32] = np.asarray(result.delta, dtype=np.float32)
    encoded, new_residual = encode_update(delta, codec, rng=rng, residual=residual)
    metrics = {k: float(v) for k, v in result.metrics.items() if np.isfinite(v)}
    if extra_metrics:
        metrics.update(extra_metrics)
    header = UpdateHeader(
        **dataclasses.asdict(meta),
        codec=encoded.descriptor.to_dict(),
        num_params=manifest.num_params,
        layout=manifest.layout,
        metrics=metrics,
    )
    envelope = encode_message(header, encoded.body)
    if signer is not None:
        envelope = signer.sign(envelope)
    return BuiltUpdate(envelope, header, new_residual)
