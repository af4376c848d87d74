"""Server optimizers over flat float32 weight vectors.

The aggregate ``a`` handed to :meth:`ServerOptimizer.step` is a (weighted) mean of deltas, and
``delta = local_weights - base_weights``, so ``a`` points *downhill*: plain FedAvg is
``w <- w + a``. Equivalently ``g = -a`` is the server's pseudo-gradient.

ServerSGD (``lr``, ``momentum`` = mu; heavy-ball, identical to ``torch.optim.SGD`` on ``g = -a``
with dampening 0)::

    m <- mu * m + a          (m starts at 0, so the first step has m = a)
    w <- w + lr * m          (mu = 0 keeps no buffer: w <- w + lr * a)

ServerAdam (FedAdam of Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2)::

    m <- beta1 * m + (1 - beta1) * a
    v <- beta2 * v + (1 - beta2) * a^2
    w <- w + lr * m_hat / (sqrt(v_hat) + eps)

with ``m_hat = m, v_hat = v`` as in the paper (``bias_correction=False``, the default) or
``m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)`` as in ``torch.optim.Adam``
(``bias_correction=True``). This is Adam on ``g = -a``: the first moment of ``g`` is ``-m``, the
second moment is the same ``v``. Reddi et al.'s adaptivity ``tau`` is our ``eps`` (default 1e-3);
FedAdam wants a much smaller ``lr`` than SGD (1e-2 .. 1e-3 is typical).

State export: ``state_dict()`` returns ``{"steps": int, ...arrays}`` (``momentum_buffer`` for SGD
with momentum, ``m`` and ``v`` for Adam, each present once the first step allocated it).
Hyperparameters are configuration, not state: they are not in the dict, so an operator may change
``lr`` across a restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeAlias

import numpy as np
from numpy.typing import NDArray

OptimizerState: TypeAlias = dict[str, NDArray[np.float32] | float | int]


class ServerOptimizerKind(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class ServerOptimizer(Protocol):
    """A stateful server optimizer; ``step`` updates ``weights`` in place."""

    @property
    def kind(self) -> ServerOptimizerKind: ...

    def step(self, weights: NDArray[np.float32], aggregate: NDArray[np.float32]) -> None: ...

    def state_dict(self) -> OptimizerState: ...

    def load_state_dict(self, state: Mapping[str, NDArray[np.float32] | float | int]) -> None: ...


def _check_finite(name: str, value: float, *, low: float, high: float | None = None) -> None:
    """``low <= value (< high)`` and finite, else ``ValueError``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (high is None or value < high)
    if not ok:
        span = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be finite and {span}, got {value!r}")


def _check_lr(lr: float) -> None:
    _check_finite("server lr", lr, low=0.0)
    if lr == 0.0:
        raise ValueError("server lr must be > 0")


def _check_step_args(weights: NDArray[np.float32], aggregate: NDArray[np.float32]) -> None:
    if weights.dtype != np.float32 or weights.ndim != 1:
        raise ValueError(
            f"weights must be a flat float32 vector, got {weights.dtype} {weights.shape}"
        )
    if aggregate.shape != weights.shape:
        raise ValueError(f"aggregate shape {aggregate.shape} != weights shape {weights.shape}")


def _steps_of(state: Mapping[str, NDArray[np.float32] | float | int]) -> int:
    steps = state.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or int(steps) < 0:
        raise ValueError(f"optimizer state 'steps' must be an integer >= 0, got {steps!r}")
    return int(steps)


def _array_of(
    state: Mapping[str, NDArray[np.float32] | float | int], key: str
) -> NDArray[np.float32] | None:
    value = state.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise ValueError(f"optimizer state {key!r} must be a 1-D array, got {value!r}")
    arr = np.array(value, dtype=np.float32, copy=True)
    if not np.isfinite(arr).all():
        raise ValueError(f"optimizer state {key!r} is not finite")
    return arr


def _reject_unknown_keys(
    state: Mapping[str, NDArray[np.float32] | float | int], allowed: set[str]
) -> None:
    unknown = sorted(set(state) - allowed)
    if unknown:
        raise ValueError(f"unknown optimizer state keys {unknown}; expected {sorted(allowed)}")


class _Counted:
    """The steps an optimizer took (its ``_steps``)."""

    _steps: int

    @property
    def steps(self) -> int:
        return self._steps


