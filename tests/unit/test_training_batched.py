"""Batched device training gives the same bits as training each device alone.

The stacked kernels (:mod:`edgefl.stacked_nets`) compute the exact gradient (checked against
torch autograd), and a device's result does not depend on which devices share its stack, how
many threads run, or whether the virtual simulator batched it (checked bit for bit)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from edgefl.aggregation import Algorithm
from edgefl.data.datasets import Dataset, load_dataset
from edgefl.models.spec import get_model_spec
from edgefl.models.torch_models import build_module, init_weights, load_flat
from edgefl.stacked_nets import stacked_net
from edgefl.training import LocalTrainConfig, OptimizerKind, train_local, train_many
from firmware_sim import virtual
from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.virtual import VirtualSimulator


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    cache = Path(tmp_path_factory.mktemp("edgefl-cache"))
    return load_dataset("mnist1d", seed=0, num_samples=6_000, cache_dir=cache)


@pytest.mark.parametrize("model", ["mnist1d-cnn", "digits-mlp", "mlp-5k"])
def test_stacked_loss_and_gradient_equal_autograd(model: str) -> None:
    # Arrange: two devices with different weights; device 1's batch has 3 masked padding rows
    spec = get_model_spec(model)
    rng = np.random.default_rng(3)
    w = np.stack([init_weights(spec, 1), init_weights(spec, 2)])
    x = rng.normal(size=(2, 10, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=(2, 10))
    m = np.ones((2, 10), dtype=np.float32)
    m[1, 7:] = 0.0

    # Act
    loss, grad = stacked_net(spec).loss_and_grad(
        torch.from_numpy(w), torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)
    )

    # Assert: the mean cross-entropy of the unmasked rows and its autograd gradient
    for g, n in ((0, 10), (1, 7)):
        module = build_module(spec)
        load_flat(module, w[g])
        ref = torch.nn.functional.cross_entropy(
            module(torch.from_numpy(x[g, :n])), torch.from_numpy(y[g, :n])
        )
        ref.backward()  # type: ignore[no-untyped-call]
        ref_grad = torch.cat([p.grad.reshape(-1) for p in module.parameters()])  # type: ignore[union-attr]
        assert float(loss[g]) == pytest.approx(float(ref.detach()), rel=1e-6)
        np.testing.assert_allclose(grad[g].numpy(), ref_grad.numpy(), rtol=1e-4, atol=1e-7)


def _devices(ds: Dataset, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    starts = np.cumsum([0, *sizes])
    return [(ds.x_train[a:b], ds.y_train[a:b]) for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize(
    "cfg",
    [
        LocalTrainConfig(epochs=1, batch_size=32, lr=0.1),
        LocalTrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3),
        LocalTrainConfig(epochs=1, batch_size=20, lr=1e-2, optimizer=OptimizerKind.ADAM),
    ],
    ids=["sgd", "momentum-wd", "adam"],
)
def test_a_device_gets_the_same_bits_alone_or_in_any_stack(
    mnist1d: Dataset, cfg: LocalTrainConfig
) -> None:
    # Arrange: 24 devices of 1 to 200 examples (1 to 7 batches, short last batches), 3 bases
    spec = get_model_spec("mnist1d-cnn")
    sizes = [1, 200, 37, 64, 150, 33, 100, 5, 96, 121, 17, 80] * 2
    data = _devices(mnist1d, sizes)
    bases = np.stack([init_weights(spec, i % 3) for i in range(len(sizes))])
    seeds = [7 * i + 1 for i in range(len(sizes))]
    alone = [
        train_local(spec, bases[i], x, y, dataclasses.replace(cfg, seed=seeds[i]), threads=1)
        for i, (x, y) in enumerate(data)
    ]

    # Act: stacks of 1, 5 and 24 devices (longest plans first), on one and two threads
    runs = {
        (stack, threads): train_many(
            spec,
            bases,
            data,
            cfg,
            seeds=seeds,
            threads=threads,
            max_devices_per_call=stack,
            batched=True,
        )
        for stack, threads in [(1, 1), (5, 1), (24, 1), (24, 2)]
    }

    # Assert
    for key, results in runs.items():
        for i, (a, b) in enumerate(zip(alone, results, strict=True)):
            assert np.array_equal(a.delta, b.delta), f"device {i} differs in stack {key}"
            assert a.loss == b.loss
            assert a.steps == b.steps


def test_mlp_device_gets_the_same_bits_alone_or_stacked() -> None:
    # Arrange
    spec = get_model_spec("digits-mlp")
    ds = load_dataset("digits", seed=0)
    data = _devices(ds, [50, 3, 90, 41, 64, 10, 77])
    cfg = LocalTrainConfig(epochs=2, batch_size=16, momentum=0.5, seed=4)
    base = init_weights(spec, 0)

    # Act
    stacked = train_many(spec, base, data, cfg, threads=1, batched=True)
    alone = [
        train_local(spec, base, x, y, dataclasses.replace(cfg, seed=4 + i))
        for i, (x, y) in enumerate(data)
    ]

    # Assert
    for a, b in zip(alone, stacked, strict=True):
        assert np.array_equal(a.delta, b.delta)


class _RecordingSimulator(VirtualSimulator):
    """The real simulator, keeping every computed training's inputs and delta."""

    trained: list[tuple[int, np.ndarray, int, np.ndarray]]

    def _encode(self, tr: virtual._Training) -> None:
        assert tr.delta is not None
        self.trained.append((tr.device, tr.base.copy(), tr.seed, tr.delta.copy()))
        super()._encode(tr)


