"""The device's local data, split once into a training part and a held-out part.

The held-out part (``training.holdout_fraction`` of the examples, never trained on) measures how
well each new *global* model does on this device's data; that accuracy is reported as
``local_accuracy`` in the device state. The split is a deterministic permutation seeded by the
device id, so it is the same after every restart. numpy only.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from device_agent.config import DataConfig, DataKind
from edgefl.data.sources import (
    CsvSource,
    DataSource,
    DataSourceError,
    EntryPointSource,
    NpzSource,
    validate_xy,
)

__all__ = ["LocalDataset", "data_source", "load_local_dataset"]


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """Training and held-out examples. ``x_*`` float32 ``(N, ...)``, ``y_*`` int64 ``(N,)``;
    the held-out part may be empty."""

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("x and y lengths differ")
        if len(self.y_train) == 0:
            raise ValueError("no training examples")

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    @classmethod
    def split(
        cls, x: NDArray[np.float32], y: NDArray[np.int64], holdout_fraction: float, *, seed: int
    ) -> LocalDataset:
        """Hold out ``floor(holdout_fraction * N)`` examples (keeping at least one to train on)
        chosen by a permutation seeded with ``seed``."""
        n = len(y)
        n_test = min(int(holdout_fraction * n), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        test, train = order[:n_test], order[n_test:]
        return cls(x[train], y[train], x[test], y[test])


@dataclass(frozen=True)
class EntryPointWithPath:
    """``module:function`` called as ``function(path)`` (``data.path`` set with an entry point).
    Must return ``(x, y)``; errors are ``DataSourceError`` naming the entry point."""

    spec: str
    path: Path

    def load(self) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        origin = f"entry point {self.spec!r}"
        module_name, _, attr_path = self.spec.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr_path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise DataSourceError(f"{origin}: cannot resolve: {exc}") from None
        try:
            result = obj(str(self.path))
        except Exception as exc:
            raise DataSourceError(f"{origin}: raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, tuple) or len(result) != 2:
            raise DataSourceError(f"{origin}: must return a tuple (x, y)")
        return validate_xy(result[0], result[1], origin=origin)


def data_source(config: DataConfig) -> DataSource:
    """The ``edgefl.data`` source described by the ``[data]`` config section (an entry point
    gets ``data.path`` as its only argument when that is set)."""
    if config.kind is DataKind.NPZ:
        assert config.path is not None
        return NpzSource(config.path, x_key=config.x_key, y_key=config.y_key)
    if config.kind is DataKind.CSV:
        assert config.path is not None
        return CsvSource(config.path, label_column=config.label_column)
    assert config.entrypoint is not None
    if config.path is not None:
        return EntryPointWithPath(config.entrypoint, config.path)
    return EntryPointSource(config.entrypoint)


def device_seed(device_id: str) -> int:
    """A stable 32-bit seed derived from the device id."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big")


def load_local_dataset(config: DataConfig, holdout_fraction: float, device_id: str) -> LocalDataset:
    """Load the configured data (raises ``edgefl.data.sources.DataSourceError``) and split it."""
    x, y = data_source(config).load()
    x, y = validate_xy(x, y, origin=f"[data] {config.kind.value}")
    return LocalDataset.split(x, y, holdout_fraction, seed=device_seed(device_id))
