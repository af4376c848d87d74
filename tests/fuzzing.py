"""What the fuzz and property tests share: the fuzz tests' Hypothesis budget, JSON values.

The default run is bounded for CI; ``HYPOTHESIS_PROFILE=fuzz-long`` raises every property to
20,000 examples (docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz-long"
"""A long fuzzing run was asked for."""


def fuzz_settings(examples: int) -> settings:
    """``examples`` per property in CI (20,000 in a long run); no deadline, and no health check
    for slow or large inputs (hostile inputs are meant to be both)."""
    return settings(
        max_examples=20_000 if LONG else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def json_values(scalars: st.SearchStrategy[Any], max_leaves: int) -> st.SearchStrategy[Any]:
    """JSON-shaped values: ``scalars``, and lists and objects (up to 4 entries) of them."""
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )
