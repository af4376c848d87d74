"""Settings of the two secure-aggregation roles of ``edgefl aggregator --role leader|helper``
(docs/PRIVACY.md, "Secure aggregation"), on top of the :class:`AggregatorConfig` both share
(broker, fleet, model, state directory, buffer size K, the FedBuff weighting knobs).

The ring is derived, never configured twice: ``RingSpec.fit(bits, clip_norm, K, weight_scale)``
(the largest power-of-two scale whose weighted sum of K updates of integer weight up to
``weight_scale`` cannot overflow). Leader and helper must agree on ``bits`` and the model (the
sealed seeds are bound to them); devices learn the ring from ``ServerState.secagg``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar, cast

from edgefl.aggregation import ExampleWeighting, RobustMode
from edgefl.aggregator.config import AggregatorConfig, Algorithm, NormBoundSetting
from edgefl.protocol.messages import SecAggSeedHeader, SecAggShareHeader
from edgefl.secagg import RingSpec

__all__ = [
    "Role",
    "SecAggSettings",
    "ShareAuthenticator",
    "check_compatible",
    "check_outputs",
    "read_key",
    "share_authenticator",
]

_K = TypeVar("_K")


def read_key(path: Path, parse: Callable[[bytes], _K], what: str) -> _K:
    """``parse`` of the PEM file at ``path``; ``ValueError`` naming the path otherwise."""
    try:
        return parse(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable {what} ({exc})") from None


class Role(StrEnum):
    """Which service ``edgefl aggregator`` runs."""

    PLAIN = "plain"  # the FedBuff / FedAvg aggregator of plaintext updates (default)
    LEADER = "leader"  # secure aggregation: masked shares, decisions, the model
    HELPER = "helper"  # secure aggregation: sealed seeds, partial sums


@dataclass(frozen=True)
class SecAggSettings:
    """``helper_key``: the helper's private key (helper) or public key (leader), PEM.
    ``weight_scale``: the integer weight of a full-weight update (the largest weight);
    ``share_timeout_s``: how long one share waits for the other at the leader;
    ``seed_timeout_s``: how long the helper keeps a seed no decision claims;
    ``min_members``: the smallest buffer the helper answers (and the leader decides)."""

    helper_key: Path
    bits: int = 32
    clip_norm: float = 1.0
    weight_scale: int = 256
    share_timeout_s: float = 60.0
    seed_timeout_s: float = 3600.0
    min_members: int = 2
    memory: int = 10_000

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, got {self.bits}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if self.weight_scale < 1 or self.min_members < 1 or self.memory < 1:
            raise ValueError("weight_scale, min_members and memory must be >= 1")
        if not (self.share_timeout_s > 0 and self.seed_timeout_s > self.share_timeout_s):
            raise ValueError("need 0 < share_timeout_s < seed_timeout_s")

    def ring(self, buffer_size: int) -> RingSpec:
        return RingSpec.fit(
            bits=self.bits,
            clip_norm=self.clip_norm,
            buffer_size=buffer_size,
            w_max=self.weight_scale,
        )


def check_compatible(config: AggregatorConfig, settings: SecAggSettings) -> None:
    """Refuse (``ValueError``, one line) aggregator options secure aggregation cannot honour:
    they need individual updates, which no role sees (docs/PRIVACY.md, "Defences"); and, with
    central DP (``--dp``), the settings its sensitivity argument at the leader needs
    (:mod:`edgefl.secagg.privacy`), each error naming the option."""
    if config.algorithm is not Algorithm.FEDBUFF:
        raise ValueError("secure aggregation runs FedBuff only (no synchronous FedAvg rounds)")
    if config.aggregation.robust is not RobustMode.NONE:
        raise ValueError(f"robust mode {config.aggregation.robust.value} needs individual updates")
    if config.aggregation.privacy is not None:
        _check_dp(config, settings)
    if (
        config.aggregation.example_weighting is ExampleWeighting.EXAMPLES
        and config.aggregation.example_cap is None
    ):
        raise ValueError("examples weighting under secure aggregation needs an example_cap")
    if settings.min_members > config.aggregation.buffer_size:
        raise ValueError("min_members must be <= buffer_size")


def check_outputs(role: Role, config: AggregatorConfig) -> None:
    """Refuse (``ValueError``, one line) the outputs a role would otherwise ignore: only the
    leader holds the model, so only it evaluates (``--eval-dataset``); neither role stops at a
    target accuracy (``--until-accuracy``), exports ONNX (``--publish-onnx``) or serves
    Prometheus metrics (``--metrics-port``; the METRICS topic carries their figures) yet."""
    out = config.outputs
    if out.metrics_port is not None:
        raise ValueError(
            f"--metrics-port is not available with --role {role.value} (its figures are on the"
            " METRICS topic: edgefl monitor)"
        )
    if out.until_accuracy is not None:
        raise ValueError(f"--until-accuracy is not available with --role {role.value}")
    if out.publish_onnx:
        raise ValueError(f"--publish-onnx is not available with --role {role.value}")
    if role is not Role.LEADER and out.eval_dataset is not None:
        raise ValueError(
            f"--eval-dataset: the {role.value} holds no model to evaluate (give it to the leader)"
        )


def _check_dp(config: AggregatorConfig, settings: SecAggSettings) -> None:
    dp = config.aggregation.privacy
    assert dp is not None
    why = "with --dp under secure aggregation: central DP at the leader needs"
    # (normalisation 'sum', and no adaptive bound: the config's FedBuffConfig refuses the others)
    weighting = config.aggregation.example_weighting
    if weighting is not ExampleWeighting.EQUAL:
        raise ValueError(f"example_weighting {weighting.value} {why} example_weighting 'equal'")
    bound = NormBoundSetting(str(config.options()["norm_bound"]))
    if bound is not NormBoundSetting.OFF:
        raise ValueError(
            f"norm_bound {bound.value} {why} norm_bound 'off' (no role sees an "
            "update to bound; the device clip bounds it)"
        )
    if settings.clip_norm != dp.clip_norm:
        raise ValueError(
            f"--secagg-clip {settings.clip_norm:g} {why} the DP clip C={dp.clip_norm:g} "
            "(devices clip to --secagg-clip): set both to the same value"
        )


class ShareAuthenticator(Protocol):
    """``edgefl.security``'s device-key authenticator, for the two share kinds."""

    def authenticate_share(
        self, header: SecAggShareHeader | SecAggSeedHeader, envelope: bytes
    ) -> None: ...


def share_authenticator(config: AggregatorConfig) -> ShareAuthenticator | None:
    """The configured device-key authenticator (``--device-keys``) for shares, or None when
    updates are not verified; ``ValueError`` for an authenticator that cannot check shares."""
    auth = config.authenticator
    if auth is None:
        return None
    if not hasattr(auth, "authenticate_share"):
        raise ValueError("secure aggregation with signatures needs an authenticator of shares")
    return cast(ShareAuthenticator, auth)
