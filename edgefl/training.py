"""Local training on a flat weight vector: one device (:func:`train_local`) or many at once
(:func:`train_many`, for the simulator). Torch is imported inside the functions only.

Math (both paths, identically):

- Batches: for a device with ``n`` examples and ``seed``, ``rng = np.random.default_rng(seed)``;
  each epoch draws ``perm = rng.permutation(n)`` and walks it in slices of ``batch_size`` (the last
  one may be short); at most ``max_steps`` batches in total (:func:`batch_plan`).
- Loss of a batch: mean cross-entropy of its examples (``sum(ce) / count``).
- Optimizer on the flat vector ``w`` with gradient ``g`` (``wd`` = weight decay):
  SGD: ``g += wd·w``; with momentum ``m: buf = m·buf + g; g = buf``; ``w -= lr·g``
  (torch.optim.SGD without dampening/nesterov). Adam: torch.optim.Adam's update with
  ``betas = (0.9, 0.999)``, ``eps = 1e-8`` and bias correction.
- Result: ``delta = w_trained − w_base`` (float32), the sign used everywhere in edgefl.
  ``loss`` is the mean training loss over the examples processed (NaN if no step ran).

:func:`train_many` stacks the devices' parameters into one ``(D, P)`` tensor and runs the
hand-written stacked forward/backward of :mod:`edgefl.stacked_nets` (batched matrix products over
the device axis). Devices are sorted by number of steps, so at step ``t`` the still-active
devices are a prefix ``[:k_t]`` of the stack and finished devices cost nothing; every batch is
padded to ``batch_size`` rows and the padding masked. :func:`train_local` is the same kernel on a
stack of one, so a device's result is *bit-identical* whether it trains alone or stacked with any
other devices, on any number of threads (``tests/unit/test_training_batched.py``): the optimizer
uses only single-rounding elementwise ops and the kernels avoid every reduction whose order
depends on the stack (see :mod:`edgefl.stacked_nets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from edgefl.models.spec import ModelSpec

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "LocalResult",
    "LocalTrainConfig",
    "OptimizerKind",
    "batch_plan",
    "evaluate",
    "train_local",
    "train_many",
]

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_MEMORY_BUDGET = 256 * 1024 * 1024  # bytes per train_many chunk, a rough bound
# Measured on mnist1d-cnn (1 thread, 2-core box): per-device step cost is about flat from 10 to
# 32 stacked devices and higher below 8 (per-op overhead).
_MAX_STACK = 32
# Above this size stacking stops paying: per-device weights are used by one small batch only, so
# the step is memory-bound either way (mlp-5k: 3.7x, mlp-20k: 2x, mlp-100k: 1x the sequential
# rate on mnist1d with 100 examples per device). train_many then loops over train_local.
_BATCH_MAX_PARAMS = 50_000


class OptimizerKind(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True)
class LocalTrainConfig:
    """Hyper-parameters of local training. ``momentum`` applies to SGD only."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    max_steps: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    optimizer: OptimizerKind = OptimizerKind.SGD

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", OptimizerKind(self.optimizer))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")


@dataclass(frozen=True, eq=False)
class LocalResult:
    """Outcome of one device's local training.

    ``delta = trained − base`` (float32, flat); ``num_examples`` is the size of the local dataset
    (the FedAvg example weight); ``loss`` the mean training loss; ``steps`` the optimizer steps
    taken; ``stopped_early`` whether ``should_stop`` cut training short.
    """

    delta: NDArray[np.float32]
    num_examples: int
    loss: float
    steps: int
    stopped_early: bool


