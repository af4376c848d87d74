"""Typed rejections shared by every decoder and validator.

Every piece of bad input ends in an :class:`EdgeflError` whose :attr:`reason` is a
:class:`RejectReason`. Services count rejections by that reason (``metrics`` and the monitor show
the counts), so a new failure mode gets a new enum member, never a free-form string.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why an input was rejected. The values appear on the wire (metrics) and must stay stable."""

    # topic tree
    BAD_TOPIC = "bad_topic"
    BAD_NAME = "bad_name"
    UNKNOWN_FLEET = "unknown_fleet"
    # envelope
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    BAD_HEADER = "bad_header"
    BAD_CHECKSUM = "bad_checksum"
    TOO_LARGE = "too_large"
    # chunking
    BAD_CHUNK = "bad_chunk"
    CHUNK_CONFLICT = "chunk_conflict"
    REASSEMBLY_FULL = "reassembly_full"
    REASSEMBLY_EXPIRED = "reassembly_expired"
    # codec
    BAD_CODEC = "bad_codec"
    DECOMPRESSION_BOMB = "decompression_bomb"
    BAD_COMPRESSION = "bad_compression"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    # aggregation
    WRONG_MODEL = "wrong_model"
    STALE = "stale"
    FUTURE_VERSION = "future_version"
    DUPLICATE = "duplicate"
    NORM_BOUND = "norm_bound"
    BAD_EXAMPLES = "bad_examples"
    # differential privacy (edgefl/privacy, docs/PRIVACY.md)
    DP_ONE_PER_BUFFER = "dp_one_per_buffer"  # a second update of a device in one buffer
    DP_BUDGET_EXHAUSTED = "dp_budget_exhausted"  # the device reached its participation cap
    # security
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_DEVICE = "unknown_device"
    REPLAY = "replay"
    SEQ_JUMP = "seq_jump"  # seq too far above the device's highest (protocol/sequence.py)
    RATE_LIMITED = "rate_limited"
    # participation (protocol 1.2, edgefl/participation)
    NO_LEASE = "no_lease"  # the device holds no lease of that id (never granted, or used)
    LEASE_EXPIRED = "lease_expired"  # delivered after its lease expired (plus the grace)


class EdgeflError(Exception):
    """Base of all edgefl errors that reject an input; carries a machine-readable reason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class ProtocolError(EdgeflError):
    """A topic, envelope or chunk that does not follow docs/PROTOCOL.md."""


class CodecError(EdgeflError):
    """An encoded update that cannot be decoded safely (bomb, wrong layout, NaN/Inf, ...)."""


class UpdateRejected(EdgeflError):
    """A well-formed update that the aggregator refuses (stale, duplicate, norm bound, ...)."""
