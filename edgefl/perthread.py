"""Values that one thread must not share with another, built once per thread and key.

A zstd compression context and a ``torch.func.functional_call`` template module both hold state
while they work, so each thread gets its own: :class:`PerThread` keeps one dict per thread and
builds a missing value with ``make(key)``. With ``limit``, a full dict is emptied before the next
value goes in (a bound on memory when keys are many; values are rebuilt on demand).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["PerThread"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PerThread(Generic[K, V]):
    """``get(key)``: this thread's value for ``key``, made by ``make(key)`` on first use."""

    def __init__(self, make: Callable[[K], V], *, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be None or >= 1, got {limit}")
        self._make = make
        self._limit = limit
        self._local = threading.local()

    def get(self, key: K) -> V:
        cache: dict[K, V] | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = {}
            self._local.cache = cache
        if key in cache:
            return cache[key]
        value = self._make(key)
        if self._limit is not None and len(cache) >= self._limit:
            cache.clear()
        cache[key] = value
        return value
