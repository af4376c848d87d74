"""The secure-aggregation messages on the wire (protocol 1.3): the device's two share envelopes,
and the coordination envelopes between the two aggregators, to and from the sans-IO values of
:mod:`edgefl.secagg.decision`.

Device side, :func:`build_share_envelopes`: encode the delta on the ring, split it into the two
shares, and wrap them in one ``SECAGG_SHARE`` envelope (header: the update's public metadata,
payload: the masked vector) and one ``SECAGG_SEED`` envelope (payload: the 80-byte sealed seed).
Both are signed when a signer is given, as an UPDATE is. Roles' side: ``coord_*`` build the
``SECAGG_COORD`` messages and ``*_from_coord`` read them back; every reader raises
``ProtocolError(BAD_HEADER)`` for a message of another ``what``.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from numpy.typing import ArrayLike

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.messages import (
    SecAggCoord,
    SecAggCoordKind,
    SecAggInfo,
    SecAggSeedHeader,
    SecAggShareHeader,
    UpdateMeta,
    encode_message,
)
from edgefl.secagg.decision import BufferDecision, HelperPartial, SeedReport, UpdateKey
from edgefl.secagg.errors import SecAggReason
from edgefl.secagg.ring import RingSpec, encode
from edgefl.secagg.shares import ShareContext, make_shares

__all__ = [
    "ShareEnvelopes",
    "UpdateMeta",
    "build_share_envelopes",
    "coord_decision",
    "coord_partial",
    "coord_refusal",
    "coord_report",
    "decision_from_coord",
    "helper_key_b64",
    "helper_key_from_b64",
    "partial_from_coord",
    "report_from_coord",
    "secagg_info",
    "spec_of",
]


_T = TypeVar("_T")


class _Signer(Protocol):
    def sign(self, envelope: bytes) -> bytes: ...


def helper_key_b64(key: X25519PublicKey) -> str:
    """The base64 of the raw 32-byte public key (``SecAggInfo.helper_key``)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def helper_key_from_b64(text: str) -> X25519PublicKey:
    """Inverse of :func:`helper_key_b64`; ``ValueError`` for anything else."""
    raw = base64.b64decode(text, validate=True)
    return X25519PublicKey.from_public_bytes(raw)


def secagg_info(spec: RingSpec, helper_public: X25519PublicKey) -> SecAggInfo:
    """The ``ServerState.secagg`` announcement of a ring and helper key."""
    return SecAggInfo(
        bits=spec.bits,
        scale=spec.scale,
        clip_norm=spec.clip_norm,
        helper_key=helper_key_b64(helper_public),
    )


def spec_of(info: SecAggInfo) -> RingSpec:
    """The ring a ``ServerState.secagg`` announces (``ValueError`` if the ring is invalid)."""
    return RingSpec(bits=info.bits, scale=info.scale, clip_norm=info.clip_norm)


@dataclass(frozen=True, slots=True)
class ShareEnvelopes:
    """The two envelopes of one update: ``share`` for the leader, ``seed`` for the helper."""

    share: bytes
    seed: bytes


def build_share_envelopes(
    delta: ArrayLike,
    meta: UpdateMeta,
    spec: RingSpec,
    helper_public: X25519PublicKey,
    *,
    rng: np.random.Generator,
    signer: _Signer | None = None,
) -> ShareEnvelopes:
    """Clip, encode and share ``delta`` (see :mod:`edgefl.secagg.shares`). Raises
    ``CodecError(NON_FINITE)`` for NaN/Inf and ``ValueError`` for a non-vector."""
    encoded = encode(delta, spec, rng)
    num_params = int(encoded.size)
    context = ShareContext(
        fleet=meta.fleet,
        device_id=meta.device_id,
        seq=meta.seq,
        model=meta.model,
        num_params=num_params,
        bits=spec.bits,
    )
    shares = make_shares(encoded, spec, helper_public, context)
    bound = dataclasses.asdict(context)  # both headers carry what the seed is bound to
    share = SecAggShareHeader(
        **bound,
        base_version=meta.base_version,
        num_examples=meta.num_examples,
        created_at=meta.created_at,
        lease_id=meta.lease_id,
    )
    seed = SecAggSeedHeader(**bound, created_at=meta.created_at)
    share_env = encode_message(share, shares.masked, signer=signer)
    seed_env = encode_message(seed, shares.sealed, signer=signer)
    return ShareEnvelopes(share_env, seed_env)


# ---------------------------------------------------------------------------------------------
# coordination


def coord_report(fleet: str, report: SeedReport, at: float) -> SecAggCoord:
    return SecAggCoord(
        fleet=fleet,
        what=SecAggCoordKind.REPORT,
        at=at,
        device_id=report.key[0],
        seq=report.key[1],
        ok=report.ok,
        reason=None if report.reason is None else report.reason.value,
    )


def coord_decision(fleet: str, decision: BufferDecision, at: float) -> SecAggCoord:
    return SecAggCoord(
        fleet=fleet,
        what=SecAggCoordKind.DECISION,
        at=at,
        buffer_id=decision.buffer_id,
        members=decision.members,
        weights=decision.weights,
        dropped=decision.dropped,
    )


def coord_partial(fleet: str, partial: HelperPartial, at: float) -> SecAggCoord:
    """The header of a partial; its payload is ``partial.total``."""
    return SecAggCoord(
        fleet=fleet, what=SecAggCoordKind.PARTIAL, at=at, buffer_id=partial.buffer_id
    )


def coord_refusal(
    fleet: str,
    buffer_id: int,
    reason: SecAggReason,
    at: float,
    missing: frozenset[UpdateKey] = frozenset(),
) -> SecAggCoord:
    return SecAggCoord(
        fleet=fleet,
        what=SecAggCoordKind.REFUSAL,
        at=at,
        buffer_id=buffer_id,
        reason=reason.value,
        missing=tuple(sorted(missing)),
    )


def _expect(msg: SecAggCoord, what: SecAggCoordKind) -> None:
    if msg.what is not what:
        raise ProtocolError(RejectReason.BAD_HEADER, f"expected a {what}, got a {msg.what}")


def _reason(text: str | None) -> SecAggReason | None:
    if text is None:
        return None
    try:
        return SecAggReason(text)
    except ValueError:
        raise ProtocolError(RejectReason.BAD_HEADER, f"unknown reason {text!r:.40}") from None


def _present(value: _T | None, name: str) -> _T:
    """A field ``SecAggCoord`` requires for its ``what`` (its constructor checked it)."""
    if value is None:
        raise ProtocolError(RejectReason.BAD_HEADER, f"{name} missing")
    return value


def report_from_coord(msg: SecAggCoord) -> SeedReport:
    _expect(msg, SecAggCoordKind.REPORT)
    key = (_present(msg.device_id, "device_id"), _present(msg.seq, "seq"))
    return SeedReport(key, _present(msg.ok, "ok"), _reason(msg.reason))


def decision_from_coord(msg: SecAggCoord) -> BufferDecision:
    _expect(msg, SecAggCoordKind.DECISION)
    buffer_id = _present(msg.buffer_id, "buffer_id")
    try:
        return BufferDecision(buffer_id, msg.members, msg.weights, msg.dropped)
    except ValueError as exc:
        raise ProtocolError(RejectReason.BAD_HEADER, f"bad decision: {exc}") from None


def partial_from_coord(msg: SecAggCoord, payload: bytes | memoryview) -> HelperPartial:
    _expect(msg, SecAggCoordKind.PARTIAL)
    return HelperPartial(_present(msg.buffer_id, "buffer_id"), bytes(payload))
