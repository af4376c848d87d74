"""Candidates for a lease: devices that checked in and wait for work (sans-IO).

:class:`LeaseBook` draws from any :class:`CandidatePool`. The aggregator's pool is
:class:`CheckInPool`, the explicit set of devices whose check-in has not expired; the virtual
simulator's pool is its lazy fleet's sampler of idle, available devices. Both run the same
lease decisions, so the simulator's concurrency is the runtime's.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Protocol

import numpy as np

__all__ = ["CandidatePool", "CheckInPool"]


class CandidatePool(Protocol):
    """Where lease candidates come from."""

    def sample(
        self, k: int, *, rng: np.random.Generator, exclude: Container[str], now: float
    ) -> list[str]:
        """Up to ``k`` distinct candidates drawn uniformly at random, none in ``exclude``."""
        ...

    def take(self, devices: Iterable[str]) -> None:
        """``devices`` were granted a lease: they are no longer candidates (until they check in
        again)."""
        ...


class CheckInPool:
    """Devices that checked in, each until ``checked_in_at + ttl_s``.

    ``sample`` is O(k) expected, whatever the number of candidates: a list with swap-remove
    gives uniform draws, and an entry found expired when drawn is dropped then (lazy expiry).
    Memory is one list slot and one dict entry per candidate (about 150 B; 1,000,000
    candidates are about 150 MB).
    """

    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self._ttl_s = ttl_s
        self._ids: list[str] = []
        self._where: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def __len__(self) -> int:
        """Candidates held, including those whose check-in expired but were not drawn since."""
        return len(self._ids)

    def __contains__(self, device: object) -> bool:
        return device in self._where

    def check_in(self, device: str, now: float) -> None:
        """``device`` is a candidate until ``now + ttl_s`` (renewing an earlier check-in)."""
        if device not in self._where:
            self._where[device] = len(self._ids)
            self._ids.append(device)
        self._until[device] = now + self._ttl_s

    def withdraw(self, device: str) -> bool:
        """``device`` is no longer a candidate; False if it was not one."""
        i = self._where.pop(device, None)
        if i is None:
            return False
        last = self._ids.pop()
        if last != device:
            self._ids[i] = last
            self._where[last] = i
        del self._until[device]
        return True

    def take(self, devices: Iterable[str]) -> None:
        for d in devices:
            self.withdraw(d)

    def sample(
        self, k: int, *, rng: np.random.Generator, exclude: Container[str], now: float
    ) -> list[str]:
        if k <= 0:
            return []
        if 2 * k >= len(self._ids):
            return self._sample_all(k, rng=rng, exclude=exclude, now=now)
        chosen: list[str] = []
        seen: set[str] = set()
        tries = 0
        while len(chosen) < k and self._ids and tries < 4 * k + 64:
            tries += 1
            d = self._ids[int(rng.integers(len(self._ids)))]
            if self._until[d] <= now:
                self.withdraw(d)
            elif d not in seen and d not in exclude:
                seen.add(d)
                chosen.append(d)
        return chosen

    def _sample_all(
        self, k: int, *, rng: np.random.Generator, exclude: Container[str], now: float
    ) -> list[str]:
        """Small pools: every valid candidate in a random order, the first ``k`` of them."""
        for d in [d for d in self._ids if self._until[d] <= now]:
            self.withdraw(d)
        valid = [d for d in self._ids if d not in exclude]
        order = rng.permutation(len(valid))
        return [valid[int(i)] for i in order[:k]]
