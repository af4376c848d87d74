"""The model state an aggregation wrapper reads through to the aggregator it wraps.

:class:`~edgefl.aggregation.SyncFedAvg` wraps a :class:`~edgefl.aggregation.FedBuff`, the
:class:`~edgefl.aggregation.AggregationCore` implementations wrap one of those two, and the
service's :class:`~edgefl.aggregator.engine.Engine` wraps a core: each inherits
:class:`ModelView` over its ``_core`` instead of repeating the same three properties.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["ModelState", "ModelView"]


class ModelState(Protocol):
    """What every aggregator exposes of its model."""

    @property
    def version(self) -> int: ...

    @property
    def weights(self) -> NDArray[np.float32]: ...

    @property
    def buffer_fill(self) -> int: ...


M = TypeVar("M", bound=ModelState)


class ModelView(Generic[M]):
    """``version``, ``weights`` and ``buffer_fill`` of the wrapped aggregator ``_core``."""

    _core: M

    @property
    def version(self) -> int:
        """The model version (the number of server steps so far)."""
        return self._core.version

    @property
    def weights(self) -> NDArray[np.float32]:
        """Read-only view of the current weights (changes in place at each step)."""
        return self._core.weights

    @property
    def buffer_fill(self) -> int:
        """Updates accepted into the buffer (FedAvg: the open round's) since the last step."""
        return self._core.buffer_fill
