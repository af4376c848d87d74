"""Datasets that ship inside installed packages: nothing is downloaded, ever.

- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 images), pixels scaled to [0, 1],
  input shape ``(64,)``, stratified train/test split driven by ``seed``.
- ``mnist1d``: generated offline by ``mnist1d.data.make_dataset`` (default 20,000 samples →
  16,000 train / 4,000 test), input shape ``(1, 40)``. ``seed`` is the generator's seed, so
  different seeds are different datasets. Generation takes ~0.35 ms per sample, so the arrays
  are cached as ``.npz`` in the user cache dir (``$EDGEFL_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/edgefl``, else ``~/.cache/edgefl``), keyed by the generator arguments and
  the mnist1d version. Writers go through a temp file + ``os.replace``, so concurrent processes
  never see a partial file; a corrupt cache entry is regenerated.

Arrays: ``x`` float32, ``y`` int64 in ``[0, num_classes)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["Dataset", "DatasetName", "default_cache_dir", "load_dataset"]

log = logging.getLogger(__name__)

MNIST1D_DEFAULT_SAMPLES = 20_000
_CACHE_FORMAT = 1


class DatasetName(StrEnum):
    """The shipped datasets."""

    DIGITS = "digits"
    MNIST1D = "mnist1d"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train/test split. Treat the arrays as read-only (they may be shared)."""

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.shape[1:] != self.input_shape:
                raise ValueError(f"{self.name} {split}: x shape {x.shape} vs {self.input_shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{self.name} {split}: y shape {y.shape} vs {x.shape[0]} rows")

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


def default_cache_dir() -> Path:
    """``$EDGEFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgefl``, else ``~/.cache/edgefl``."""
    explicit = os.environ.get("EDGEFL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "edgefl"


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    num_samples: int | None = None,
    test_fraction: float = 0.2,
    cache: bool = True,
    cache_dir: Path | None = None,
) -> Dataset:
    """Load a shipped dataset.

    ``num_samples`` limits the total size (train + test): for digits a stratified subsample of the
    1,797 images, for mnist1d the number generated (rounded down to a multiple of 10, the
    generator draws ``num_samples // 10`` per class; default 20,000). ``test_fraction`` is the
    test share (mnist1d uses its generator's ordered split). ``cache``/``cache_dir`` only concern
    mnist1d. Raises ``KeyError`` for an unknown name, ``ValueError`` for bad sizes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        kind = DatasetName(name)
    except ValueError:
        known = ", ".join(d.value for d in DatasetName)
        raise KeyError(f"unknown dataset {name!r}; known: {known}") from None
    if kind is DatasetName.DIGITS:
        return _load_digits(seed, num_samples, test_fraction)
    return _load_mnist1d(seed, num_samples, test_fraction, cache, cache_dir)


def _load_digits(seed: int, num_samples: int | None, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    if num_samples is not None:
        if not 20 <= num_samples <= len(y):
            raise ValueError(f"digits: num_samples must be in [20, {len(y)}], got {num_samples}")
        if num_samples < len(y):
            x, _, y, _ = train_test_split(
                x, y, train_size=num_samples, stratify=y, random_state=seed
            )
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return Dataset(
        x_train=np.ascontiguousarray(x_tr, dtype=np.float32),
        y_train=np.ascontiguousarray(y_tr, dtype=np.int64),
        x_test=np.ascontiguousarray(x_te, dtype=np.float32),
        y_test=np.ascontiguousarray(y_te, dtype=np.int64),
        name=DatasetName.DIGITS.value,
        input_shape=(64,),
        num_classes=10,
        meta={"seed": seed, "num_samples": len(y)},
    )


# mnist1d's default generator arguments (mnist1d 0.0.x ``get_dataset_args``), spelled out so the
# cache key is computed without importing mnist1d (which imports matplotlib.pyplot) and so a change
# of upstream defaults cannot silently change our datasets.
_MNIST1D_ARGS: dict[str, Any] = {
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
}


def _mnist1d_args(seed: int, num_samples: int, train_split: float) -> dict[str, Any]:
    return {**_MNIST1D_ARGS, "num_samples": num_samples, "seed": seed, "train_split": train_split}


def _cache_key(args: dict[str, Any]) -> str:
    try:
        from importlib.metadata import version

        mnist1d_version = version("mnist1d")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        mnist1d_version = "unknown"
    blob = json.dumps({"args": args, "v": mnist1d_version, "fmt": _CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(path: Path) -> dict[str, NDArray[Any]] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in _ARRAY_KEYS}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("ignoring unreadable mnist1d cache %s: %s", path, exc)
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, NDArray[Any]]) -> None:
    """Atomically write ``arrays`` to ``path`` (temp file in the same dir, fsync, os.replace)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        log.warning("mnist1d cache dir %s not writable: %s", path.parent, exc)
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write mnist1d cache %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _generate_mnist1d(args: dict[str, Any]) -> dict[str, NDArray[Any]]:
    """Run mnist1d's generator, restoring the global ``random``/``np.random`` state it reseeds."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    length = int(args["final_seq_length"])
    return {
        "x_train": np.asarray(data["x"], dtype=np.float32).reshape(-1, 1, length),
        "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32).reshape(-1, 1, length),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _load_mnist1d(
    seed: int,
    num_samples: int | None,
    test_fraction: float,
    cache: bool,
    cache_dir: Path | None,
) -> Dataset:
    n = MNIST1D_DEFAULT_SAMPLES if num_samples is None else num_samples
    if n < 20:
        raise ValueError(f"mnist1d: num_samples must be >= 20, got {n}")
    args = _mnist1d_args(seed, n, 1.0 - test_fraction)
    path = (cache_dir or default_cache_dir()) / f"mnist1d-{_cache_key(args)}.npz"
    arrays = _read_cache(path) if cache else None
    if arrays is None:
        arrays = _generate_mnist1d(args)
        if cache:
            _write_cache(path, arrays)
    length = int(args["final_seq_length"])
    return Dataset(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        name=DatasetName.MNIST1D.value,
        input_shape=(1, length),
        num_classes=10,
        meta={"seed": seed, "num_samples": n, "cache_path": str(path) if cache else None},
    )
