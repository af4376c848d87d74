"""The one workload ``bench/vs_peers.py`` gives every simulator, as the peers load it.

Runs inside the peer venvs (torch and numpy only). ``bench/vs_peers.py`` writes the arrays to an
``.npz`` (``$EDGEFL_BENCH_WORKLOAD``): the mnist1d train/test split from ``edgefl.data``, the
Dirichlet(0.5) partition into 100 clients (index arrays, concatenated with offsets), the initial
weights (edgefl's flat vector) and the settings (JSON). The model is edgefl's own
:class:`edgefl.models.torch_models.Mnist1dCnn`, imported from the source tree (torch only), so
the peers train exactly the same network from exactly the same start.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as fn

from edgefl.models.torch_models import Mnist1dCnn, load_flat


@dataclass(frozen=True)
class Workload:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    offsets: np.ndarray  # client c owns part_index[offsets[c]:offsets[c+1]]
    part_index: np.ndarray
    init: np.ndarray
    settings: dict[str, Any]

    @property
    def clients(self) -> int:
        return len(self.offsets) - 1

    def client_data(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.part_index[self.offsets[c] : self.offsets[c + 1]]
        return torch.from_numpy(self.x_train[idx]), torch.from_numpy(self.y_train[idx])


@functools.cache
def load(path: str | None = None) -> Workload:
    """The workload at ``path`` (default ``$EDGEFL_BENCH_WORKLOAD``), loaded once per process."""
    with np.load(path or os.environ["EDGEFL_BENCH_WORKLOAD"]) as z:
        arrays = {k: z[k] for k in z.files}
    settings = json.loads(str(arrays.pop("settings")))
    return Workload(**arrays, settings=settings)


def new_model(wl: Workload) -> Mnist1dCnn:
    """edgefl's mnist1d CNN holding the workload's initial weights."""
    model = Mnist1dCnn()
    load_flat(model, wl.init)
    return model


def local_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """The plain torch loop a peer's user writes: ``epochs`` passes over a fresh permutation in
    batches of ``batch_size``, SGD at ``lr`` on the batch mean cross-entropy. Mean loss back."""
    s = load().settings
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"])
    rng = np.random.default_rng(seed)
    total, seen = 0.0, 0
    model.train()
    for _ in range(s["epochs"]):
        perm = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), s["batch_size"]):
            idx = perm[start : start + s["batch_size"]]
            opt.zero_grad()
            loss = fn.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


def accuracy(model: torch.nn.Module, wl: Workload) -> float:
    """Test accuracy of ``model`` on the workload's held-out split."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(wl.x_test))
    return float((logits.argmax(1).numpy() == wl.y_test).mean())


def report(
    system: str, updates: int, train_wall_s: float, acc: float, round_ends: list[float]
) -> None:
    """The result line ``bench/vs_peers.py`` reads (the last ``PEER_RESULT`` line of stdout).
    ``round_ends`` (``perf_counter`` at the end of each round) gives the steady rate: the
    updates of rounds 2.. over the time from the end of round 1 to the end of the last."""
    line = {"system": system, "updates": updates, "train_wall_s": train_wall_s, "accuracy": acc}
    if len(round_ends) > 1:
        per_round = updates / len(round_ends)
        steady = per_round * (len(round_ends) - 1) / (round_ends[-1] - round_ends[0])
        line["steady_updates_per_s"] = steady
    print("PEER_RESULT " + json.dumps(line), flush=True)
