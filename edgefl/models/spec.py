"""Torch-free model registry: names, input shapes and the flat-vector layout of every model.

A model travels through edgefl as one flat ``float32`` vector. Its :class:`ModelSpec` says how
that vector is cut into named tensors (the *layout*): tensor ``i`` occupies
``flat[offset_i : offset_i + numel_i]`` in C order, tensors in layout order, no padding. The
layout names and shapes are exactly the keys and shapes of the torch ``state_dict`` of the module
that :func:`edgefl.models.torch_models.build_module` builds (a unit test checks this), but they are
hard-coded here so the aggregator, the codec and the monitor can validate updates without
importing torch.

Registry:

- ``mnist1d-cnn``: input ``(1, 40)``, Conv1d(1→16, k5, p2) → Conv1d(16→16, k5, p2, s2) →
  Conv1d(16→16, k5, p2, s2), ReLU after each, flatten, Linear(160→10). 4,298 parameters.
- ``digits-mlp``: input ``(64,)`` (scikit-learn digits, 8x8 scaled to [0, 1]),
  Linear(64→32) → ReLU → Linear(32→10). 2,410 parameters.
- ``mlp-<N>``: benchmark MLP on mnist1d input ``(1, 40)`` with two hidden layers of width ``h``,
  Linear(40→h) → ReLU → Linear(h→h) → ReLU → Linear(h→10), ``h`` chosen so that
  ``num_params = h² + 52h + 10`` is as close to ``N`` as possible. ``N`` is an integer with an
  optional ``k`` (10³) or ``m`` (10⁶) suffix, e.g. ``mlp-100k``, ``mlp-1m``, ``mlp-2.5m``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "SUPPORTED_DTYPES",
    "ModelSpec",
    "TensorSpec",
    "get_model_spec",
    "init_weights_numpy",
    "list_models",
    "mlp_hidden_width",
    "mlp_layout",
    "suggested_dataset",
]

SUPPORTED_DTYPES: frozenset[str] = frozenset({"float32"})
"""Tensor dtypes a layout may declare. The flat vector is float32, so only float32 for now."""

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_MLP_RE = re.compile(r"^mlp-(\d+(?:\.\d+)?)([km]?)$")
_MLP_MIN_PARAMS = 63  # h = 1
_MLP_MAX_PARAMS = 200_000_000  # 800 MB of float32; larger is a typo, not a benchmark
_MLP_INPUT = 40  # mnist1d signal length
_NUM_CLASSES = 10


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a layout: ``name`` (a state-dict key), ``shape`` and ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad tensor name {self.name!r}")
        shape = tuple(self.shape)
        if any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape):
            raise ValueError(f"tensor {self.name!r}: shape {self.shape!r} needs positive ints")
        object.__setattr__(self, "shape", shape)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")

    @property
    def numel(self) -> int:
        """Number of elements (``prod(shape)``; 1 for a scalar)."""
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"name": str, "shape": [int, ...], "dtype": str}``."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on anything malformed."""
        try:
            name = d["name"]
            shape = d["shape"]
            dtype = d.get("dtype", "float32")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"bad tensor spec {d!r}") from exc
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise ValueError(f"bad tensor spec {d!r}")
        if not isinstance(shape, Sequence) or isinstance(shape, str):
            raise ValueError(f"bad tensor shape in {d!r}")
        return cls(name=name, shape=tuple(shape), dtype=dtype)


