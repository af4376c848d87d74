"""The update seam of the aggregation core: what FedBuff needs from an update, and a dense adapter.

Sign convention (docs/ARCHITECTURE.md): ``delta = local_weights - base_weights``.

``edgefl.codec.DecodedUpdate`` satisfies :class:`AddableUpdate` structurally, so this package never
imports the codec. :class:`DenseUpdate` adapts a plain numpy vector (simulator, tests, torch
trainers that produce dense deltas).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray


class AddableUpdate(Protocol):
    """An update delta that can be added into an accumulator without being densified.

    ``num_params`` is declared as a read-only property so that a plain attribute, a property and a
    frozen-dataclass field all satisfy the protocol.
    """

    @property
    def num_params(self) -> int:
        """Number of elements of the flat delta."""
        ...

    def squared_norm(self) -> float:
        """``||delta||_2^2`` (NaN or Inf when the delta is not finite)."""
        ...

    def add_to(self, out: NDArray[np.float32], weight: float) -> None:
        """``out += weight * delta`` in place; ``out`` has shape ``(num_params,)``."""
        ...

    def to_dense(self) -> NDArray[np.float32]:
        """The delta as a fresh 1-D float32 array."""
        ...


class DenseUpdate:
    """:class:`AddableUpdate` over a dense 1-D vector.

    The constructor takes a private read-only float32 copy, so a caller that reuses its array
    cannot change an update that FedBuff keeps (robust mode keeps the update objects).
    """

    __slots__ = ("_delta",)

    def __init__(self, delta: ArrayLike) -> None:
        arr = np.array(delta, dtype=np.float32, copy=True)
        if arr.ndim != 1:
            raise ValueError(f"DenseUpdate needs a flat 1-D delta, got shape {arr.shape}")
        arr.setflags(write=False)
        self._delta: NDArray[np.float32] = arr

    @property
    def num_params(self) -> int:
        return int(self._delta.shape[0])

    @property
    def delta(self) -> NDArray[np.float32]:
        """The (read-only) delta vector."""
        return self._delta

    def squared_norm(self) -> float:
        d = self._delta.astype(np.float64)
        return float(np.dot(d, d))

    def add_to(self, out: NDArray[np.float32], weight: float) -> None:
        if out.shape != self._delta.shape:
            raise ValueError(f"accumulator shape {out.shape} != delta shape {self._delta.shape}")
        out += np.float32(weight) * self._delta

    def to_dense(self) -> NDArray[np.float32]:
        return self._delta.copy()

    def __repr__(self) -> str:
        return f"DenseUpdate(num_params={self.num_params})"
