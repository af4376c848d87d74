"""Shipped datasets: digits and the offline mnist1d generator with its on-disk cache."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest

from edgefl.data import datasets as ds_mod
from edgefl.data.datasets import Dataset, default_cache_dir, load_dataset


def test_digits() -> None:
    ds = load_dataset("digits", seed=0)
    assert ds.input_shape == (64,)
    assert ds.num_classes == 10
    assert ds.num_train + ds.num_test == 1797
    assert abs(ds.num_test - 0.2 * 1797) <= 1
    assert ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64
    assert ds.x_train.min() >= 0.0
    assert ds.x_train.max() <= 1.0
    # stratified: every class in both splits in similar proportions
    tr = np.bincount(ds.y_train, minlength=10) / ds.num_train
    te = np.bincount(ds.y_test, minlength=10) / ds.num_test
    assert np.abs(tr - te).max() < 0.02
    again = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)
    small = load_dataset("digits", seed=0, num_samples=500)
    assert small.num_train + small.num_test == 500


def test_unknown_and_bad_arguments() -> None:
    with pytest.raises(KeyError, match="digits"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("digits", num_samples=5)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def test_mnist1d_generation_cache_and_rng_hygiene(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    want_py, want_np = random.random(), np.random.rand()
    random.seed(1)
    np.random.seed(1)
    ds = load_dataset("mnist1d", seed=3, num_samples=500, cache_dir=tmp_path)
    # mnist1d reseeds the global RNGs; load_dataset must restore them
    assert random.random() == want_py
    assert np.random.rand() == want_np
    assert ds.input_shape == (1, 40)
    assert ds.x_train.shape == (400, 1, 40)
    assert ds.x_test.shape == (100, 1, 40)
    assert ds.x_train.dtype == np.float32
    assert set(np.unique(ds.y_train)) <= set(range(10))
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1
    assert not list(tmp_path.glob("*.tmp"))
    cached = load_dataset("mnist1d", seed=3, num_samples=500, cache_dir=tmp_path)
    np.testing.assert_array_equal(cached.x_train, ds.x_train)
    np.testing.assert_array_equal(cached.y_test, ds.y_test)
    other_seed = load_dataset("mnist1d", seed=4, num_samples=500, cache_dir=tmp_path)
    assert not np.array_equal(other_seed.x_train, ds.x_train)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2
    # a corrupt cache entry is ignored and rewritten
    files[0].write_bytes(b"garbage")
    rebuilt = load_dataset("mnist1d", seed=3, num_samples=500, cache_dir=tmp_path)
    np.testing.assert_array_equal(rebuilt.x_train, ds.x_train)
    assert files[0].stat().st_size > 1000
    uncached = load_dataset("mnist1d", seed=3, num_samples=500, cache=False)
    np.testing.assert_array_equal(uncached.x_train, ds.x_train)


def test_cache_writes_are_atomic_under_concurrency(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    arrays = {k: np.full(50_000, i, dtype=np.float32) for i, k in enumerate(ds_mod._ARRAY_KEYS)}
    errors: list[BaseException] = []
    seen: list[bool] = []

    def writer() -> None:
        try:
            for _ in range(5):
                ds_mod._write_cache(path, arrays)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        for _ in range(20):
            got = ds_mod._read_cache(path)
            if got is not None:  # never a partial file
                seen.append(bool(np.array_equal(got["x_test"], arrays["x_test"])))

    threads = [threading.Thread(target=writer) for _ in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(seen)
    assert not list(tmp_path.glob("*.tmp"))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEFL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "edgefl"
    monkeypatch.setenv("EDGEFL_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_dataset_validates_shapes() -> None:
    x = np.zeros((4, 64), dtype=np.float32)
    y = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        Dataset(x, y, x, y[:3], name="t", input_shape=(64,), num_classes=10)
    with pytest.raises(ValueError, match="shape"):
        Dataset(x, y, x, y, name="t", input_shape=(1, 64), num_classes=10)