def _run(cfg: SimConfig) -> _RecordingSimulator:
    sim = _RecordingSimulator(build_scenario(cfg))
    sim.trained = []
    sim.run()
    return sim


@pytest.mark.parametrize("algorithm", [Algorithm.FEDAVG, Algorithm.FEDBUFF])
def test_virtual_results_are_bit_identical_to_unbatched_training(
    algorithm: Algorithm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a small mnist1d fleet (FedAvg cohorts of 8, FedBuff 8 in flight)
    small = {"devices": 24, "profile": "lab", "num_samples": 4_000, "max_updates": 48}
    cfg = SimConfig.build(algorithm=algorithm, concurrency=8, buffer_size=4, seed=5, **small)  # type: ignore[arg-type]

    # Act: batched as shipped, then with every training in a train_many call of its own
    batched = _run(cfg)
    monkeypatch.setattr(virtual, "MAX_TRAIN_BATCH", 1)
    one_by_one = _run(cfg)

    # Assert: trainings were batched, each delta equals train_local's, and the runs agree bitwise
    assert batched.compute.train_calls < batched.compute.trainings_computed
    assert one_by_one.compute.train_calls == one_by_one.compute.trainings_computed
    spec = batched.sc.spec
    for device, base, seed, delta in batched.trained:
        x, y = batched.sc.device_data(device)
        ref = train_local(spec, base, x, y, dataclasses.replace(cfg.local, seed=seed))
        assert np.array_equal(ref.delta, delta)
    assert np.array_equal(batched.weights, one_by_one.weights)
    assert batched.record.summary(cfg.stop.target) == one_by_one.record.summary(cfg.stop.target) | {
        "wall_time_s": batched.record.summary(cfg.stop.target)["wall_time_s"]
    }


def test_flops_per_example_counts_products_and_their_gradients() -> None:
    # digits-mlp 64 -> 32 -> 10: forward MACs 64·32 + 32·10 = 2,368; the weight gradients
    # repeat them, the input gradient of the second layer adds 32·10 (none for the first)
    net = stacked_net(get_model_spec("digits-mlp"))

    assert net.flops_per_example() == 2 * (2 * 2368 + 320)