@dataclass(frozen=True)
class ModelSpec:
    """A model as the fleet sees it: name, input shape (without batch), classes, flat layout.

    Equality is structural. ``layout_hash`` identifies the layout only (not the name), so two
    specs with the same hash accept each other's updates.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    layout: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "layout", tuple(self.layout))
        if any(not isinstance(d, int) or d <= 0 for d in self.input_shape):
            raise ValueError(f"model {self.name!r}: bad input shape {self.input_shape!r}")
        if self.num_classes < 2:
            raise ValueError(f"model {self.name!r}: num_classes must be >= 2")
        if not self.layout:
            raise ValueError(f"model {self.name!r}: empty layout")
        names = [t.name for t in self.layout]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name!r}: duplicate tensor names in layout")

    @cached_property
    def num_params(self) -> int:
        """Length of the flat vector: the sum of ``numel`` over the layout (computed once)."""
        return sum(t.numel for t in self.layout)

    @property
    def layout_hash(self) -> str:
        """Hex sha256 of the canonical layout text.

        The text is one line per tensor in layout order, ``"<name>|<dtype>|<d0>,<d1>,..."``,
        lines joined with ``"\\n"``, UTF-8 encoded. Stable across processes and versions.
        """
        return _layout_hash(self.layout)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` of each tensor inside the flat vector."""
        out: dict[str, tuple[int, int]] = {}
        pos = 0
        for t in self.layout:
            out[t.name] = (pos, pos + t.numel)
            pos += t.numel
        return out

    def unflatten(self, flat: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """Split a flat vector into named arrays. The arrays are reshaped *views* of ``flat``."""
        flat = self.check_flat(flat)
        return {
            t.name: flat[a:b].reshape(t.shape)
            for t, (a, b) in zip(self.layout, self.offsets().values(), strict=True)
        }

    def flatten(self, arrays: Mapping[str, NDArray[Any]]) -> NDArray[np.float32]:
        """Concatenate named arrays in layout order into a new float32 vector (a copy)."""
        missing = [t.name for t in self.layout if t.name not in arrays]
        extra = sorted(set(arrays) - {t.name for t in self.layout})
        if missing or extra:
            raise ValueError(f"model {self.name!r}: missing tensors {missing}, unexpected {extra}")
        parts = []
        for t in self.layout:
            a = np.asarray(arrays[t.name])
            if a.shape != t.shape:
                raise ValueError(f"tensor {t.name!r}: shape {a.shape} != layout {t.shape}")
            parts.append(a.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def check_flat(self, flat: NDArray[Any]) -> NDArray[np.float32]:
        """Return ``flat`` as a 1-D float32 array of length ``num_params`` or raise ValueError."""
        arr = np.asarray(flat)
        if arr.ndim != 1 or arr.shape[0] != self.num_params:
            raise ValueError(
                f"model {self.name!r}: flat vector has shape {arr.shape}, "
                f"expected ({self.num_params},)"
            )
        if arr.dtype != np.float32:
            raise ValueError(f"model {self.name!r}: flat vector dtype {arr.dtype}, need float32")
        return arr

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for manifests); includes ``layout_hash`` and ``num_params``."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "layout": [t.to_dict() for t in self.layout],
            "num_params": self.num_params,
            "layout_hash": self.layout_hash,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`. Checks ``layout_hash``/``num_params`` when present."""
        try:
            spec = cls(
                name=str(d["name"]),
                input_shape=tuple(int(x) for x in d["input_shape"]),
                num_classes=int(d["num_classes"]),
                layout=tuple(TensorSpec.from_dict(t) for t in d["layout"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad model spec: {exc}") from exc
        if "layout_hash" in d and d["layout_hash"] != spec.layout_hash:
            raise ValueError(f"model {spec.name!r}: layout_hash does not match the layout")
        if "num_params" in d and d["num_params"] != spec.num_params:
            raise ValueError(f"model {spec.name!r}: num_params does not match the layout")
        return spec


def _layout_hash(layout: tuple[TensorSpec, ...]) -> str:
    text = "\n".join(f"{t.name}|{t.dtype}|{','.join(str(d) for d in t.shape)}" for t in layout)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _linear(name: str, n_in: int, n_out: int) -> tuple[TensorSpec, TensorSpec]:
    return TensorSpec(f"{name}.weight", (n_out, n_in)), TensorSpec(f"{name}.bias", (n_out,))


def _conv1d(name: str, c_in: int, c_out: int, k: int) -> tuple[TensorSpec, TensorSpec]:
    return TensorSpec(f"{name}.weight", (c_out, c_in, k)), TensorSpec(f"{name}.bias", (c_out,))


def mlp_layout(n_in: int, hidden: Sequence[int], n_out: int) -> tuple[TensorSpec, ...]:
    """Layout of an MLP ``n_in → hidden[0] → ... → n_out``: ``fc1.weight, fc1.bias, fc2...``."""
    widths = [n_in, *hidden, n_out]
    out: list[TensorSpec] = []
    for i in range(len(widths) - 1):
        out.extend(_linear(f"fc{i + 1}", widths[i], widths[i + 1]))
    return tuple(out)


def _mnist1d_cnn() -> ModelSpec:
    layout = (
        *_conv1d("conv1", 1, 16, 5),
        *_conv1d("conv2", 16, 16, 5),
        *_conv1d("conv3", 16, 16, 5),
        *_linear("fc", 160, _NUM_CLASSES),
    )
    return ModelSpec("mnist1d-cnn", (1, 40), _NUM_CLASSES, layout)


def _digits_mlp() -> ModelSpec:
    return ModelSpec("digits-mlp", (64,), _NUM_CLASSES, mlp_layout(64, (32,), _NUM_CLASSES))


def _mlp_params(h: int) -> int:
    return (_MLP_INPUT + 1) * h + (h + 1) * h + (h + 1) * _NUM_CLASSES


def mlp_hidden_width(target_params: int) -> int:
    """Hidden width ``h ≥ 1`` of ``mlp-<N>`` minimising ``|h² + 52h + 10 − N|``.

    Ties go to the smaller ``h``.
    """
    if target_params < _MLP_MIN_PARAMS:
        raise ValueError(f"mlp needs at least {_MLP_MIN_PARAMS} parameters, got {target_params}")
    # positive root of h² + 52h + (10 − N) = 0, then check the integer neighbours
    root = (-52 + math.sqrt(52 * 52 - 4 * (10 - target_params))) / 2
    candidates = {max(1, math.floor(root) + d) for d in (-1, 0, 1, 2)}
    return min(candidates, key=lambda h: (abs(_mlp_params(h) - target_params), h))


def _parse_mlp(name: str) -> ModelSpec | None:
    m = _MLP_RE.match(name.lower())
    if m is None:
        return None
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2)]
    target = round(float(m.group(1)) * scale)
    if not _MLP_MIN_PARAMS <= target <= _MLP_MAX_PARAMS:
        raise ValueError(
            f"model {name!r}: size must be within [{_MLP_MIN_PARAMS}, {_MLP_MAX_PARAMS}] params"
        )
    h = mlp_hidden_width(target)
    return ModelSpec(name.lower(), (1, _MLP_INPUT), _NUM_CLASSES, mlp_layout(40, (h, h), 10))


_FIXED: dict[str, ModelSpec] = {s.name: s for s in (_mnist1d_cnn(), _digits_mlp())}
_PRESETS: tuple[str, ...] = ("mlp-100k", "mlp-1m")
_DATASETS: dict[str, str] = {"mnist1d-cnn": "mnist1d", "digits-mlp": "digits"}


@cache
def get_model_spec(name: str) -> ModelSpec:
    """Look a model up by name (``mnist1d-cnn``, ``digits-mlp``, ``mlp-<N>``).

    Raises ``KeyError`` naming the known models for an unknown name, ``ValueError`` for an
    ``mlp-<N>`` whose size is out of range.
    """
    if name in _FIXED:
        return _FIXED[name]
    spec = _parse_mlp(name)
    if spec is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}, mlp-<N>")
    return spec


def list_models() -> tuple[str, ...]:
    """Names of the registered models plus the ``mlp-<N>`` presets (any N works)."""
    return (*sorted(_FIXED), *_PRESETS)


def suggested_dataset(spec: ModelSpec | str) -> str:
    """Name of the shipped dataset a model is meant for (``"digits"`` or ``"mnist1d"``)."""
    name = spec.name if isinstance(spec, ModelSpec) else spec
    return _DATASETS.get(name, "mnist1d")


def init_weights_numpy(spec: ModelSpec, seed: int) -> NDArray[np.float32]:
    """Torch-free initial weights with torch's default distribution (not torch's numbers).

    Every ``*.weight`` of shape ``(out, *rest)`` and its ``*.bias`` are drawn from
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = prod(rest)``, which is what torch's
    default ``kaiming_uniform_(a=sqrt(5))`` init of Linear/Conv layers amounts to. Lets a process
    without torch (the aggregator) create version 0 of a model.
    """
    rng = np.random.default_rng(seed)
    fan_in: dict[str, int] = {}
    for t in spec.layout:
        if t.name.endswith(".weight"):
            fan_in[t.name.removesuffix(".weight")] = max(1, math.prod(t.shape[1:]))
    parts: list[NDArray[np.float32]] = []
    for t in spec.layout:
        prefix = t.name.rsplit(".", 1)[0]
        bound = 1.0 / math.sqrt(fan_in.get(prefix, max(1, math.prod(t.shape[1:]))))
        parts.append(rng.uniform(-bound, bound, size=t.numel).astype(np.float32))
    return np.concatenate(parts)
