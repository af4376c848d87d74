"""PerThread: one value per thread and key, made on first use, bounded by ``limit``."""

from __future__ import annotations

import threading

import pytest

from edgefl.perthread import PerThread


def counting(limit: int | None = None) -> tuple[PerThread[int, list[int]], list[int]]:
    """A PerThread whose value for ``key`` is a fresh ``[key]``, and the keys it made."""
    made: list[int] = []

    def make(key: int) -> list[int]:
        made.append(key)
        return [key]

    return PerThread(make, limit=limit), made


def test_one_thread_gets_the_same_value_for_a_key_and_makes_it_once() -> None:
    cache, made = counting()

    first, again, other = cache.get(1), cache.get(1), cache.get(2)

    assert first is again
    assert (first, other) == ([1], [2])
    assert made == [1, 2]


def test_each_thread_gets_its_own_value() -> None:
    cache, made = counting()
    mine = cache.get(7)
    theirs: list[list[int]] = []

    worker = threading.Thread(target=lambda: theirs.append(cache.get(7)))
    worker.start()
    worker.join()

    assert theirs == [[7]]
    assert theirs[0] is not mine
    assert made == [7, 7]


def test_a_full_cache_is_emptied_before_the_next_value() -> None:
    cache, made = counting(limit=2)
    one = cache.get(1)
    cache.get(2)

    cache.get(3)  # full (1, 2): emptied, then 3 goes in

    assert cache.get(1) is not one  # made again
    assert made == [1, 2, 3, 1]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        PerThread(lambda k: k, limit=0)
