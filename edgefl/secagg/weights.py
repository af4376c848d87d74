"""The public integer weight of one update under secure aggregation (the leader's arithmetic).

FedBuff weighs an update by ``example_weight(n) · staleness(τ)`` (:mod:`edgefl.aggregation`).
The leader cannot multiply a share by a float, so it uses the integer

    w = min(W, fixed_point_weight(e · staleness(τ), W)),   e = min(n, cap) / cap  (examples)
                                                          e = 1                 (equal)

with ``W`` the weight scale (the weight of a full-weight update, 256 by default): the example
weight is normalised to at most 1 by the cap, so ``1 ≤ w ≤ W`` and the ring's headroom bound
(``K · W · Q``) holds. Under ``mean`` normalisation the step divides by ``Σ w_i``, so only the
ratios matter; ``W`` sets their resolution, and an update whose ``e · staleness(τ) · W`` is
below 1.5 weighs ``1`` (ties to even): the smallest weight is ``1 / W``.
"""

from __future__ import annotations

from edgefl.aggregation import ExampleWeighting, StalenessWeight, update_weight
from edgefl.secagg.ring import fixed_point_weight

__all__ = ["leader_weight"]


def leader_weight(
    num_examples: int,
    tau: int,
    *,
    weighting: ExampleWeighting,
    cap: int | None,
    staleness: StalenessWeight,
    weight_scale: int,
) -> int:
    """The integer weight above; raises ``UpdateRejected(BAD_EXAMPLES)`` for a bad
    ``num_examples`` (as :func:`~edgefl.aggregation.update_weight` does)."""
    weight = update_weight(num_examples, tau, weighting=weighting, cap=cap, staleness=staleness)
    example = weight.example
    if weighting is ExampleWeighting.EXAMPLES and cap is not None:
        example /= cap
    return min(weight_scale, fixed_point_weight(example * weight.staleness, weight_scale))