class ServerSGD(_Counted):
    """Server SGD with heavy-ball momentum: ``m <- mu m + a``; ``w <- w + lr m``."""

    kind = ServerOptimizerKind.SGD

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        _check_lr(lr)
        _check_finite("server momentum", momentum, low=0.0, high=1.0)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._buf: NDArray[np.float32] | None = None
        self._steps = 0

    def step(self, weights: NDArray[np.float32], aggregate: NDArray[np.float32]) -> None:
        _check_step_args(weights, aggregate)
        direction = aggregate
        if self.momentum > 0.0:
            if self._buf is None:
                self._buf = np.array(aggregate, dtype=np.float32, copy=True)
            else:
                if self._buf.shape != weights.shape:
                    raise ValueError("momentum buffer shape does not match the weights")
                self._buf *= np.float32(self.momentum)
                self._buf += aggregate
            direction = self._buf
        weights += np.float32(self.lr) * direction
        self._steps += 1

    def state_dict(self) -> OptimizerState:
        state: OptimizerState = {"steps": self._steps}
        if self._buf is not None:
            state["momentum_buffer"] = self._buf.copy()
        return state

    def load_state_dict(self, state: Mapping[str, NDArray[np.float32] | float | int]) -> None:
        _reject_unknown_keys(state, {"steps", "momentum_buffer"})
        self._steps = _steps_of(state)
        self._buf = _array_of(state, "momentum_buffer")


class ServerAdam(_Counted):
    """FedAdam (Reddi et al.): Adam on the pseudo-gradient ``-aggregate``; see module docstring."""

    kind = ServerOptimizerKind.ADAM

    def __init__(
        self,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-3,
        *,
        bias_correction: bool = False,
    ) -> None:
        _check_lr(lr)
        _check_finite("adam beta1", beta1, low=0.0, high=1.0)
        _check_finite("adam beta2", beta2, low=0.0, high=1.0)
        _check_finite("adam eps", eps, low=0.0)
        if eps == 0.0:
            raise ValueError("adam eps must be > 0")
        self.lr = float(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.bias_correction = bool(bias_correction)
        self._m: NDArray[np.float32] | None = None
        self._v: NDArray[np.float32] | None = None
        self._steps = 0

    def step(self, weights: NDArray[np.float32], aggregate: NDArray[np.float32]) -> None:
        _check_step_args(weights, aggregate)
        if self._m is None or self._v is None:
            self._m = np.zeros_like(weights)
            self._v = np.zeros_like(weights)
        if self._m.shape != weights.shape or self._v.shape != weights.shape:
            raise ValueError("adam moment shapes do not match the weights")
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        self._m *= b1
        self._m += (np.float32(1.0) - b1) * aggregate
        self._v *= b2
        self._v += (np.float32(1.0) - b2) * np.square(aggregate)
        t = self._steps + 1
        m_hat: NDArray[np.float32] = self._m
        v_hat: NDArray[np.float32] = self._v
        if self.bias_correction:
            m_hat = self._m / np.float32(1.0 - self.beta1**t)
            v_hat = self._v / np.float32(1.0 - self.beta2**t)
        weights += np.float32(self.lr) * m_hat / (np.sqrt(v_hat) + np.float32(self.eps))
        self._steps = t

    def state_dict(self) -> OptimizerState:
        state: OptimizerState = {"steps": self._steps}
        if self._m is not None and self._v is not None:
            state["m"] = self._m.copy()
            state["v"] = self._v.copy()
        return state

    def load_state_dict(self, state: Mapping[str, NDArray[np.float32] | float | int]) -> None:
        _reject_unknown_keys(state, {"steps", "m", "v"})
        m, v = _array_of(state, "m"), _array_of(state, "v")
        if (m is None) != (v is None) or (m is not None and v is not None and m.shape != v.shape):
            raise ValueError("adam state needs both 'm' and 'v' of the same shape, or neither")
        if v is not None and (v < 0).any():
            raise ValueError("adam second moment 'v' must be >= 0")
        self._steps = _steps_of(state)
        self._m, self._v = m, v


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Frozen description of a server optimizer (fields of the other kind are ignored).

    Prefer the constructors :meth:`sgd` and :meth:`adam`, which carry per-kind defaults.
    """

    kind: ServerOptimizerKind = ServerOptimizerKind.SGD
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    bias_correction: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ServerOptimizerKind(self.kind))
        self.build()  # validates the hyperparameters of the chosen kind

    @classmethod
    def sgd(cls, lr: float = 1.0, momentum: float = 0.0) -> ServerOptimizerConfig:
        return cls(kind=ServerOptimizerKind.SGD, lr=lr, momentum=momentum)

    @classmethod
    def adam(
        cls,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-3,
        *,
        bias_correction: bool = False,
    ) -> ServerOptimizerConfig:
        return cls(
            kind=ServerOptimizerKind.ADAM,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            bias_correction=bias_correction,
        )

    def build(self) -> ServerOptimizer:
        """A fresh optimizer (empty state) of this configuration."""
        if self.kind == ServerOptimizerKind.SGD:
            return ServerSGD(lr=self.lr, momentum=self.momentum)
        return ServerAdam(
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            bias_correction=self.bias_correction,
        )
