"""Split a labelled dataset over ``n`` devices (IID, Dirichlet over labels, shards).

Contract of every partitioner: it returns ``n`` sorted ``int64`` index arrays that together cover
``range(len(labels))`` exactly once (a partition, no duplicates, nothing lost), and is
deterministic for a given ``rng`` state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.kinds import split_kind

__all__ = [
    "PartitionKind",
    "PartitionSpec",
    "label_skew",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]

IndexArray = NDArray[np.int64]


def _labels(labels: NDArray[Any], n: int) -> NDArray[np.int64]:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if n < 1:
        raise ValueError(f"number of devices must be >= 1, got {n}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _split_by_owner(owner: NDArray[np.int64], n: int) -> list[IndexArray]:
    """Indices grouped by owner device: ``result[d] = sorted(where(owner == d))``."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    counts = np.bincount(owner, minlength=n)
    return [np.asarray(a, dtype=np.int64) for a in np.split(order, np.cumsum(counts)[:-1])]


def partition_iid(labels: NDArray[Any], n: int, rng: np.random.Generator) -> list[IndexArray]:
    """Uniformly random split into ``n`` parts whose sizes differ by at most one.

    Raises ``ValueError`` when ``n > len(labels)`` (some device would get nothing).
    """
    y = _labels(labels, n)
    if n > y.size:
        raise ValueError(f"cannot split {y.size} samples IID over {n} devices")
    perm = rng.permutation(y.size).astype(np.int64)
    return [np.sort(p) for p in np.array_split(perm, n)]


def partition_dirichlet(
    labels: NDArray[Any],
    n: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 10,
) -> list[IndexArray]:
    """Label-skewed split: for each class ``c``, ``p_c ~ Dirichlet(alpha · 1_n)`` and the samples
    of class ``c`` are dealt to devices in proportions ``p_c``.

    Small ``alpha`` gives each device few classes (and unequal sizes); ``alpha → ∞`` tends to IID.
    If some device ends up with fewer than ``min_size`` samples the draw is repeated (at most
    ``max_tries`` times); after that, deficient devices take random samples from the currently
    largest device until every device has ``min_size``. Raises ``ValueError`` when
    ``n · min_size > len(labels)`` or ``alpha <= 0``.
    """
    y = _labels(labels, n)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0 or n * min_size > y.size:
        raise ValueError(f"cannot give {n} devices {min_size} of {y.size} samples each")
    classes = np.unique(y)
    owner = np.empty(y.size, dtype=np.int64)
    for _ in range(max(1, max_tries)):
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n, alpha))
            bounds = np.cumsum(p) * idx.size
            # sample j of the class goes to the first device whose cumulative share exceeds j
            dev = np.searchsorted(bounds, np.arange(idx.size) + 0.5, side="right")
            owner[idx] = np.minimum(dev, n - 1)
        counts = np.bincount(owner, minlength=n)
        if counts.min() >= min_size:
            return _split_by_owner(owner, n)
    # repair: move random samples from the largest device to each deficient device
    counts = np.bincount(owner, minlength=n)
    for d in np.flatnonzero(counts < min_size):
        while counts[d] < min_size:
            donor = int(np.argmax(counts))
            choice = rng.choice(np.flatnonzero(owner == donor))
            owner[choice] = d
            counts[donor] -= 1
            counts[d] += 1
    return _split_by_owner(owner, n)


def partition_shards(
    labels: NDArray[Any], n: int, shards_per_device: int, rng: np.random.Generator
) -> list[IndexArray]:
    """McMahan et al.'s pathological split: sort by label, cut into ``n · shards_per_device``
    contiguous shards of (nearly) equal size, deal ``shards_per_device`` random shards to each
    device. Each device sees about ``shards_per_device`` classes.

    Raises ``ValueError`` when there are fewer samples than shards.
    """
    y = _labels(labels, n)
    if shards_per_device < 1:
        raise ValueError(f"shards_per_device must be >= 1, got {shards_per_device}")
    num_shards = n * shards_per_device
    if num_shards > y.size:
        raise ValueError(f"cannot cut {y.size} samples into {num_shards} shards")
    perm = rng.permutation(y.size)
    order = perm[np.argsort(y[perm], kind="stable")].astype(np.int64)
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards)
    out: list[IndexArray] = []
    for d in range(n):
        mine = deal[d * shards_per_device : (d + 1) * shards_per_device]
        out.append(np.sort(np.concatenate([shards[s] for s in mine])).astype(np.int64))
    return out


class PartitionKind(StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"


@dataclass(frozen=True)
class PartitionSpec:
    """Which partitioner and its parameter; text form ``iid``, ``dirichlet:<alpha>``,
    ``shards:<per device>`` (see :meth:`parse`)."""

    kind: PartitionKind = PartitionKind.DIRICHLET
    alpha: float = 0.5
    shards_per_device: int = 2
    min_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PartitionKind(self.kind))
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.shards_per_device < 1:
            raise ValueError(f"shards_per_device must be >= 1, got {self.shards_per_device}")

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """``"iid"`` | ``"dirichlet"`` | ``"dirichlet:0.3"`` | ``"shards"`` | ``"shards:2"``."""
        kind, arg = split_kind(text, PartitionKind, "partition")
        try:
            if kind is PartitionKind.IID:
                if arg:
                    raise ValueError("iid takes no parameter")
                return cls(kind)
            if kind is PartitionKind.DIRICHLET:
                return cls(kind, alpha=float(arg)) if arg else cls(kind)
            return cls(kind, shards_per_device=int(arg)) if arg else cls(kind)
        except ValueError as exc:
            raise ValueError(f"bad partition {text!r}: {exc}") from None

    def __str__(self) -> str:
        if self.kind is PartitionKind.IID:
            return "iid"
        if self.kind is PartitionKind.DIRICHLET:
            return f"dirichlet:{self.alpha:g}"
        return f"shards:{self.shards_per_device}"


def partition(
    labels: NDArray[Any], n: int, spec: PartitionSpec | str, rng: np.random.Generator
) -> list[IndexArray]:
    """Factory: run the partitioner ``spec`` names (a :class:`PartitionSpec` or its text form)."""
    if isinstance(spec, str):
        spec = PartitionSpec.parse(spec)
    if spec.kind is PartitionKind.IID:
        return partition_iid(labels, n, rng)
    if spec.kind is PartitionKind.DIRICHLET:
        return partition_dirichlet(labels, n, spec.alpha, rng, min_size=spec.min_size)
    return partition_shards(labels, n, spec.shards_per_device, rng)


def label_skew(labels: NDArray[Any], parts: Sequence[NDArray[Any]]) -> float:
    """Mean total-variation distance between each non-empty device's label distribution and the
    global one: 0 for perfectly IID parts, approaching 1 when devices hold rare single classes."""
    y = np.asarray(labels, dtype=np.int64)
    k = int(y.max()) + 1 if y.size else 1
    glob = np.bincount(y, minlength=k) / max(1, y.size)
    dists = []
    for p in parts:
        if len(p) == 0:
            continue
        local = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=k) / len(p)
        dists.append(0.5 * float(np.abs(local - glob).sum()))
    return float(np.mean(dists)) if dists else 0.0
