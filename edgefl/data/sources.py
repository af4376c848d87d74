"""Where a real device reads its own local training data (it never leaves the device).

A :class:`DataSource` has one method, ``load() -> (x, y)``, returning ``x`` float32 of shape
``(N, *features)`` and ``y`` int64 of shape ``(N,)`` with ``N >= 1``, finite ``x`` and
non-negative ``y``. Every failure is a :class:`DataSourceError` whose message names the source
and the problem (missing file, missing key, bad cell, wrong return type, ...).
"""

from __future__ import annotations

import csv
import importlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from edgefl.models.spec import ModelSpec

__all__ = [
    "CsvSource",
    "DataSource",
    "DataSourceError",
    "EntryPointSource",
    "NpzSource",
    "fit_to_spec",
    "source_from_string",
    "validate_xy",
]

XY = tuple[NDArray[np.float32], NDArray[np.int64]]


class DataSourceError(ValueError):
    """A device data source that cannot be read or does not hold valid (x, y) data."""


@runtime_checkable
class DataSource(Protocol):
    """Anything with ``load() -> (x float32 (N, ...), y int64 (N,))``."""

    def load(self) -> XY: ...


def validate_xy(x: Any, y: Any, *, origin: str) -> XY:
    """Check and convert ``(x, y)``; raise :class:`DataSourceError` naming ``origin``."""
    try:
        xa = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"{origin}: x is not numeric: {exc}") from None
    ya = np.asarray(y)
    if xa.ndim < 2:
        raise DataSourceError(f"{origin}: x must have shape (N, features...), got {xa.shape}")
    if ya.ndim != 1:
        raise DataSourceError(f"{origin}: y must be 1-D, got shape {ya.shape}")
    if xa.shape[0] != ya.shape[0]:
        raise DataSourceError(f"{origin}: x has {xa.shape[0]} rows but y has {ya.shape[0]}")
    if xa.shape[0] == 0:
        raise DataSourceError(f"{origin}: no samples")
    if not np.all(np.isfinite(xa)):
        raise DataSourceError(f"{origin}: x contains NaN or Inf")
    if not (np.issubdtype(ya.dtype, np.integer) or np.issubdtype(ya.dtype, np.floating)):
        raise DataSourceError(f"{origin}: y must be integer class labels, got dtype {ya.dtype}")
    if np.issubdtype(ya.dtype, np.floating) and not np.all(np.isfinite(ya) & (ya == np.round(ya))):
        raise DataSourceError(f"{origin}: y has non-integer labels")
    yi = ya.astype(np.int64)
    if yi.min() < 0:
        raise DataSourceError(f"{origin}: y has negative labels")
    return np.ascontiguousarray(xa), np.ascontiguousarray(yi)


def fit_to_spec(x: NDArray[np.float32], y: NDArray[np.int64], spec: ModelSpec) -> XY:
    """Reshape ``x`` to ``(N, *spec.input_shape)`` when the per-sample size matches, and check the
    labels are ``< spec.num_classes``; raise :class:`DataSourceError` otherwise."""
    per_sample = int(np.prod(spec.input_shape))
    if int(np.prod(x.shape[1:])) != per_sample:
        raise DataSourceError(
            f"data has per-sample shape {x.shape[1:]} but model {spec.name!r} "
            f"expects {spec.input_shape}"
        )
    if y.size and int(y.max()) >= spec.num_classes:
        raise DataSourceError(
            f"label {int(y.max())} out of range for model {spec.name!r} "
            f"with {spec.num_classes} classes"
        )
    return x.reshape((x.shape[0], *spec.input_shape)), y


@dataclass(frozen=True)
class NpzSource:
    """A ``.npz`` file holding ``x_key`` (features, ``(N, ...)``) and ``y_key`` (labels)."""

    path: Path | str
    x_key: str = "x"
    y_key: str = "y"

    def load(self) -> XY:
        origin = f"npz source {str(self.path)!r}"
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                keys = list(npz.files)
                missing = [k for k in (self.x_key, self.y_key) if k not in keys]
                if missing:
                    raise DataSourceError(f"{origin}: missing array(s) {missing}; has {keys}")
                x, y = npz[self.x_key], npz[self.y_key]
        except FileNotFoundError:
            raise DataSourceError(f"{origin}: file not found") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            if isinstance(exc, DataSourceError):
                raise
            raise DataSourceError(f"{origin}: not a readable .npz file: {exc}") from None
        return validate_xy(x, y, origin=origin)


