"""Local inference with the model the agent holds (onnxruntime; no torch).

The agent keeps the ONNX export the aggregator published next to the weights in
``<state_dir>/model`` (see :mod:`device_agent.model_store`). :class:`LocalModel` loads the current
version, re-verifies it against its manifest and runs it with onnxruntime's CPU provider. There
is no fallback: when the aggregator publishes no ONNX graph (its manifest has no ``onnx``
artifact), :class:`NoOnnxModel` says so and names the version, instead of guessing.

Inputs: ``.npy`` (``(N, *features)`` or one sample) or ``.csv`` (one sample per row, numeric
columns only, optional header row). The features are reshaped to the model's input shape when the
per-sample size matches.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from device_agent.model_store import ModelStore

__all__ = ["LocalModel", "NoModel", "NoOnnxModel", "Prediction", "load_input", "predict"]


class NoModel(RuntimeError):
    """The agent has not received a model yet."""


class NoOnnxModel(RuntimeError):
    """The current model version has no ONNX export (the aggregator did not publish one)."""


@dataclass(frozen=True, eq=False)
class Prediction:
    """``labels`` ``(N,)`` int64 and ``probabilities`` ``(N, num_classes)`` float32."""

    model_version: int
    labels: NDArray[np.int64]
    probabilities: NDArray[np.float32]


class LocalModel:
    """The current model of a state directory, ready for inference."""

    def __init__(self, state_dir: Path, *, threads: int = 1) -> None:
        store = ModelStore(state_dir / "model", durable=False)
        model = store.load()
        if model is None:
            raise NoModel(
                f"no verified model in {state_dir / 'model'} (has the agent received one yet?)"
            )
        if model.onnx is None:
            raise NoOnnxModel(
                f"model v{model.version} ({model.model}) has no ONNX export: the aggregator "
                "published only the weights, so local inference is not available for it"
            )
        from edgefl.models.onnx_export import OnnxPredictor

        self.version = model.version
        self.model = model.model
        self._predictor = OnnxPredictor(model.onnx, threads=threads)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._predictor.input_shape

    def logits(self, x: NDArray[Any]) -> NDArray[np.float32]:
        return self._predictor.logits(self._fit(x))

    def predict(self, x: NDArray[Any]) -> Prediction:
        proba = self._predictor.predict_proba(self._fit(x))
        labels: NDArray[np.int64] = proba.argmax(axis=-1).astype(np.int64)
        return Prediction(self.version, labels, proba)

    def _fit(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """One sample (``input_shape`` or flat) becomes a batch of one; ``(N, ...)`` with the
        right per-sample size is reshaped to ``(N, *input_shape)``."""
        arr = np.asarray(x, dtype=np.float32)
        per_sample = int(np.prod(self.input_shape))
        if arr.shape == self.input_shape or (arr.ndim == 1 and arr.size == per_sample):
            return arr.reshape((1, *self.input_shape))
        if arr.ndim >= 2 and arr.shape[0] > 0 and int(np.prod(arr.shape[1:])) == per_sample:
            return arr.reshape((arr.shape[0], *self.input_shape))
        raise ValueError(
            f"input of shape {arr.shape} does not fit the model input {self.input_shape}"
        )


def load_input(path: Path) -> NDArray[np.float32]:
    """Read ``.npy`` or ``.csv`` samples (see the module docstring); ValueError otherwise."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if rows and not _numeric(rows[0]):
            rows = rows[1:]
        try:
            arr = np.array([[float(v) for v in row] for row in rows], dtype=np.float32)
        except ValueError as exc:
            raise ValueError(f"{path}: non-numeric cell: {exc}") from None
    else:
        raise ValueError(f"{path}: expected a .npy or .csv file")
    if arr.size == 0:
        raise ValueError(f"{path}: no samples")
    out = np.asarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{path}: NaN or Inf in the input")
    return out


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def predict(state_dir: Path, x: NDArray[Any], *, threads: int = 1) -> Prediction:
    """One-shot: load the current model of ``state_dir`` and classify ``x``."""
    return LocalModel(state_dir, threads=threads).predict(x)
