"""What the fuzz tests (tests/unit/test_fuzz_*.py) share: their Hypothesis budget.

The default run is bounded for CI; ``HYPOTHESIS_PROFILE=fuzz-long`` raises every property to
20,000 examples (docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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
