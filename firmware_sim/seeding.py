"""Seeding of the simulator's random streams.

Every random stream is ``numpy.random.default_rng([seed & MASK64, STREAM, ...])``: the run's seed
(masked to the 64 bits numpy's ``SeedSequence`` entropy words take, so negative or huge seeds
work) followed by a per-purpose stream constant, so streams never share draws.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MASK64"]

MASK64: Final = (1 << 64) - 1
"""``seed & MASK64``: the run seed as an unsigned 64-bit word."""
