"""The device's side of secure aggregation (docs/PRIVACY.md, "Secure aggregation"; protocol 1.3).

When the retained server state announces the ``"secagg"`` feature, every finished training is
sent as two shares instead of one UPDATE: the masked vector to the leader
(``secagg/share/<id>/<seq>``) and the seed sealed to the helper (``secagg/seed/<id>/<seq>``).

Trust: the agent seals **only to the helper key of its own configuration**
(``security.helper_public_key_file``, from its provisioning bundle) and compares it with the key
the server state announces. When the two differ, or the agent has no helper key, it refuses to
build the update (``SecAggUnavailable``, an :class:`~edgefl.errors.EdgeflError`: the agent counts
it as ``encode_failed`` and logs why) rather than send it in the clear or to a key a leader
chose: a leader announcing its own key would otherwise hold both shares.

Spooling: both envelopes of one update are one spool entry, framed as ``MAGIC || u32 len(share)
|| share || seed`` (:func:`pack` / :func:`unpack`), so a resend after a restart re-publishes the
same bytes (the roles treat an identical redelivery idempotently). Shares are not chunked: the
broker must accept one message of ``bits/8 · num_params`` bytes plus the header.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from edgefl.errors import EdgeflError, RejectReason
from edgefl.protocol.messages import FEATURE_SECAGG, SecAggInfo, ServerState, UpdateMeta
from edgefl.protocol.topics import secagg_seed_topic, secagg_share_topic

if TYPE_CHECKING:  # cryptography (the [security] extra) is imported only when announced
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from device_agent.trainer import TrainResult
    from edgefl.auth import EnvelopeSigner
    from edgefl.secagg import RingSpec

__all__ = [
    "MAGIC",
    "SecAggUnavailable",
    "SecAggUplink",
    "is_pair",
    "pack",
    "pair_packets",
    "unpack",
]

log = logging.getLogger("device_agent")

MAGIC: Final = b"EFSA"
"""Spool entries starting with this hold a share pair (an envelope starts with ``EDFL``)."""
_LEN: Final = struct.Struct("<I")


class SecAggUnavailable(EdgeflError):
    """The aggregator asks for secure aggregation and this device cannot take part."""

    def __init__(self, detail: str) -> None:
        super().__init__(RejectReason.BAD_HEADER, f"secure aggregation: {detail}")


def pack(share: bytes, seed: bytes) -> bytes:
    """One spool entry of both envelopes."""
    return MAGIC + _LEN.pack(len(share)) + share + seed


def is_pair(entry: bytes | memoryview) -> bool:
    return bytes(entry[: len(MAGIC)]) == MAGIC


def unpack(entry: bytes) -> tuple[bytes, bytes]:
    """Inverse of :func:`pack`; ``ValueError`` for anything else."""
    head = len(MAGIC) + _LEN.size
    if not is_pair(entry) or len(entry) < head:
        raise ValueError("not a share pair")
    (size,) = _LEN.unpack_from(entry, len(MAGIC))
    if head + size >= len(entry):
        raise ValueError("truncated share pair")
    return entry[head : head + size], entry[head + size :]


def pair_packets(fleet: str, device: str, seq: int, entry: bytes) -> list[tuple[str, bytes]]:
    """The two publications of a spooled pair, the share first."""
    share, seed = unpack(entry)
    return [
        (secagg_share_topic(fleet, device, seq), share),
        (secagg_seed_topic(fleet, device, seq), seed),
    ]


class SecAggUplink:
    """What the agent knows about secure aggregation: the configured helper key, the ring the
    server state announces; :meth:`build` makes the spool entry of one update."""

    def __init__(self, helper_key_file: Path | None) -> None:
        self._key_file = helper_key_file
        self._key: X25519PublicKey | None = None
        self._announced: SecAggInfo | None = None
        self._warned: str | None = None

    @property
    def required(self) -> bool:
        """The aggregator announced secure aggregation: no plaintext update may go out."""
        return self._announced is not None

    def on_server_state(self, state: ServerState) -> None:
        announced = state.secagg if FEATURE_SECAGG in state.features else None
        if announced != self._announced:
            self._announced = announced
            self._warned = None
            if announced is not None:
                log.info("the aggregator runs secure aggregation (b = %d)", announced.bits)

    def _helper_key(self, announced: SecAggInfo) -> X25519PublicKey:
        try:
            from edgefl.secagg import load_helper_public_key
            from edgefl.secagg.wire import helper_key_b64
        except ImportError as exc:  # no cryptography: install edgefl-mqtt[security]
            raise SecAggUnavailable(f"needs the [security] extra ({exc})") from None
        if self._key_file is None:
            raise SecAggUnavailable("no security.helper_public_key_file configured")
        if self._key is None:
            try:
                self._key = load_helper_public_key(self._key_file.read_bytes())
            except (OSError, ValueError) as exc:
                raise SecAggUnavailable(f"{self._key_file}: {exc}") from None
        if helper_key_b64(self._key) != announced.helper_key:
            raise SecAggUnavailable("the announced helper key is not the configured one")
        return self._key

    def spec(self) -> RingSpec:
        """The announced ring and the checked helper key; ``SecAggUnavailable`` otherwise."""
        announced = self._announced
        if announced is None:
            raise SecAggUnavailable("not announced")
        self._helper_key(announced)
        from edgefl.secagg.wire import spec_of

        try:
            return spec_of(announced)
        except ValueError as exc:
            raise SecAggUnavailable(f"announced ring: {exc}") from None

    def build(
        self, result: TrainResult, meta: UpdateMeta, *, signer: EnvelopeSigner | None = None
    ) -> bytes:
        """The spool entry (both envelopes) of the update ``meta`` describes;
        ``SecAggUnavailable`` when the device cannot take part, ``CodecError`` for a non-finite
        delta."""
        spec = self.spec()
        assert self._key is not None  # spec() loaded and checked it
        from edgefl.secagg.wire import build_share_envelopes

        built = build_share_envelopes(
            result.delta, meta, spec, self._key, rng=np.random.default_rng(), signer=signer
        )
        return pack(built.share, built.seed)
