"""Partitioners: every sample exactly once; skew behaves as alpha says."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl import data


def assert_partition(parts: list[np.ndarray], n_samples: int, n_devices: int) -> None:
    assert len(parts) == n_devices
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates within a device
    allidx = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n_samples))


labels_st = st.integers(1, 12).flatmap(
    lambda k: st.lists(st.integers(0, k - 1), min_size=1, max_size=300).map(
        lambda xs: np.array(xs, dtype=np.int64)
    )
)


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_iid_covers_exactly_once(labels: np.ndarray, n: int, seed: int) -> None:
    n = min(n, labels.size)
    parts = data.partition_iid(labels, n, np.random.default_rng(seed))
    assert_partition(parts, labels.size, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_st,
    n=st.integers(1, 40),
    alpha=st.floats(0.01, 100.0),
    min_size=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_exactly_once(
    labels: np.ndarray, n: int, alpha: float, min_size: int, seed: int
) -> None:
    min_size = min(min_size, labels.size)
    n = max(1, min(n, labels.size // max(1, min_size)))
    parts = data.partition_dirichlet(
        labels, n, alpha, np.random.default_rng(seed), min_size=min_size
    )
    assert_partition(parts, labels.size, n)
    assert min(len(p) for p in parts) >= min_size


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_st,
    n=st.integers(1, 20),
    spd=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_cover_exactly_once(labels: np.ndarray, n: int, spd: int, seed: int) -> None:
    n = max(1, min(n, labels.size // spd))
    if n * spd > labels.size:
        return
    parts = data.partition_shards(labels, n, spd, np.random.default_rng(seed))
    assert_partition(parts, labels.size, n)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 500)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        vals = [
            data.label_skew(
                labels, data.partition_dirichlet(labels, 50, alpha, np.random.default_rng(s))
            )
            for s in range(3)
        ]
        skews.append(float(np.mean(vals)))
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.15
    assert skews[2] > 0.6
    iid = data.label_skew(labels, data.partition_iid(labels, 50, np.random.default_rng(0)))
    assert iid < 0.25
    shards = data.label_skew(labels, data.partition_shards(labels, 50, 2, np.random.default_rng(0)))
    assert shards > 0.7


def test_dirichlet_min_size_repair_with_many_devices() -> None:
    labels = np.repeat(np.arange(10), 160)  # 1,600 samples over 1,000 devices
    parts = data.partition_dirichlet(labels, 1000, 0.1, np.random.default_rng(0), min_size=1)
    assert_partition(parts, labels.size, 1000)
    assert min(len(p) for p in parts) >= 1


def test_deterministic_for_seed() -> None:
    labels = np.repeat(np.arange(10), 30)
    a = data.partition_dirichlet(labels, 7, 0.5, np.random.default_rng(42))
    b = data.partition_dirichlet(labels, 7, 0.5, np.random.default_rng(42))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_errors() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="IID over 11"):
        data.partition_iid(labels, 11, rng)
    with pytest.raises(ValueError, match=">= 1"):
        data.partition_iid(labels, 0, rng)
    with pytest.raises(ValueError, match="alpha"):
        data.partition_dirichlet(labels, 2, 0.0, rng)
    with pytest.raises(ValueError, match="cannot give 6 devices 2"):
        data.partition_dirichlet(labels, 6, 1.0, rng, min_size=2)
    with pytest.raises(ValueError, match="shards"):
        data.partition_shards(labels, 6, 2, rng)
    with pytest.raises(ValueError, match="integers"):
        data.partition_iid(labels.astype(float), 2, rng)


def test_partition_spec_parse_and_factory() -> None:
    assert data.PartitionSpec.parse("iid").kind is data.PartitionKind.IID
    spec = data.PartitionSpec.parse("dirichlet:0.3")
    assert spec.kind is data.PartitionKind.DIRICHLET
    assert spec.alpha == 0.3
    assert str(spec) == "dirichlet:0.3"
    shards = data.PartitionSpec.parse("shards:3")
    assert shards.shards_per_device == 3
    assert data.PartitionSpec.parse(str(shards)) == shards
    for bad in ("zipf", "dirichlet:x", "dirichlet:-1", "shards:0", "iid:2"):
        with pytest.raises(ValueError, match="partition"):
            data.PartitionSpec.parse(bad)
    labels = np.repeat(np.arange(5), 20)
    for text in ("iid", "dirichlet:0.5", "shards:2"):
        assert_partition(data.partition(labels, 10, text, np.random.default_rng(1)), 100, 10)