def iter_batches(n: int, config: LocalTrainConfig, seed: int) -> Iterator[NDArray[np.int64]]:
    """The index batches a device with ``n`` examples trains on, in order (see module doc),
    drawn lazily: one permutation per epoch as that epoch starts, so a training that stops
    early never pays for the epochs it skips (``max_epochs`` may be large)."""
    if n < 1:
        raise ValueError("a device needs at least one training example")
    rng = np.random.default_rng(seed)
    limit = config.max_steps if config.max_steps is not None else math.inf
    produced = 0
    for _ in range(config.epochs):
        perm = rng.permutation(n).astype(np.int64)
        for start in range(0, n, config.batch_size):
            if produced >= limit:
                return
            produced += 1
            yield perm[start : start + config.batch_size]


def batch_plan(n: int, config: LocalTrainConfig, seed: int) -> list[NDArray[np.int64]]:
    """All of :func:`iter_batches` as a list (the batched trainer needs every plan's length)."""
    return list(iter_batches(n, config, seed))


def _check_data(
    spec: ModelSpec, x: NDArray[Any], y: NDArray[Any]
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    xa = np.ascontiguousarray(x, dtype=np.float32)
    ya = np.ascontiguousarray(y, dtype=np.int64)
    if xa.shape[1:] != spec.input_shape:
        raise ValueError(
            f"x has shape {xa.shape}, model {spec.name!r} wants (N, {spec.input_shape})"
        )
    if ya.shape != (xa.shape[0],):
        raise ValueError(f"y has shape {ya.shape}, expected ({xa.shape[0]},)")
    if ya.size and (ya.min() < 0 or ya.max() >= spec.num_classes):
        raise ValueError(f"labels must be in [0, {spec.num_classes})")
    return xa, ya


def _as_tensor(a: NDArray[Any]) -> Tensor:
    """Zero-copy tensor of ``a`` when it is writable (torch warns on read-only arrays)."""
    import torch

    return torch.from_numpy(a if a.flags.writeable else a.copy())


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's (process-wide) intra-op thread count."""
    if threads is None:
        yield
        return
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _param_views(spec: ModelSpec, flat: Tensor) -> dict[str, Tensor]:
    """Named views of a ``(..., P)`` flat tensor shaped ``(..., *tensor.shape)``."""
    lead = tuple(flat.shape[:-1])
    return {
        t.name: flat[..., a:b].view(*lead, *t.shape)
        for t, (a, b) in zip(spec.layout, spec.offsets().values(), strict=True)
    }


class _Optimizer:
    """Elementwise optimizer over a ``(D, P)`` or ``(P,)`` flat tensor; rows ``[:k]`` step."""

    def __init__(self, config: LocalTrainConfig, like: Tensor) -> None:
        import torch

        self.cfg = config
        self.t = 0
        self.buf: Tensor | None = None
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        if config.optimizer is OptimizerKind.ADAM:
            self.m = torch.zeros_like(like)
            self.v = torch.zeros_like(like)
        elif config.momentum > 0:
            self.buf = torch.zeros_like(like)

    def step(self, w: Tensor, g: Tensor, k: int | None = None) -> None:
        """In place: ``w[:k] ← update(w[:k], g)`` (all rows when ``k`` is None).

        Only single-rounding elementwise ops (no ``alpha=``/``value=`` forms, which torch
        vectorises as fused multiply-adds but computes unfused in a loop's scalar tail), so a
        row's result does not depend on how many rows step with it."""
        cfg = self.cfg
        self.t += 1
        sl = slice(None) if k is None else slice(0, k)
        w = w[sl]
        if cfg.weight_decay:
            g = g + w * cfg.weight_decay
        if cfg.optimizer is OptimizerKind.ADAM:
            assert self.m is not None
            assert self.v is not None
            b1, b2 = _ADAM_BETAS
            m, v = self.m[sl], self.v[sl]
            m.mul_(b1).add_(g * (1 - b1))
            v.mul_(b2).add_(g * g * (1 - b2))
            bc1 = 1 - b1**self.t
            bc2 = 1 - b2**self.t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(_ADAM_EPS)
            w.sub_(m / denom * (cfg.lr / bc1))
            return
        if self.buf is not None:
            buf = self.buf[sl]
            buf.mul_(cfg.momentum).add_(g)
            g = buf
        w.sub_(g * cfg.lr)


def train_local(
    spec: ModelSpec,
    base_flat: NDArray[np.float32],
    x: NDArray[Any],
    y: NDArray[Any],
    config: LocalTrainConfig,
    *,
    should_stop: Callable[[], bool] | None = None,
    threads: int | None = None,
) -> LocalResult:
    """Train a copy of ``base_flat`` on ``(x, y)``; ``base_flat`` is never modified.

    ``should_stop()`` is called before every batch (so at most one batch runs after it turns
    true); when it returns true training stops and the partial ``delta`` is returned with
    ``stopped_early=True``. ``threads`` temporarily sets torch's process-wide thread count.
    Raises ``ValueError`` for data or a vector that does not fit ``spec``, or no examples.
    The result is bit-identical to the same device's result from :func:`train_many`.
    """
    base = spec.check_flat(base_flat)
    xa, ya = _check_data(spec, x, y)
    plan = iter_batches(len(ya), config, config.seed)
    import torch

    from edgefl.stacked_nets import stacked_net

    with _torch_threads(threads):
        net = stacked_net(spec)
        w = torch.from_numpy(base.copy()).unsqueeze(0)
        xt, yt = _as_tensor(xa), _as_tensor(ya)
        opt = _Optimizer(config, w)
        loss_sum, seen, steps, stopped = 0.0, 0, 0, False
        for idx in plan:
            if should_stop is not None and should_stop():
                stopped = True
                break
            ib, mb = _padded_batch(idx, config.batch_size)
            loss, grad = net.loss_and_grad(w, xt[ib], yt[ib], mb)
            opt.step(w, grad)
            loss_sum += float(loss[0]) * len(idx)
            seen += len(idx)
            steps += 1
        delta = w[0].numpy() - base
    return LocalResult(
        delta=delta.astype(np.float32, copy=False),
        num_examples=len(ya),
        loss=loss_sum / seen if seen else math.nan,
        steps=steps,
        stopped_early=stopped,
    )


def _padded_batch(idx: NDArray[np.int64], batch_size: int) -> tuple[Tensor, Tensor]:
    """``(indices (1, B), mask (1, B))`` of one batch padded to ``B`` rows (index 0, mask 0)."""
    import torch

    ib = np.zeros((1, batch_size), dtype=np.int64)
    mb = np.zeros((1, batch_size), dtype=np.float32)
    ib[0, : len(idx)] = idx
    mb[0, : len(idx)] = 1.0
    return torch.from_numpy(ib), torch.from_numpy(mb)


def train_many(
    spec: ModelSpec,
    base_flats: NDArray[np.float32],
    datasets: Sequence[tuple[NDArray[Any], NDArray[Any]]],
    config: LocalTrainConfig,
    *,
    seeds: Sequence[int] | None = None,
    threads: int | None = None,
    max_devices_per_call: int | None = None,
    batched: bool | None = None,
) -> list[LocalResult]:
    """Local training of ``D = len(datasets)`` devices, stacked (see module docstring).

    ``base_flats`` is ``(D, P)`` (each device's base model) or ``(P,)`` (shared). Device ``i``
    uses seed ``seeds[i]`` (default ``config.seed + i``), and its result equals
    ``train_local(spec, base_flats[i], *datasets[i], replace(config, seed=seeds[i]))`` bit for
    bit, whatever the stacking. Devices may have different numbers of examples.
    ``max_devices_per_call`` bounds how many devices share one stack (default: at most 32,
    less when a ~256 MB memory budget requires). Results are in input order; ``delta`` arrays
    of one chunk are rows of one shared ``(chunk, P)`` array. ``batched=None`` stacks models up
    to 50k parameters and runs :func:`train_local` one device at a time above that (where
    stacking is no faster); ``True``/``False`` force either path (same results).
    """
    n_dev = len(datasets)
    if n_dev == 0:
        return []
    bases = _device_bases(base_flats, n_dev, spec.num_params)
    seeds = [config.seed + i for i in range(n_dev)] if seeds is None else seeds
    if len(seeds) != n_dev:
        raise ValueError(f"{len(seeds)} seeds for {n_dev} devices")
    data, plans = _checked_devices(spec, datasets, config, seeds)
    if batched is None:
        batched = spec.num_params <= _BATCH_MAX_PARAMS
    if not batched:
        with _torch_threads(threads):
            return [
                train_local(spec, bases[i], x, y, replace(config, seed=int(seeds[i])))
                for i, (x, y) in enumerate(data)
            ]
    with _torch_threads(threads):
        return _train_stacked(spec, bases, (data, plans), config, max_devices_per_call)


_Devices = tuple[list[tuple[NDArray[np.float32], NDArray[np.int64]]], list[list[NDArray[np.int64]]]]
"""Checked devices: each one's ``(x, y)`` and batch plan (:func:`_checked_devices`)."""


def _train_stacked(
    spec: ModelSpec,
    bases: NDArray[np.float32],
    devices: _Devices,
    config: LocalTrainConfig,
    max_devices_per_call: int | None,
) -> list[LocalResult]:
    """The stacked path of :func:`train_many` (inputs already checked)."""
    data, plans = devices
    from edgefl.stacked_nets import stacked_net

    per_device = 24 * spec.num_params + config.batch_size * stacked_net(spec).bytes_per_example()
    results: list[LocalResult | None] = [None] * len(data)
    for group in _device_groups(plans, per_device, max_devices_per_call):
        deltas, losses = _train_group(
            spec,
            np.stack([bases[i] for i in group]),
            [data[i] for i in group],
            [plans[i] for i in group],
            config,
        )
        for j, i in enumerate(group):
            results[i] = LocalResult(
                delta=deltas[j],
                num_examples=len(data[i][1]),
                loss=float(losses[j]),
                steps=len(plans[i]),
                stopped_early=False,
            )
    return [r for r in results if r is not None]


def _device_bases(
    base_flats: NDArray[np.float32], n_dev: int, num_params: int
) -> NDArray[np.float32]:
    """``(D, P)`` base models: ``base_flats`` as given, or one ``(P,)`` model broadcast."""
    bases = np.asarray(base_flats)
    if bases.dtype != np.float32:
        raise ValueError(f"base_flats dtype {bases.dtype}, need float32")
    if bases.shape == (num_params,):
        bases = np.broadcast_to(bases, (n_dev, num_params))
    if bases.shape != (n_dev, num_params):
        raise ValueError(
            f"base_flats has shape {bases.shape}, "
            f"expected ({n_dev}, {num_params}) or ({num_params},)"
        )
    return bases


def _checked_devices(
    spec: ModelSpec,
    datasets: Sequence[tuple[NDArray[Any], NDArray[Any]]],
    config: LocalTrainConfig,
    seeds: Sequence[int],
) -> _Devices:
    """Each device's validated data and its batch plan (``ValueError`` naming the device)."""
    data = []
    plans = []
    for i, (x, y) in enumerate(datasets):
        try:
            xa, ya = _check_data(spec, x, y)
        except ValueError as exc:
            raise ValueError(f"device {i}: {exc}") from None
        if len(ya) == 0:
            raise ValueError(f"device {i}: no training examples")
        data.append((xa, ya))
        plans.append(batch_plan(len(ya), config, int(seeds[i])))
    return data, plans


def _device_groups(
    plans: Sequence[Sequence[object]], per_device: int, max_devices_per_call: int | None
) -> list[list[int]]:
    """Devices (indices) in equal-sized stacks, longest plans first (stable for ties): 100
    devices with a cap of 32 make 4 stacks of 25, not 32+32+32+4. The default cap is at most
    ``_MAX_STACK`` devices, fewer when ``_MEMORY_BUDGET`` over ``per_device`` bytes (weights,
    gradients, optimizer state and a batch's working memory) requires."""
    n_dev = len(plans)
    if max_devices_per_call is None:
        max_devices_per_call = max(1, min(_MAX_STACK, _MEMORY_BUDGET // per_device))
    if max_devices_per_call < 1:
        raise ValueError(f"max_devices_per_call must be >= 1, got {max_devices_per_call}")
    order = sorted(range(n_dev), key=lambda i: -len(plans[i]))
    n_chunks = -(-n_dev // max_devices_per_call)
    chunk = -(-n_dev // n_chunks)
    return [order[c : c + chunk] for c in range(0, n_dev, chunk)]


def _train_group(
    spec: ModelSpec,
    bases: NDArray[np.float32],
    data: list[tuple[NDArray[np.float32], NDArray[np.int64]]],
    plans: list[list[NDArray[np.int64]]],
    config: LocalTrainConfig,
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Train ``G`` devices whose plans are sorted by length, descending. Returns
    ``(deltas (G, P), mean losses (G,))``."""
    import torch

    from edgefl.stacked_nets import stacked_net

    net = stacked_net(spec)
    n_group, batch = len(data), config.batch_size
    n_steps = len(plans[0])
    offsets = np.cumsum([0] + [len(y) for _, y in data])
    x_cat = torch.from_numpy(np.concatenate([x for x, _ in data]))
    y_cat = torch.from_numpy(np.concatenate([y for _, y in data]))
    idx = np.zeros((n_steps, n_group, batch), dtype=np.int64)
    mask = np.zeros((n_steps, n_group, batch), dtype=np.float32)
    active = np.zeros(n_steps, dtype=np.int64)
    for g, plan in enumerate(plans):
        active[: len(plan)] += 1
        idx[: len(plan), g] = offsets[g]  # padding rows point at the device's first example
        for t, b in enumerate(plan):
            idx[t, g, : len(b)] = b + offsets[g]
            mask[t, g, : len(b)] = 1.0
    counts = mask.sum(axis=2, dtype=np.float64)  # (T, G)
    idx_t, mask_t = torch.from_numpy(idx), torch.from_numpy(mask)
    w = torch.from_numpy(np.array(bases, dtype=np.float32, copy=True))
    opt = _Optimizer(config, w)
    loss_sums = torch.zeros(n_group, dtype=torch.float64)
    for t in range(n_steps):
        k = int(active[t])
        ib = idx_t[t, :k]
        losses, grad = net.loss_and_grad(w[:k], x_cat[ib], y_cat[ib], mask_t[t, :k])
        opt.step(w, grad, k)
        loss_sums[:k] += losses.double() * torch.from_numpy(counts[t, :k])
    seen = counts.sum(axis=0)
    deltas = (w.numpy() - bases).astype(np.float32, copy=False)
    return deltas, loss_sums.numpy() / seen


def evaluate(
    spec: ModelSpec,
    flat: NDArray[np.float32],
    x: NDArray[Any],
    y: NDArray[Any],
    *,
    batch_size: int = 4096,
    threads: int | None = None,
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the model ``flat`` on ``(x, y)``."""
    w_np = spec.check_flat(flat)
    xa, ya = _check_data(spec, x, y)
    if len(ya) == 0:
        raise ValueError("cannot evaluate on zero examples")
    import torch
    from torch.func import functional_call
    from torch.nn import functional as fn

    from edgefl.models.torch_models import template_module

    with _torch_threads(threads), torch.no_grad():
        template = template_module(spec)
        params = _param_views(spec, torch.from_numpy(w_np.copy()))
        correct, loss_sum = 0, 0.0
        for s in range(0, len(ya), batch_size):
            xb = _as_tensor(xa[s : s + batch_size])
            yb = _as_tensor(ya[s : s + batch_size])
            logits = functional_call(template, params, (xb,))
            loss_sum += float(fn.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    return correct / len(ya), loss_sum / len(ya)
