"""Building update packets the way a device does (for tests, benchmarks and tools).

``build_update_packets`` encodes ``delta = local_weights - base_weights`` with the codec, wraps it
in an UPDATE envelope and packetizes it under ``max_packet``: the exact MQTT payloads a device
publishes on ``update_topic(fleet, device, seq)``. The device agent has its own pipeline (spool,
residuals, signing); this helper is the minimal faithful one.
"""

from __future__ import annotations

import time

import numpy as np
from numpy.typing import NDArray

from edgefl.codec import CodecConfig, encode_update
from edgefl.protocol import UpdateHeader, encode_message, packetize, update_topic

__all__ = ["build_update_envelope", "build_update_packets"]


def build_update_envelope(
    *,
    fleet: str,
    model: str,
    device: str,
    seq: int,
    base_version: int,
    delta: NDArray[np.float32],
    num_examples: int = 32,
    codec: CodecConfig | None = None,
    rng: np.random.Generator | None = None,
    created_at: float | None = None,
    lease_id: int | None = None,
) -> bytes:
    """One encoded UPDATE envelope (not yet packetized; ``lease_id``: trained under that
    participation lease)."""
    encoded, _ = encode_update(
        np.asarray(delta, dtype=np.float32),
        codec or CodecConfig(),
        rng=rng if rng is not None else np.random.default_rng(seq),
    )
    header = UpdateHeader(
        fleet=fleet,
        device_id=device,
        seq=seq,
        base_version=base_version,
        num_examples=num_examples,
        model=model,
        codec=encoded.descriptor.to_dict(),
        num_params=int(np.asarray(delta).shape[0]),
        created_at=time.time() if created_at is None else created_at,
        lease_id=lease_id,
    )
    return encode_message(header, encoded.body)


def build_update_packets(
    *,
    fleet: str,
    model: str,
    device: str,
    seq: int,
    base_version: int,
    delta: NDArray[np.float32],
    num_examples: int = 32,
    codec: CodecConfig | None = None,
    rng: np.random.Generator | None = None,
    max_packet: int = 256 * 1024,
    lease_id: int | None = None,
) -> tuple[str, list[bytes]]:
    """``(topic, packets)`` of one update, as a device publishes them."""
    envelope = build_update_envelope(
        fleet=fleet,
        model=model,
        device=device,
        seq=seq,
        base_version=base_version,
        delta=delta,
        num_examples=num_examples,
        codec=codec,
        rng=rng,
        lease_id=lease_id,
    )
    return update_topic(fleet, device, seq), packetize(envelope, max_packet=max_packet)
