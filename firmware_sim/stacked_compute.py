"""The trainings of one live-simulation worker process, stacked (see :mod:`firmware_sim.live`).

The simulated agents of a worker ask for real SGD through :meth:`StackedCompute.submit`. A
compute thread that frees up takes **every** training waiting at that moment (at most
``max_stack``) and runs them in one :func:`edgefl.training.train_many` call, grouped by model
and training settings: ``G`` devices share each stacked pass, and each device's result is
bit-identical to :func:`~edgefl.training.train_local` of that device alone (the contract of
``train_many``, tested in ``tests/unit/test_training_batched.py``), so stacking changes the CPU
a run costs, never what it learns. A lone training runs at once (no gathering delay); the
stacks grow by themselves when trainings arrive faster than one thread computes them.

A training whose ``should_stop()`` is true when its stack starts is skipped, and one whose
``should_stop()`` turned true by the end is dropped: both resolve to ``None``, as an aborted
:func:`train_local` did (the agent discards an aborted training either way). A stack whose
``train_many`` call raises is retried one training at a time, so a bad request fails alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.models.spec import ModelSpec
from edgefl.training import LocalResult, LocalTrainConfig, train_local, train_many

__all__ = ["StackedCompute", "StackedComputeStatistics", "TrainingRequest"]

Outcome = concurrent.futures.Future[LocalResult | None]


@dataclass(frozen=True, eq=False)
class TrainingRequest:
    """One device's local training: ``train_local(spec, base, x, y, config)``."""

    spec: ModelSpec
    base: NDArray[np.float32]
    x: NDArray[Any]
    y: NDArray[Any]
    config: LocalTrainConfig
    should_stop: Callable[[], bool]


@dataclass(frozen=True)
class StackedComputeStatistics:
    """``stacks``: ``train_many`` calls; ``trainings``: results computed; ``largest``: the most
    trainings in one call; ``skipped``: requests stopped before or during their stack."""

    stacks: int
    trainings: int
    largest: int
    skipped: int


class StackedCompute:
    """``threads`` compute threads over one queue of :class:`TrainingRequest` (module doc)."""

    def __init__(self, *, threads: int = 1, max_stack: int = 32) -> None:
        if threads < 1 or max_stack < 1:
            raise ValueError("need threads >= 1 and max_stack >= 1")
        self._max_stack = max_stack
        self._ready = threading.Condition()
        self._waiting: list[tuple[TrainingRequest, Outcome]] = []
        self._closed = False
        self._stats = {"stacks": 0, "trainings": 0, "largest": 0, "skipped": 0}
        self._threads = [
            threading.Thread(target=self._serve, name=f"edgefl-sim-train-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, request: TrainingRequest) -> Outcome:
        """Queue ``request``; the future gives its :class:`LocalResult`, or None if stopped.
        ``RuntimeError`` after :meth:`shutdown`."""
        outcome: Outcome = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("StackedCompute is shut down")
            self._waiting.append((request, outcome))
            self._ready.notify()
        return outcome

    def shutdown(self) -> None:
        """Cancel what waits and let the threads end after their current stack."""
        with self._ready:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._ready.notify_all()
        for _, outcome in waiting:
            outcome.cancel()

    def statistics(self) -> StackedComputeStatistics:
        with self._ready:
            return StackedComputeStatistics(**self._stats)

    # ------------------------------------------------------------------ compute threads

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                batch = self._waiting[: self._max_stack]
                del self._waiting[: self._max_stack]
            live = [(r, o) for r, o in batch if o.set_running_or_notify_cancel()]
            for group in _groups(live).values():
                self._run(group)

    def _run(self, group: list[tuple[TrainingRequest, Outcome]]) -> None:
        started = [(r, o) for r, o in group if not _stopped(r, o)]
        if not started:
            self._count(0, len(group))
            return
        try:
            results = _train(started)
        except Exception:  # one bad request must not fail the others: one at a time
            for request, outcome in started:
                try:
                    (result,) = _train([(request, outcome)])
                except Exception as exc:
                    outcome.set_exception(exc)
                else:
                    _resolve(request, outcome, result)
            self._count(len(started), len(group) - len(started))
            return
        skipped = len(group) - len(started)
        for (request, outcome), result in zip(started, results, strict=True):
            skipped += not _resolve(request, outcome, result)
        self._count(len(started), skipped)

    def _count(self, trainings: int, skipped: int) -> None:
        with self._ready:
            s = self._stats
            s["stacks"] += trainings > 0
            s["trainings"] += trainings
            s["largest"] = max(s["largest"], trainings)
            s["skipped"] += skipped


def _groups(
    batch: list[tuple[TrainingRequest, Outcome]],
) -> dict[tuple[ModelSpec, LocalTrainConfig], list[tuple[TrainingRequest, Outcome]]]:
    """Requests that one ``train_many`` call can take: same model, same settings but the seed."""
    groups: dict[tuple[ModelSpec, LocalTrainConfig], list[tuple[TrainingRequest, Outcome]]] = {}
    for request, outcome in batch:
        key = (request.spec, dataclasses.replace(request.config, seed=0))
        groups.setdefault(key, []).append((request, outcome))
    return groups


def _stopped(request: TrainingRequest, outcome: Outcome) -> bool:
    """True (and the outcome resolved to None) when the request was stopped already."""
    if request.should_stop():
        outcome.set_result(None)
        return True
    return False


def _train(group: list[tuple[TrainingRequest, Outcome]]) -> list[LocalResult]:
    if not group:
        return []
    if len(group) == 1:  # no stack to share: the single-device path, same bits
        ((r, _),) = group
        return [train_local(r.spec, r.base, r.x, r.y, r.config, threads=1)]
    first = group[0][0]
    return train_many(
        first.spec,
        np.stack([r.base for r, _ in group]),
        [(r.x, r.y) for r, _ in group],
        first.config,
        seeds=[r.config.seed for r, _ in group],
        threads=1,
    )


def _resolve(request: TrainingRequest, outcome: Outcome, result: LocalResult) -> bool:
    """Set the outcome; False (None) when the request was stopped while its stack ran."""
    if request.should_stop():
        outcome.set_result(None)
        return False
    outcome.set_result(result)
    return True
