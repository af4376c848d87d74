"""Held-out evaluation of model versions in a worker thread, so ingest never waits for it.

The evaluator keeps only the newest submitted version (latest wins): when versions are created
faster than they can be evaluated, intermediate ones are skipped (their history accuracy stays
``None``). torch and the dataset are loaded lazily, inside the worker thread, on first use.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from edgefl.models import ModelSpec

__all__ = ["Evaluator", "start_on_loop"]

log = logging.getLogger("edgefl.aggregator.evaluation")


class Evaluator:
    """``submit(version, weights)``; results arrive via ``on_result(version, accuracy)`` called
    from the worker thread."""

    def __init__(
        self,
        spec: ModelSpec,
        dataset: str,
        *,
        seed: int,
        on_result: Callable[[int, float], None],
        max_examples: int = 4000,
    ) -> None:
        self._spec = spec
        self._dataset = dataset
        self._seed = seed
        self._on_result = on_result
        self._max_examples = max_examples
        self._cond = threading.Condition()
        self._pending: tuple[int, NDArray[np.float32]] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgefl-eval", daemon=True)
        self.evaluated = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, version: int, weights: NDArray[np.float32]) -> None:
        with self._cond:
            self._pending = (version, np.array(weights, dtype=np.float32, copy=True))
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        from edgefl.data import load_dataset
        from edgefl.training import evaluate

        try:
            data = load_dataset(self._dataset, seed=self._seed)
        except Exception:
            log.exception("cannot load evaluation dataset %s", self._dataset)
            return
        x = data.x_test[: self._max_examples]
        y = data.y_test[: self._max_examples]
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._pending is None:
                    return
                version, weights = self._pending
                self._pending = None
            try:
                accuracy, _ = evaluate(self._spec, weights, x, y, threads=1)
            except Exception:
                log.exception("evaluation of version %d failed", version)
                continue
            self.evaluated += 1
            self._on_result(version, float(accuracy))


def start_on_loop(
    spec: ModelSpec,
    dataset: str,
    *,
    seed: int,
    record: Callable[[int, float], None],
    version: int,
    weights: NDArray[np.float32],
) -> Evaluator:
    """A started :class:`Evaluator` whose results run ``record(version, accuracy)`` on the
    calling (running) event loop, so ``record`` may touch the service's state and store without
    locks; ``version`` (the one being served) is submitted at once. Both aggregators use it."""
    loop = asyncio.get_running_loop()

    def on_result(evaluated: int, accuracy: float) -> None:
        loop.call_soon_threadsafe(record, evaluated, accuracy)

    evaluator = Evaluator(spec, dataset, seed=seed, on_result=on_result)
    evaluator.start()
    evaluator.submit(version, weights)
    return evaluator
