"""Building update packets the way a device does (for tests, benchmarks and tools).

``build_update_packets`` encodes ``delta = local_weights - base_weights`` with the codec, wraps it
in an UPDATE envelope and packetizes it under ``max_packet``: the exact MQTT payloads a device
publishes on ``update_topic(fleet, device, seq)``. The device agent has its own pipeline (spool,
residuals, signing); this helper is the minimal faithful one.
"""

from __future__ import annotations

import time
from typing import NotRequired, TypedDict, Unpack

import numpy as np
from numpy.typing import NDArray

from edgefl.codec import CodecConfig, encode_update
from edgefl.protocol import UpdateHeader, encode_message, packetize, update_topic

__all__ = ["UpdateFields", "build_update_envelope", "build_update_packets"]


class UpdateFields(TypedDict):
    """What describes one update: whose (``fleet``, ``device``, ``seq``), of which model and
    base version, its ``delta``, and optionally the ``num_examples`` it trained on (32), the
    ``codec`` (the default :class:`CodecConfig`), the encoder's ``rng`` (seeded by ``seq``) and the
    participation ``lease_id`` it was trained under."""

    fleet: str
    model: str
    device: str
    seq: int
    base_version: int
    delta: NDArray[np.float32]
    num_examples: NotRequired[int]
    codec: NotRequired[CodecConfig | None]
    rng: NotRequired[np.random.Generator | None]
    lease_id: NotRequired[int | None]


def build_update_envelope(
    *, created_at: float | None = None, **update: Unpack[UpdateFields]
) -> bytes:
    """One encoded UPDATE envelope (not yet packetized)."""
    delta, seq, rng = update["delta"], update["seq"], update.get("rng")
    encoded, _ = encode_update(
        np.asarray(delta, dtype=np.float32),
        update.get("codec") or CodecConfig(),
        rng=rng if rng is not None else np.random.default_rng(seq),
    )
    header = UpdateHeader(
        fleet=update["fleet"],
        device_id=update["device"],
        seq=seq,
        base_version=update["base_version"],
        num_examples=update.get("num_examples", 32),
        model=update["model"],
        codec=encoded.descriptor.to_dict(),
        num_params=int(np.asarray(delta).shape[0]),
        created_at=time.time() if created_at is None else created_at,
        lease_id=update.get("lease_id"),
    )
    return encode_message(header, encoded.body)


def build_update_packets(
    *, max_packet: int = 256 * 1024, **update: Unpack[UpdateFields]
) -> tuple[str, list[bytes]]:
    """``(topic, packets)`` of one update, as a device publishes them."""
    envelope = build_update_envelope(**update)
    topic = update_topic(update["fleet"], update["device"], update["seq"])
    return topic, packetize(envelope, max_packet=max_packet)
