"""The agent's sans-IO training decisions (device_agent.training_policy), hand-checkable."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from device_agent.config import TrainingLimits
from device_agent.dataset import LocalDataset, device_seed
from device_agent.model_store import CurrentModel
from device_agent.release import model_release
from device_agent.training_policy import (
    AbortReason,
    TrainingGate,
    abort_reason,
    marks_version_done,
    presence_reasons,
    should_train,
    status_line,
    training_job,
)
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.protocol.messages import DeviceStatus, TrainingHints

SPEC = get_model_spec("digits-mlp")
DATA = LocalDataset.split(
    np.zeros((10, 64), dtype=np.float32), np.arange(10, dtype=np.int64) % 10, 0.2, seed=0
)


def model(version: int, hints: TrainingHints | None = None) -> CurrentModel:
    weights = init_weights_numpy(SPEC, 0)
    release = model_release("farm", version, "digits-mlp", weights, hints=hints)
    return CurrentModel(release.manifest, release.messages[-1][1], weights, None)


@pytest.mark.parametrize(
    ("model_version", "trained_mark", "eligible", "stopping", "expected"),
    [
        (3, 3, True, False, True),  # v3 never trained on (mark 3 = v2 done)
        (3, 4, True, False, False),  # v3 done already
        (None, 0, True, False, False),  # no model
        (3, 0, False, False, False),  # not eligible
        (3, 0, True, True, False),  # stopping
        (0, 0, True, False, True),  # the first model
    ],
)
def test_should_train_once_per_version_when_eligible(
    model_version: int | None, trained_mark: int, eligible: bool, stopping: bool, expected: bool
) -> None:
    assert (
        should_train(
            model_version=model_version,
            trained_mark=trained_mark,
            eligible=eligible,
            stopping=stopping,
        )
        is expected
    )


def test_training_job_takes_hints_capped_by_the_device_limits() -> None:
    # Arrange
    limits = TrainingLimits(max_epochs=2, batch_size=16, lr=0.05, max_steps=40, max_threads=3)
    held = model(7, TrainingHints(local_epochs=5, batch_size=64, lr=0.2))

    # Act
    job = training_job(held, SPEC, limits, DATA, "pi-1")

    # Assert
    assert (job.epochs, job.batch_size, job.lr) == (2, 64, 0.2)  # epochs capped at 2
    assert (job.max_steps, job.threads, job.base_version) == (40, 3, 7)
    assert job.seed == (device_seed("pi-1") + 7) % 2**31


def test_training_job_without_hints_uses_the_device_limits() -> None:
    limits = TrainingLimits(max_epochs=3, batch_size=16, lr=0.05)

    job = training_job(model(0), SPEC, limits, DATA, "pi-2")

    assert (job.epochs, job.batch_size, job.lr) == (3, 16, 0.05)
    assert job.seed != training_job(model(0), SPEC, limits, DATA, "pi-3").seed


@pytest.mark.parametrize(
    ("failed", "requested", "timed_out", "expected"),
    [
        (True, AbortReason.INELIGIBLE, True, AbortReason.ERROR),
        (False, AbortReason.INELIGIBLE, True, AbortReason.INELIGIBLE),
        (False, None, True, AbortReason.TIMEOUT),
        (False, None, False, AbortReason.STOPPING),
    ],
)
def test_abort_reason_precedence(
    failed: bool, requested: AbortReason | None, timed_out: bool, expected: AbortReason
) -> None:
    assert abort_reason(failed=failed, requested=requested, timed_out=timed_out) is expected


def test_only_errors_and_timeouts_give_a_version_up() -> None:
    assert [r for r in AbortReason if marks_version_done(r)] == [
        AbortReason.TIMEOUT,
        AbortReason.ERROR,
    ]


def test_gate_keeps_the_first_reason_of_a_running_training_only() -> None:
    gate = TrainingGate()
    gate.abort(AbortReason.INELIGIBLE)  # nothing runs: the flag, but no reason
    assert gate.reason is None
    gate.begin()
    assert not gate.aborted()
    gate.abort(AbortReason.INELIGIBLE)
    gate.abort(AbortReason.STOPPING)
    assert gate.aborted()
    assert gate.reason is AbortReason.INELIGIBLE
    gate.end()
    gate.begin()
    assert gate.reason is None


def test_gate_is_polled_from_another_thread() -> None:
    gate = TrainingGate()
    gate.begin()
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(gate.aborted()))
    gate.abort(AbortReason.STOPPING)
    thread.start()
    thread.join()
    assert seen == [True]


@pytest.mark.parametrize(
    ("probe_failed", "decision", "training", "has_model", "expected"),
    [
        (True, ["on_battery"], False, True, ("probe_failed",)),
        (False, ["on_battery", "hot"], False, True, ("on_battery", "hot")),
        (False, [], False, False, ("no_model",)),
        (False, [], True, False, ()),  # training (on a model being replaced): no reason
        (False, None, False, False, ()),  # no eligibility decision yet
        (False, [], False, True, ()),
    ],
)
def test_presence_reasons(
    probe_failed: bool,
    decision: list[str] | None,
    training: bool,
    has_model: bool,
    expected: tuple[str, ...],
) -> None:
    assert (
        presence_reasons(
            probe_failed=probe_failed,
            decision_reasons=decision,
            training=training,
            has_model=has_model,
        )
        == expected
    )


def test_status_line() -> None:
    assert (
        status_line(
            status=DeviceStatus.IDLE,
            model_version=3,
            connected=True,
            spool_depth=0,
            updates_sent=12,
            reasons=(),
        )
        == "idle; model v3; connected; spool 0; sent 12"
    )
    assert (
        status_line(
            status=DeviceStatus.ONLINE,
            model_version=None,
            connected=False,
            spool_depth=2,
            updates_sent=0,
            reasons=("on_battery", "metered"),
        )
        == "online; no model; disconnected; spool 2; sent 0; not eligible: on_battery,metered"
    )
