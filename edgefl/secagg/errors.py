"""Why the secure-aggregation roles refuse or exclude something (counted by reason)."""

from __future__ import annotations

from enum import StrEnum


class SecAggReason(StrEnum):
    """Reasons of :class:`SecAggError` and of the exclusion counters of both roles.

    The values appear in metrics and must stay stable.
    """

    BAD_SHARE = "secagg_bad_share"  # a masked share of the wrong length or ring
    BAD_SEAL = "secagg_bad_seal"  # a sealed seed that does not open (wrong key, tampered, AD)
    DUPLICATE = "secagg_duplicate"  # a second share for an update already held or decided
    MISSING_HELPER_SHARE = "secagg_missing_helper_share"  # leader: seed never announced in time
    MISSING_LEADER_SHARE = "secagg_missing_leader_share"  # leader: announced, masked share absent
    HELPER_REJECTED = "secagg_helper_rejected"  # the helper could not open the seed
    LATE_SHARE = "secagg_late_share"  # a share of an update already excluded
    UNCLAIMED_SEED = "secagg_unclaimed_seed"  # helper: no decision named it before its timeout
    DROPPED_BY_LEADER = "secagg_dropped_by_leader"  # helper: a decision listed it as dropped
    BAD_WEIGHT = "secagg_bad_weight"  # an integer weight outside [1, w_max]
    HEADROOM = "secagg_headroom"  # a decision whose weighted sum could overflow the ring
    BAD_DECISION = "secagg_bad_decision"  # helper: a decision naming a seed it does not hold
    STALE_DECISION = "secagg_stale_decision"  # a decision or partial of a closed buffer
    OVERFLOW = "secagg_overflow"  # the decoded sum failed the ring's range check


class SecAggError(Exception):
    """A refused share, decision or partial; :attr:`reason` is a :class:`SecAggReason`."""

    def __init__(self, reason: SecAggReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
