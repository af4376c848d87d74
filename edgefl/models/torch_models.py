"""Torch builders for the models of :mod:`edgefl.models.spec`, and flat vector <-> torch.

This module imports torch; the rest of :mod:`edgefl.models` does not. Conventions:

- The flat vector is 1-D ``float32`` of length ``spec.num_params``, tensors in layout order
  (which equals the order of ``module.named_parameters()`` and of ``module.state_dict()``; the
  models have no buffers).
- Every conversion *copies*. ``torch.nn.utils.vector_to_parameters`` makes the parameters views of
  the vector it is given, so training in place would silently modify the "base" vector and every
  delta would come out zero; nothing here aliases caller memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from edgefl.models.spec import ModelSpec
from edgefl.perthread import PerThread

__all__ = [
    "MLP",
    "Mnist1dCnn",
    "build_module",
    "flat_to_state_dict",
    "init_weights",
    "load_flat",
    "module_to_flat",
    "state_dict_to_flat",
    "template_module",
]


class Mnist1dCnn(nn.Module):
    """Conv1d(1→16,k5,p2) → Conv1d(16→16,k5,p2,s2) → Conv1d(16→16,k5,p2,s2), ReLU each,
    flatten, Linear(160→10). Input ``(B, 1, 40)``, output logits ``(B, 10)``."""

    def __init__(self, channels: int = 16, length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 5, padding=2, stride=2)
        self.conv3 = nn.Conv1d(channels, channels, 5, padding=2, stride=2)
        out_len = ((length + 1) // 2 + 1) // 2
        self.fc = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        out: Tensor = self.fc(h.flatten(1))
        return out


class MLP(nn.Module):
    """Flatten, then ``fc1 → ReLU → fc2 → ... → fcL`` (no activation after the last layer)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError("an MLP needs at least input and output widths")
        self._names = tuple(f"fc{i + 1}" for i in range(len(widths) - 1))
        for name, n_in, n_out in zip(self._names, widths[:-1], widths[1:], strict=True):
            setattr(self, name, nn.Linear(n_in, n_out))

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        last = len(self._names) - 1
        for i, name in enumerate(self._names):
            h = getattr(self, name)(h)
            if i < last:
                h = torch.relu(h)
        return h


def _mlp_widths(spec: ModelSpec) -> tuple[int, ...] | None:
    """Widths of an MLP layout (``fc1.weight, fc1.bias, fc2...``), or None if it is not one."""
    layout = spec.layout
    if len(layout) % 2:
        return None
    widths: list[int] = []
    for i in range(len(layout) // 2):
        w, b = layout[2 * i], layout[2 * i + 1]
        if w.name != f"fc{i + 1}.weight" or b.name != f"fc{i + 1}.bias" or len(w.shape) != 2:
            return None
        if b.shape != (w.shape[0],) or (widths and widths[-1] != w.shape[1]):
            return None
        if not widths:
            widths.append(w.shape[1])
        widths.append(w.shape[0])
    return tuple(widths)


def _check_module(spec: ModelSpec, module: nn.Module) -> None:
    got = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    want = [(t.name, t.shape) for t in spec.layout]
    if got != want:
        raise ValueError(f"model {spec.name!r}: torch state_dict {got} != spec layout {want}")


def build_module(spec: ModelSpec) -> nn.Module:
    """A freshly initialised torch module for ``spec`` (torch's default init, global RNG).

    ``mnist1d-cnn`` builds :class:`Mnist1dCnn`; any layout of the form ``fc1.weight, fc1.bias,
    ...`` (``digits-mlp``, ``mlp-<N>``) builds :class:`MLP`. Raises ``ValueError`` when the module's
    state_dict does not match ``spec.layout`` exactly (names, shapes, order).
    """
    module: nn.Module
    if spec.name == "mnist1d-cnn":
        module = Mnist1dCnn(length=spec.input_shape[-1], num_classes=spec.num_classes)
    else:
        widths = _mlp_widths(spec)
        if widths is None:
            raise ValueError(f"no torch builder for model {spec.name!r}")
        if widths[0] != int(np.prod(spec.input_shape)) or widths[-1] != spec.num_classes:
            raise ValueError(f"model {spec.name!r}: MLP widths {widths} do not fit its spec")
        module = MLP(widths)
    _check_module(spec, module)
    return module


def _template(spec: ModelSpec) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        module = build_module(spec).eval()
    module.requires_grad_(False)
    return module


_templates: PerThread[ModelSpec, nn.Module] = PerThread(_template, limit=32)


def template_module(spec: ModelSpec) -> nn.Module:
    """A cached module of ``spec`` for ``torch.func.functional_call``, one per thread.

    ``functional_call`` swaps the module's parameters in and out while it runs, so a template is
    never shared between threads. Its own parameters are meaningless placeholders: callers must
    pass parameters explicitly and must not load weights into it.
    """
    return _templates.get(spec)


def init_weights(spec: ModelSpec, seed: int) -> NDArray[np.float32]:
    """Flat float32 vector of torch's default initialisation of ``spec`` for ``seed``.

    Deterministic for a seed and leaves torch's global RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_module(spec)
    return module_to_flat(module)


def module_to_flat(module: nn.Module) -> NDArray[np.float32]:
    """A new flat float32 vector of the module's parameters (never aliases the module)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    out: NDArray[np.float32] = flat.numpy().copy()
    return out


def state_dict_to_flat(spec: ModelSpec, state_dict: Mapping[str, Tensor]) -> NDArray[np.float32]:
    """Concatenate a state dict in layout order into a new flat vector.

    Raises ``ValueError`` naming missing/unexpected keys or a shape that differs from the layout.
    """
    arrays: dict[str, Any] = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    return spec.flatten(arrays)


def flat_to_state_dict(spec: ModelSpec, flat: NDArray[np.float32]) -> dict[str, Tensor]:
    """Split a flat vector into a state dict of new tensors (copies, independent of ``flat``)."""
    src = torch.from_numpy(np.array(spec.check_flat(flat), dtype=np.float32, copy=True))
    out: dict[str, Tensor] = {}
    for t, (a, b) in zip(spec.layout, spec.offsets().values(), strict=True):
        out[t.name] = src[a:b].view(t.shape).clone()
    return out


def load_flat(module: nn.Module, flat: NDArray[np.float32]) -> None:
    """Copy ``flat`` into the module's parameters in ``named_parameters()`` order.

    The module keeps its own storage: mutating ``flat`` afterwards does not change the module and
    training the module does not change ``flat``. Raises ``ValueError`` on a length mismatch.
    """
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    arr = np.asarray(flat)
    if arr.ndim != 1 or arr.shape[0] != total:
        raise ValueError(f"flat vector has shape {arr.shape}, module has {total} parameters")
    src = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    pos = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(src[pos : pos + n].view_as(p))
            pos += n
