"""Secure aggregation with two non-colluding aggregators and additive secret sharing (issue 20).

Sans-IO, numpy and ``cryptography`` only (no torch, no I/O). Module map:

* :mod:`~edgefl.secagg.ring` — fixed point on ``Z_(2^b)``: clip, scale, stochastic rounding,
  two's complement; the headroom bound and the range-checked decoding of a weighted sum;
* :mod:`~edgefl.secagg.shares` — the device's two shares (masked vector, sealed ChaCha20 seed),
  :class:`HelperKeys` (X25519);
* :mod:`~edgefl.secagg.decision` — the messages between the roles;
* :mod:`~edgefl.secagg.leader` / :mod:`~edgefl.secagg.helper` — the two roles;
* :mod:`~edgefl.secagg.state` — their frozen snapshots; :mod:`~edgefl.secagg.noise` — the DP hook;
* :mod:`~edgefl.secagg.privacy` — central DP at the leader (admission, noise, accounting).

The protocol, its trust assumption and costs: docs/PRIVACY.md, "Secure aggregation". The
services (``edgefl aggregator --role leader|helper``) are ``edgefl/aggregator/secagg_*.py``; the
wire messages ``edgefl.secagg.wire`` (protocol 1.3).
"""

from edgefl.secagg.decision import BufferDecision, HelperPartial, SeedReport, UpdateKey
from edgefl.secagg.errors import SecAggError, SecAggReason
from edgefl.secagg.helper import HelperConfig, MissingSeeds, SecAggHelper
from edgefl.secagg.leader import AggregateResult, LeaderConfig, SecAggLeader, SumNoise
from edgefl.secagg.noise import GaussianSumNoise
from edgefl.secagg.privacy import LeaderPrivacy
from edgefl.secagg.ring import RingSpec, decode_sum, encode, fixed_point_weight
from edgefl.secagg.shares import (
    SEALED_SIZE,
    HelperKeys,
    ShareContext,
    Shares,
    expand_mask,
    load_helper_public_key,
    make_shares,
    open_seed,
)
from edgefl.secagg.state import HeldSeed, HelperSnapshot, LeaderSnapshot, PendingShare

__all__ = [
    "SEALED_SIZE",
    "AggregateResult",
    "BufferDecision",
    "GaussianSumNoise",
    "HeldSeed",
    "HelperConfig",
    "HelperKeys",
    "HelperPartial",
    "HelperSnapshot",
    "LeaderConfig",
    "LeaderPrivacy",
    "LeaderSnapshot",
    "MissingSeeds",
    "PendingShare",
    "RingSpec",
    "SecAggError",
    "SecAggHelper",
    "SecAggLeader",
    "SecAggReason",
    "SeedReport",
    "ShareContext",
    "Shares",
    "SumNoise",
    "UpdateKey",
    "decode_sum",
    "encode",
    "expand_mask",
    "fixed_point_weight",
    "load_helper_public_key",
    "make_shares",
    "open_seed",
]
