"""pfl 0.6.0 FedAvg with its SimulatedBackend on the ``bench/vs_peers.py`` workload.

Run by ``bench/vs_peers.py`` in its cached pfl venv, once in a single process and once in
``N`` worker processes (``PFL_WORKER_ADDRESSES``/``PFL_WORKER_RANK``, pfl's own multi-worker
set-up over torch.distributed/gloo: each worker trains its share of every cohort). Updates are
weighted by the number of examples (``WeightByDatapoints``), the central optimizer is SGD with
lr 1 (plain FedAvg), local training is pfl's loop (SGD, ``batch_size``, ``epochs``) over each
client's data in a fixed shuffled order. The timed part is ``algorithm.run``; rank 0 evaluates
the final central model on the test split.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
import workload
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch.nn import functional as fn

from edgefl.models.torch_models import Mnist1dCnn


class PflCnn(Mnist1dCnn):
    """edgefl's CNN with the ``loss`` and ``metrics`` methods pfl calls."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return fn.cross_entropy(self(x), y)

    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict[str, Any]:
        self.eval() if eval else self.train()
        with torch.no_grad():
            logits = self(x)
        loss = float(fn.cross_entropy(logits, y, reduction="sum"))
        return {"loss": Weighted(loss, len(y))}


class RoundClock(TrainingProcessCallback):  # type: ignore[misc]
    """Notes when each central iteration ends."""

    def __init__(self) -> None:
        self.round_ends: list[float] = []

    def after_central_iteration(
        self, aggregate_metrics: Any, model: Any, *, central_iteration: int
    ) -> tuple[bool, Any]:
        self.round_ends.append(time.perf_counter())
        return False, Metrics()


def _federated(wl: workload.Workload) -> FederatedDataset:
    users = {}
    for c in range(wl.clients):
        x, y = wl.client_data(c)
        perm = torch.from_numpy(np.random.default_rng(c).permutation(len(y)))
        users[c] = [x[perm], y[perm]]
    sampler = get_user_sampler("random", list(users))
    sizes = {c: len(d[1]) for c, d in users.items()}
    return FederatedDataset(
        lambda c: Dataset(users[c], user_id=c), sampler, user_id_to_weight=sizes
    )


def main() -> None:
    threads = os.environ.get("EDGEFL_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    np.random.seed(0)  # the same cohorts on every worker
    torch.manual_seed(0)
    wl = workload.load()
    s = wl.settings
    net = PflCnn()
    net.load_state_dict(workload.new_model(wl).state_dict())
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    data = _federated(wl)
    backend = SimulatedBackend(
        training_data=data, val_data=data, postprocessors=[WeightByDatapoints()]
    )
    params = NNAlgorithmParams(
        central_num_iterations=s["rounds"],
        evaluation_frequency=s["rounds"],
        train_cohort_size=s["cohort"],
        val_cohort_size=0,
    )
    train = NNTrainHyperParams(
        local_learning_rate=s["lr"], local_num_epochs=s["epochs"], local_batch_size=s["batch_size"]
    )
    clock = RoundClock()
    t0 = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=params,
        backend=backend,
        model=model,
        model_train_params=train,
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[clock],
    )
    wall = time.perf_counter() - t0
    if int(os.environ.get("PFL_WORKER_RANK", "0")) == 0:
        workers = len(os.environ.get("PFL_WORKER_ADDRESSES", "x").split(","))
        acc = workload.accuracy(net, wl)
        workload.report(f"pfl-{workers}p", s["rounds"] * s["cohort"], wall, acc, clock.round_ends)


if __name__ == "__main__":
    main()
