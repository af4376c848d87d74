"""The reconnect backoff (edgefl/transport/_backoff.py): doubling, capped, jittered, and reset
by a connection that lived, not by one the broker dropped at once."""

from __future__ import annotations

import random

import pytest

from edgefl.transport._backoff import Backoff


def upper_bounds(backoff: Backoff, n: int) -> list[float]:
    """The ``d`` of the next ``n`` pauses (each pause is drawn from [d/2, d])."""
    out = []
    for _ in range(n):
        out.append(backoff.delay)
        backoff.pause()
    return out


def test_failed_attempts_double_the_delay_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 3.0)

    assert upper_bounds(backoff, 5) == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_pause_is_drawn_from_the_upper_half() -> None:
    backoff, rng = Backoff(2.0, 2.0), random.Random(1)

    pauses = [backoff.pause(rng) for _ in range(200)]

    assert all(1.0 <= p <= 2.0 for p in pauses)
    assert max(pauses) - min(pauses) > 0.5  # jittered, not constant


def test_a_connection_that_lived_restarts_the_backoff() -> None:
    """Three broker restarts in a row, each connection living 3 s: every reconnect waits at
    most the minimum again (the chaos test's stall was a backoff grown over such restarts)."""
    backoff = Backoff(0.5, 30.0)
    upper_bounds(backoff, 4)  # the broker was down a while: d is 8 s now

    backoff.connection_ended(3.0)

    assert upper_bounds(backoff, 1) == [0.5]


def test_a_connection_dropped_at_once_keeps_backing_off() -> None:
    backoff = Backoff(0.5, 30.0)
    upper_bounds(backoff, 3)

    backoff.connection_ended(0.05)  # a twin took the client id over

    assert upper_bounds(backoff, 2) == [4.0, 8.0]


def test_the_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min_delay"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="min_delay"):
        Backoff(2.0, 1.0)
