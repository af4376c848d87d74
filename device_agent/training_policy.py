"""Sans-IO decisions of the device agent: when to train, on what job, and why a training ended.

Beside :mod:`device_agent.eligibility.policy` (whether the device may train at all), this module
decides everything else about a training from plain values, so the agent's asyncio shell
(:mod:`device_agent.agent`) only carries the decisions out:

* :func:`should_train` — a held model newer than the last one trained on, eligible, not stopping;
* :func:`training_job` — the local-training job: the manifest's hints capped by the device's
  limits, a per-device, per-version seed;
* :class:`TrainingGate` and :func:`abort_reason` — why a started training produced no update;
  :func:`marks_version_done` — whether that version is given up (error, timeout) or retried
  (a broken condition, a shutdown);
* :func:`presence_reasons` and :func:`status_line` — what the device state and systemd's status
  line say.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from enum import StrEnum

from device_agent.config import TrainingLimits
from device_agent.dataset import LocalDataset, device_seed
from device_agent.model_store import CurrentModel
from device_agent.trainer import TrainJob
from edgefl.models.spec import ModelSpec
from edgefl.protocol.messages import DeviceStatus

__all__ = [
    "AbortReason",
    "DropReason",
    "TrainingGate",
    "abort_reason",
    "marks_version_done",
    "presence_reasons",
    "should_train",
    "status_line",
    "training_job",
]


class AbortReason(StrEnum):
    """Why a started training produced no update."""

    INELIGIBLE = "ineligible"  # a condition broke mid-training
    STOPPING = "stopping"  # the agent is shutting down
    TIMEOUT = "timeout"  # longer than training.max_train_seconds
    ERROR = "error"  # the trainer raised


class DropReason(StrEnum):
    """Why a finished update was lost before it could be delivered (counted, never silent)."""

    SPOOL_FULL = "spool_full"
    SPOOL_CORRUPT = "spool_corrupt"
    ENCODE_FAILED = "encode_failed"


def should_train(
    *, model_version: int | None, trained_mark: int, eligible: bool, stopping: bool
) -> bool:
    """Train iff a model is held, it is newer than the last one trained on, the device is
    eligible and the agent is not stopping. ``trained_mark`` is the last version trained on
    plus one (0: none), so every version is trained on at most once."""
    if stopping or model_version is None or not eligible:
        return False
    return model_version + 1 > trained_mark


def training_job(
    model: CurrentModel,
    spec: ModelSpec,
    limits: TrainingLimits,
    data: LocalDataset,
    device_id: str,
) -> TrainJob:
    """The job for ``model``: the manifest's hints (epochs, batch size, learning rate) where given,
    epochs capped by ``limits.max_epochs``; seed ``(device_seed(device_id) + version) mod 2^31``
    so a device trains a version reproducibly and differently from its neighbours."""
    hints = model.manifest.hints
    epochs = limits.max_epochs
    batch, lr = limits.batch_size, limits.lr
    if hints is not None:
        epochs = min(hints.local_epochs or epochs, limits.max_epochs)
        batch = hints.batch_size or batch
        lr = hints.lr or lr
    return TrainJob(
        spec=spec,
        base_version=model.version,
        base_weights=model.weights,
        data=data,
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        max_steps=limits.max_steps,
        threads=limits.max_threads,
        nice=limits.nice,
        seed=(device_seed(device_id) + model.version) % 2**31,
    )


class TrainingGate:
    """The flag a running training polls (``should_stop``) and the first reason it was raised.

    Thread-safe for the trainer's thread: ``aborted()`` reads a ``threading.Event``. Only the
    first reason raised during a training counts; ``begin()`` resets both for the next one.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._reason: AbortReason | None = None
        self.active = False

    def begin(self) -> None:
        """A training starts: no abort requested yet."""
        self._flag.clear()
        self._reason = None
        self.active = True

    def end(self) -> None:
        """The training returned (with a result or not)."""
        self.active = False

    def abort(self, reason: AbortReason) -> None:
        """Ask a running training to stop (a no-op reason when none runs, but the flag is set)."""
        if self.active and self._reason is None:
            self._reason = reason
        self._flag.set()

    def aborted(self) -> bool:
        """Whether an abort was requested since ``begin()`` (polled from the trainer thread)."""
        return self._flag.is_set()

    @property
    def reason(self) -> AbortReason | None:
        """The first abort reason of the current training, if any."""
        return self._reason


def abort_reason(*, failed: bool, requested: AbortReason | None, timed_out: bool) -> AbortReason:
    """Why a training returned no result: the trainer raised (``ERROR``), else the reason it was
    asked to stop for, else its deadline passed (``TIMEOUT``), else a shutdown (``STOPPING``)."""
    if failed:
        return AbortReason.ERROR
    if requested is not None:
        return requested
    return AbortReason.TIMEOUT if timed_out else AbortReason.STOPPING


def marks_version_done(reason: AbortReason) -> bool:
    """A failed or timed-out version is not retried in a loop (the next model gets a fresh
    chance); a training cut short by a broken condition or a shutdown is retried."""
    return reason in (AbortReason.ERROR, AbortReason.TIMEOUT)


def presence_reasons(
    *,
    probe_failed: bool,
    decision_reasons: Sequence[str] | None,
    training: bool,
    has_model: bool,
) -> tuple[str, ...]:
    """Why the device does not train, as its device state says it: ``probe_failed`` when the
    probes could not be read, else the eligibility reasons (``None``: no decision yet), else
    ``no_model`` for an eligible, idle device without a model."""
    if probe_failed:
        return ("probe_failed",)
    reasons = tuple(decision_reasons) if decision_reasons is not None else ()
    if not reasons and decision_reasons is not None and not training and not has_model:
        return ("no_model",)
    return reasons


def status_line(
    *,
    status: DeviceStatus,
    model_version: int | None,
    connected: bool,
    spool_depth: int,
    updates_sent: int,
    reasons: Sequence[str],
    awaiting_receipt: int = 0,
) -> str:
    """systemd's one-line status, e.g. ``idle; model v3; connected; spool 0; sent 12``
    (``spool 3 (2 awaiting receipt)`` when sent updates wait for the aggregator's receipt)."""
    model = "no model" if model_version is None else f"model v{model_version}"
    link = "connected" if connected else "disconnected"
    spool = f"spool {spool_depth}"
    if awaiting_receipt:
        spool += f" ({awaiting_receipt} awaiting receipt)"
    text = f"{status.value}; {model}; {link}; {spool}; sent {updates_sent}"
    return f"{text}; not eligible: {','.join(reasons)}" if reasons else text
