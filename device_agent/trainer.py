"""The trainer seam of the agent and its default torch implementation.

Contract (:class:`Trainer`): ``train(job, should_stop)`` runs *in a worker thread* (the agent's
executor), trains a copy of ``job.base_weights`` on ``job.data`` and returns a
:class:`TrainResult` with ``delta = local_weights - base_weights`` (the sign used everywhere in
edgefl), or ``None`` when ``should_stop()`` turned true before training finished: an aborted
training produces nothing, and the agent publishes nothing for it. ``should_stop`` is cheap and
thread-safe; a trainer must poll it at least once per mini-batch so that a device that stops
being eligible (unplugged, too hot, busy) gives the CPU back promptly. A trainer may raise; the
agent counts that as an aborted training (``error``).

:class:`TorchTrainer` is the default. torch is imported inside :meth:`TorchTrainer.train`, i.e.
when the first training starts, never while the agent idles. The worker thread lowers its own
scheduling priority to ``nice`` (Linux nice values are per thread, so the event loop keeps its
priority) and torch runs with ``threads`` intra-op threads. Before training, the global model is
evaluated on the held-out examples (``metrics["global_accuracy"]``).

The fleet simulator wraps a trainer to add simulated speed and crashes; it must keep the
``should_stop`` polling contract.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from device_agent.dataset import LocalDataset
from edgefl.models.spec import ModelSpec

__all__ = [
    "ProcessTrainer",
    "TorchTrainer",
    "TrainJob",
    "TrainResult",
    "Trainer",
    "lower_thread_priority",
]

log = logging.getLogger("device_agent.trainer")


@dataclass(frozen=True, eq=False)
class TrainJob:
    """One local training. ``base_weights`` is read-only float32 (the global model of
    ``base_version``); ``max_steps`` None means ``epochs`` full passes."""

    spec: ModelSpec
    base_version: int
    base_weights: NDArray[np.float32]
    data: LocalDataset
    epochs: int
    batch_size: int
    lr: float
    max_steps: int | None = None
    threads: int = 1
    nice: int = 10
    seed: int = 0

    @property
    def model(self) -> str:
        return self.spec.name


@dataclass(frozen=True, eq=False)
class TrainResult:
    """A finished training. ``delta = local - base`` (float32, ``num_params`` long);
    ``num_examples`` the examples trained on; ``metrics`` finite floats such as ``loss``,
    ``steps``, ``train_seconds`` and ``global_accuracy`` (of the base model on held-out data)."""

    delta: NDArray[np.float32]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def global_accuracy(self) -> float | None:
        value = self.metrics.get("global_accuracy")
        return None if value is None else float(value)


class Trainer(Protocol):
    """See the module docstring for the contract."""

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None: ...


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value to at least ``nice`` (never lowers it; idempotent,
    so a reused pool thread does not accumulate niceness). Best effort."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # not permitted in some sandboxes: training still works
        log.debug("cannot lower the training thread's priority: %s", exc)


class TorchTrainer:
    """Local SGD with ``edgefl.training`` (torch, imported lazily)."""

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        lower_thread_priority(job.nice)
        if should_stop():
            return None
        from edgefl.data.sources import fit_to_spec
        from edgefl.training import LocalTrainConfig, evaluate, train_local

        started = time.monotonic()
        x_train, y_train = fit_to_spec(job.data.x_train, job.data.y_train, job.spec)
        metrics: dict[str, float] = {}
        if job.data.num_test:
            x_test, y_test = fit_to_spec(job.data.x_test, job.data.y_test, job.spec)
            accuracy, loss = evaluate(
                job.spec, job.base_weights, x_test, y_test, threads=job.threads
            )
            metrics["global_accuracy"] = accuracy
            metrics["global_loss"] = loss
        config = LocalTrainConfig(
            epochs=job.epochs,
            batch_size=job.batch_size,
            lr=job.lr,
            max_steps=job.max_steps,
            seed=job.seed,
        )
        result = train_local(
            job.spec,
            job.base_weights,
            x_train,
            y_train,
            config,
            should_stop=should_stop,
            threads=job.threads,
        )
        if result.stopped_early:
            return None
        metrics["steps"] = float(result.steps)
        metrics["train_seconds"] = time.monotonic() - started
        if math.isfinite(result.loss):
            metrics["loss"] = result.loss
        return TrainResult(delta=result.delta, num_examples=result.num_examples, metrics=metrics)


class ProcessTrainer:
    """Runs a trainer in a fresh child process for every training (``training.isolation =
    "process"``), so torch and everything training allocates leaves with the child.

    ``factory`` builds the inner trainer *in the child* and must be picklable (a module-level
    class such as :class:`TorchTrainer`). ``should_stop`` is polled in the parent every
    ``poll_s`` and forwarded to the child through a ``multiprocessing.Event``, which the inner
    trainer polls per mini-batch, so an abort is as prompt as in a thread. The child uses the
    ``spawn`` start method (no fork of a threaded asyncio process). A child that dies without an
    answer (killed by the OOM killer, a crash in native code) raises ``RuntimeError``, which the
    agent counts as an aborted training (``error``).
    """

    def __init__(
        self,
        factory: Callable[[], Trainer] = TorchTrainer,
        *,
        poll_s: float = 0.05,
    ) -> None:
        self._factory = factory
        self._context = multiprocessing.get_context("spawn")
        self._poll_s = poll_s

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        ctx = self._context
        stop = ctx.Event()
        receiver, sender = ctx.Pipe(duplex=False)
        job_receiver, job_sender = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_train_in_child,
            args=(self._factory, job_receiver, stop, sender),
            name=f"edgefl-train-v{job.base_version}",
            daemon=True,
        )
        child.start()  # a small spawn payload: the job goes over its own pipe, below
        sender.close()
        job_receiver.close()
        try:
            try:
                job_sender.send(job)
            except OSError as exc:  # the child died before it read its job
                raise RuntimeError(f"training process did not take its job ({exc})") from None
            finally:
                job_sender.close()
            while True:
                if should_stop():
                    stop.set()
                if receiver.poll(self._poll_s):
                    try:
                        status, payload = receiver.recv()
                    except EOFError:
                        raise RuntimeError(
                            f"training process exited without a result ({child.exitcode})"
                        ) from None
                    break
                if not child.is_alive() and not receiver.poll(0):
                    raise RuntimeError(f"training process died (exit code {child.exitcode})")
        finally:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()
            receiver.close()
        if status == "error":
            raise RuntimeError(f"training process failed: {payload}")
        result: TrainResult | None = payload
        return result


def _train_in_child(
    factory: Callable[[], Trainer],
    job_conn: Any,
    stop: Any,
    conn: Any,
) -> None:
    """Child process body: receive the job, train, send ``("ok", result | None)`` or
    ``("error", text)``. A parent that stops (or dies) while still sending the job leaves a
    closed or truncated pipe: the child then exits quietly, with nothing to report to anyone.

    (The job travels over its own pipe rather than in the spawn payload because writing a big
    spawn payload blocks the parent until the child, importing torch, has read it: an agent
    stopping in that window used to leave the child printing an ``UnpicklingError`` traceback.)"""
    try:
        job: TrainJob = job_conn.recv()
    except (EOFError, OSError, pickle.UnpicklingError):
        return
    finally:
        job_conn.close()
    try:
        result = factory().train(job, stop.is_set)
        conn.send(("ok", result))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