@dataclass(frozen=True)
class CsvSource:
    """A CSV file: one sample per row, the label in ``label_column`` (a header name, or a
    0-based column index), every other column a numeric feature. ``shape`` optionally reshapes
    each row's features (e.g. ``(1, 40)``)."""

    path: Path | str
    label_column: str | int = "label"
    delimiter: str = ","
    has_header: bool = True
    shape: tuple[int, ...] | None = None

    def load(self) -> XY:
        origin = f"csv source {str(self.path)!r}"
        header, rows, first_data_line = self._read(origin)
        label_idx = self._label_index(header, origin)
        rows = [r for r in rows if r and any(c.strip() for c in r)]
        if not rows:
            raise DataSourceError(f"{origin}: no data rows")
        width = len(rows[0])
        if not 0 <= label_idx < width:
            raise DataSourceError(f"{origin}: label column {label_idx} outside {width} columns")
        x, y = _numeric_rows(rows, header, label_idx, first_data_line, origin)
        if self.shape is not None:
            if int(np.prod(self.shape)) != x.shape[1]:
                raise DataSourceError(
                    f"{origin}: {x.shape[1]} feature columns cannot be reshaped to {self.shape}"
                )
            x = x.reshape((x.shape[0], *self.shape))
        return validate_xy(x, y, origin=origin)

    def _read(self, origin: str) -> tuple[list[str], list[list[str]], int]:
        """``(header, rows, line number of the first row)``; header ``[]`` without one."""
        try:
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh, delimiter=self.delimiter))
        except FileNotFoundError:
            raise DataSourceError(f"{origin}: file not found") from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataSourceError(f"{origin}: cannot read: {exc}") from None
        if not self.has_header:
            return [], rows, 1
        if not rows:
            raise DataSourceError(f"{origin}: empty file (no header)")
        return rows[0], rows[1:], 2

    def _label_index(self, header: list[str], origin: str) -> int:
        if not isinstance(self.label_column, str):
            return self.label_column
        if not self.has_header:
            raise DataSourceError(f"{origin}: a named label column needs has_header=True")
        if self.label_column not in header:
            raise DataSourceError(
                f"{origin}: no label column {self.label_column!r}; columns are {header}"
            )
        return header.index(self.label_column)


def _numeric_rows(
    rows: list[list[str]], header: list[str], label_idx: int, first_line: int, origin: str
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Features (float32, label column removed) and labels of equally wide numeric rows;
    errors name the file line and the column."""
    width = len(rows[0])
    x = np.empty((len(rows), width - 1), dtype=np.float32)
    y = np.empty(len(rows), dtype=np.float64)
    for i, row in enumerate(rows):
        line = i + first_line
        if len(row) != width:
            raise DataSourceError(f"{origin}: line {line} has {len(row)} columns, not {width}")
        try:
            values = [float(c) for c in row]
        except ValueError:
            bad = next(j for j, c in enumerate(row) if not _is_float(c))
            name = header[bad] if bad < len(header) else str(bad)
            raise DataSourceError(
                f"{origin}: line {line}, column {name!r}: {row[bad]!r} is not a number"
            ) from None
        y[i] = values[label_idx]
        x[i] = values[:label_idx] + values[label_idx + 1 :]
    return x, y


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class EntryPointSource:
    """``"package.module:function"`` (attribute paths like ``mod:obj.method`` work too): the
    callable is imported and called with no arguments and must return ``(x, y)``."""

    spec: str

    def _resolve(self) -> Callable[[], Any]:
        origin = f"entry point {self.spec!r}"
        module_name, sep, attr_path = self.spec.partition(":")
        if not sep or not module_name or not attr_path:
            raise DataSourceError(f"{origin}: expected 'module:function'")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise DataSourceError(
                f"{origin}: cannot import module {module_name!r}: {exc}"
            ) from None
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise DataSourceError(
                    f"{origin}: {module_name!r} has no attribute {attr_path!r}"
                ) from None
        if not callable(obj):
            raise DataSourceError(f"{origin}: {attr_path!r} is not callable")
        fn: Callable[[], Any] = obj
        return fn

    def load(self) -> XY:
        origin = f"entry point {self.spec!r}"
        fn = self._resolve()
        try:
            result = fn()
        except Exception as exc:
            raise DataSourceError(f"{origin}: raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, tuple) or len(result) != 2:
            raise DataSourceError(
                f"{origin}: must return a tuple (x, y), got {type(result).__name__}"
            )
        return validate_xy(result[0], result[1], origin=origin)


def source_from_string(text: str) -> DataSource:
    """Parse a config string: ``npz:PATH``, ``csv:PATH`` (label column ``label``),
    ``entrypoint:module:function``, or a bare path ending in ``.npz``/``.csv``."""
    scheme, sep, rest = text.partition(":")
    if sep and scheme == "npz":
        return NpzSource(rest)
    if sep and scheme == "csv":
        return CsvSource(rest)
    if sep and scheme == "entrypoint":
        return EntryPointSource(rest)
    suffix = Path(text).suffix.lower()
    if suffix == ".npz":
        return NpzSource(text)
    if suffix == ".csv":
        return CsvSource(text)
    raise DataSourceError(
        f"cannot tell the kind of data source {text!r}; use npz:PATH, csv:PATH or "
        "entrypoint:module:function"
    )
