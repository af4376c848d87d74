"""Flower 1.40 FedAvg simulation (Ray backend) of the ``bench/vs_peers.py`` workload.

Run by ``bench/vs_peers.py`` in its cached Flower venv with ``PYTHONPATH`` holding the edgefl
source tree and this directory. Ray gets 2 CPUs and each ClientApp 1 CPU (so 2 clients train at
once); the strategy samples ``cohort`` of the 100 supernodes per round, without federated
evaluation. The timed part is ``strategy.start`` (all rounds, Ray's actor start included); the
global model is evaluated on the test split afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import workload
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # 1 CPU per client
    wl = workload.load()
    pid = int(context.node_config["partition-id"])
    model = workload.new_model(wl)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = wl.client_data(pid)
    seed = 1000 * int(msg.content["config"]["server-round"]) + pid
    loss = workload.local_train(model, x, y, seed)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


server = ServerApp()


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, noting when each round's aggregation ends."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_ends: list[float] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        out = super().aggregate_train(server_round, replies)
        self.round_ends.append(time.perf_counter())
        return out


@server.main()
def main(grid: Grid, context: Context) -> None:
    wl = workload.load()
    s = wl.settings
    model = workload.new_model(wl)
    strategy = TimedFedAvg(
        fraction_train=s["cohort"] / wl.clients,
        fraction_evaluate=0.0,
        min_train_nodes=s["cohort"],
        min_available_nodes=wl.clients,
    )
    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=s["rounds"]
    )
    wall = time.perf_counter() - t0
    model.load_state_dict(result.arrays.to_torch_state_dict())
    acc = workload.accuracy(model, wl)
    workload.report("flower", s["rounds"] * s["cohort"], wall, acc, strategy.round_ends)


if __name__ == "__main__":
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=workload.load().clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )
