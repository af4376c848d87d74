"""Weight of one update: ``weight = example_weight(n) * s(tau)``.

Example weighting:

* ``equal``:    ``example_weight(n) = 1``
* ``examples``: ``example_weight(n) = min(n, cap)`` (``cap = None`` means uncapped)

The cap (default :data:`DEFAULT_EXAMPLE_CAP` = 1000) bounds how much a single device can weigh:
``num_examples`` is self-reported by the device, so without a cap one device claiming 10^9
examples would own the whole buffer. With every ``n <= cap`` the ``examples`` weighting is
exactly FedAvg's ``n_i / sum(n)``.

``num_examples`` must be an integer >= 1 in **both** modes: an update computed from no examples is
not an update. Violations raise ``UpdateRejected(BAD_EXAMPLES)``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from edgefl.aggregation.staleness import StalenessWeight
from edgefl.errors import RejectReason, UpdateRejected

DEFAULT_EXAMPLE_CAP: Final = 1000


class ExampleWeighting(StrEnum):
    """How the number of training examples of an update enters its weight."""

    EQUAL = "equal"
    EXAMPLES = "examples"


def check_example_cap(cap: int | None) -> None:
    """Validate an example cap (``None`` or an integer >= 1); raises ``ValueError``."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"example cap must be None or an integer >= 1, got {cap!r}")


def example_weight(num_examples: int, weighting: ExampleWeighting, cap: int | None) -> float:
    """``1`` (equal) or ``min(n, cap)`` (examples); rejects ``n < 1`` with BAD_EXAMPLES."""
    if isinstance(num_examples, bool):
        raise UpdateRejected(RejectReason.BAD_EXAMPLES, f"num_examples {num_examples!r} is a bool")
    try:
        n = operator.index(num_examples)
    except TypeError:
        raise UpdateRejected(
            RejectReason.BAD_EXAMPLES, f"num_examples must be an integer, got {num_examples!r}"
        ) from None
    if n < 1:
        raise UpdateRejected(RejectReason.BAD_EXAMPLES, f"num_examples must be >= 1, got {n}")
    if weighting is ExampleWeighting.EQUAL:
        return 1.0
    return float(n if cap is None else min(n, cap))


@dataclass(frozen=True)
class UpdateWeight:
    """The two factors of an update's weight; ``total = example * staleness``."""

    example: float
    staleness: float

    @property
    def total(self) -> float:
        return self.example * self.staleness


def update_weight(
    num_examples: int,
    tau: int,
    *,
    weighting: ExampleWeighting,
    cap: int | None,
    staleness: StalenessWeight,
) -> UpdateWeight:
    """Weight of an update of ``num_examples`` examples that is ``tau`` versions stale.

    Raises ``UpdateRejected(BAD_EXAMPLES)`` for a bad ``num_examples``; ``ValueError`` when the
    staleness function returns something other than a finite number > 0 (a configuration bug).
    """
    ex = example_weight(num_examples, weighting, cap)
    s = float(staleness(tau))
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"staleness function {staleness!r} returned {s} for tau={tau}; need > 0")
    return UpdateWeight(example=ex, staleness=s)
