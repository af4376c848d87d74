"""TorchTrainer honours the Trainer contract: delta = local - base, stops on should_stop, evaluates
the global model on held-out data, lowers only its own thread's priority."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.datasets import load_digits

from device_agent.dataset import LocalDataset
from device_agent.trainer import ProcessTrainer, TorchTrainer, TrainJob, lower_thread_priority
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.training import LocalTrainConfig, evaluate, train_local

SPEC = get_model_spec("digits-mlp")


def job(**overrides: object) -> TrainJob:
    d = load_digits()
    data = LocalDataset.split(
        (d.data[:120] / 16).astype(np.float32), d.target[:120].astype(np.int64), 0.25, seed=0
    )
    base = init_weights_numpy(SPEC, 0)
    base.setflags(write=False)
    values: dict[str, object] = {
        "spec": SPEC,
        "base_version": 4,
        "base_weights": base,
        "data": data,
        "epochs": 2,
        "batch_size": 10,
        "lr": 0.1,
        "seed": 7,
    }
    values.update(overrides)
    return TrainJob(**values)  # type: ignore[arg-type]


def test_delta_is_local_minus_base_and_matches_edgefl_training() -> None:
    # Arrange
    j = job()
    expected = train_local(
        SPEC,
        j.base_weights,
        j.data.x_train,
        j.data.y_train,
        LocalTrainConfig(epochs=2, batch_size=10, lr=0.1, seed=7),
        threads=j.threads,  # as the trainer runs: other thread counts sum in another order
    )
    accuracy, _ = evaluate(SPEC, j.base_weights, j.data.x_test, j.data.y_test)

    # Act
    result = TorchTrainer().train(j, lambda: False)

    # Assert
    assert result is not None
    np.testing.assert_array_equal(result.delta, expected.delta)
    assert result.num_examples == 90
    assert result.metrics["steps"] == 18  # 2 epochs x ceil(90 / 10)
    assert result.global_accuracy == accuracy
    assert np.isfinite(result.metrics["loss"])
    assert not j.base_weights.flags.writeable  # the base model was not touched


def test_should_stop_mid_training_returns_none() -> None:
    # Arrange: stop after 3 polls (the trainer polls before every batch)
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > 3

    # Act
    result = TorchTrainer().train(job(), should_stop)

    # Assert
    assert result is None
    assert calls[0] == 4


def test_lower_thread_priority_affects_only_the_calling_thread_and_is_idempotent() -> None:
    # Arrange
    seen: dict[str, int] = {}

    def worker(action: Callable[[], None]) -> None:
        action()
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    target = min(19, main_before + 5)

    def twice() -> None:
        lower_thread_priority(target)
        lower_thread_priority(target)

    # Act
    t = threading.Thread(target=worker, args=(twice,))
    t.start()
    t.join()

    # Assert
    assert seen["worker"] == target
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_process_trainer_gives_the_same_delta_and_stops_on_request() -> None:
    # Arrange
    j = job()
    expected = TorchTrainer().train(j, lambda: False)
    trainer = ProcessTrainer(TorchTrainer)
    started = time.monotonic()

    # Act
    result = trainer.train(j, lambda: False)
    stopped = trainer.train(job(epochs=10_000), lambda: time.monotonic() - started > 0.5)

    # Assert: bit-identical delta from the child, and an abort is honoured (no result)
    assert expected is not None
    assert result is not None
    np.testing.assert_array_equal(result.delta, expected.delta)
    assert result.metrics["steps"] == expected.metrics["steps"]
    assert stopped is None


def test_process_trainer_reports_a_failing_child_as_error() -> None:
    bad = job(
        data=LocalDataset(
            np.ones((4, 7), np.float32),
            np.zeros(4, np.int64),
            np.ones((0, 7), np.float32),
            np.zeros(0, np.int64),
        )
    )

    with pytest.raises(RuntimeError, match="training process failed: DataSourceError"):
        ProcessTrainer(TorchTrainer).train(bad, lambda: False)


@pytest.mark.parametrize("sent", [b"", b"truncated"], ids=["closed", "truncated"])
def test_a_training_child_whose_parent_stopped_while_sending_the_job_exits_quietly(
    sent: bytes,
) -> None:
    """The agent stopped (or died) while its job was still being written to the child: the
    child gets a closed pipe or a truncated pickle, reports nothing and raises nothing (it used
    to print an UnpicklingError traceback into the agent's journal)."""
    import multiprocessing
    import pickle

    from device_agent.trainer import _train_in_child

    ctx = multiprocessing.get_context("spawn")
    job_receiver, job_sender = ctx.Pipe(duplex=False)
    result_receiver, result_sender = ctx.Pipe(duplex=False)
    if sent:
        job_sender.send_bytes(pickle.dumps(("job", np.zeros(1000)))[:40])
    job_sender.close()

    _train_in_child(TorchTrainer, job_receiver, ctx.Event(), result_sender)

    result_sender.close()
    with pytest.raises(EOFError):
        result_receiver.recv()
