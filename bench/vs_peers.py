"""edgefl's virtual simulator against Flower and pfl-research on one workload, in one run.

    python bench/vs_peers.py [--json] [--rounds 30] [--skip flower,pfl]

Workload (the same for all): mnist1d from ``edgefl.data`` (16,000 train / 4,000 test), a
Dirichlet(0.5) split over 100 clients (``edgefl.data.partition``, the simulator's own split),
edgefl's mnist1d CNN from the same initial weights, 1 local epoch, batch 32, SGD lr 0.1, FedAvg
weighted by examples with server lr 1, 20 clients per round, 30 rounds (600 client updates),
test accuracy of the final model. The arrays go to one ``.npz`` that every peer script loads
(``bench/peers/workload.py``), so the data is byte-identical.

Systems, one after the other:

1. Flower 1.40 simulation, Ray backend, 2 CPUs, 1 CPU per client (``bench/peers/flower_fedavg.py``);
2. pfl 0.6.0 FedAvg, SimulatedBackend, 1 process and 2 worker processes, one torch thread each
   (``bench/peers/pfl_fedavg.py``; with torch's default 2 threads one process ran at 1 update/s
   on the loaded machine, OpenMP spinning against the other jobs);
3. edgefl's virtual simulator: lab fleet (no dropouts, crashes or deadlines: every round waits
   for its whole cohort), fp32 updates, no norm bound, evaluation only at the start and the end,
   with 1 and with 2 torch threads (``--threads``: the peers' best configurations use both
   cores too; the result is bit-identical, the accuracy proves it). The same run from the
   command line (which also evaluates every round):
   ``edgefl sim --algorithm fedavg --profile lab --devices 100 --concurrency 20
   --max-updates 600 --codec fp32 --norm-bound off --round-deadline 1e9 --target 1.0
   --threads 2``.

The peers run in cached venvs (``bench/peer_venvs.py``: ``~/.cache/edgefl-bench/``, this
project's torch pin plus the peer, from the package registry); they never become edgefl
dependencies. Each system's rate is client updates / wall seconds of its federated run (Flower:
``strategy.start``; pfl: ``algorithm.run``; edgefl: the whole virtual run), process start-up and
imports excluded. The physical limit is the machine's measured single-core matmul rate divided
by the FLOPs of one update (``StackedNet.flops_per_example`` × the mean client size × epochs).

With ``--json`` the last stdout line is one JSON object with ``ratio_vs_flower``,
``ratio_vs_pfl`` (edgefl's best configuration against pfl's best; ``edgefl_*`` is edgefl's best,
``edgefl_1t_*`` and ``edgefl_2t_*`` each thread count), each system's ``*_updates_per_s`` and
``*_accuracy``, the peers' ``*_steady_updates_per_s`` (after round 1) and
``ratio_vs_flower_steady``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from peer_venvs import venv_python  # noqa: E402

PEER_TIMEOUT_S = 1800


def _sim_config(rounds: int) -> Any:
    from edgefl.aggregation import Algorithm
    from firmware_sim.scenario import SimConfig

    return SimConfig.build(
        devices=100,
        algorithm=Algorithm.FEDAVG,
        profile="lab",
        dataset="mnist1d",
        partition="dirichlet:0.5",
        concurrency=20,
        round_deadline_s=1e9,
        max_updates=20 * rounds,
        codec="fp32",
        norm_bound="off",
        target=1.0,
        stop_at_target=False,
        eval_every_updates=10**9,
        threads=1,
    )


def write_workload(scenario: Any, rounds: int, path: Path) -> None:
    """The scenario's data, split and initial weights as the peers load them."""
    cfg = scenario.config
    settings = {
        "rounds": rounds,
        "cohort": cfg.aggregation.concurrency,
        "epochs": cfg.local.epochs,
        "batch_size": cfg.local.batch_size,
        "lr": cfg.local.lr,
    }
    ds = scenario.dataset
    np.savez(
        path,
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_test=ds.x_test,
        y_test=ds.y_test,
        offsets=np.cumsum([0] + [len(s) for s in scenario.slices]),
        part_index=np.concatenate(scenario.slices),
        init=scenario.initial_weights,
        settings=np.array(json.dumps(settings)),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peer_env(workload: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE / "peers")])
    env["EDGEFL_BENCH_WORKLOAD"] = str(workload)
    env.update(extra)
    return env


def _result(stdout: str, name: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PEER_RESULT ")]
    if not lines:
        raise RuntimeError(f"{name}: no PEER_RESULT line")
    out: dict[str, Any] = json.loads(lines[-1].removeprefix("PEER_RESULT "))
    return out


def run_peer(peer: str, script: str, workload: Path, workers: int = 1) -> dict[str, Any]:
    """Run ``bench/peers/<script>`` in the peer's venv (``workers`` processes for pfl)."""
    python = str(venv_python(peer))
    cmd = [python, str(HERE / "peers" / script)]
    if workers == 1:
        envs = [_peer_env(workload, EDGEFL_BENCH_THREADS="1")]
    else:
        addresses = ",".join(f"localhost:{_free_port()}" for _ in range(workers))
        envs = [
            _peer_env(
                workload,
                PFL_WORKER_ADDRESSES=addresses,
                PFL_WORKER_RANK=str(rank),
                EDGEFL_BENCH_THREADS="1",
            )
            for rank in range(workers)
        ]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for env in envs
    ]
    outputs = [p.communicate(timeout=PEER_TIMEOUT_S) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{script} exited {p.returncode}:\n{err[-3000:]}")
    return _result(outputs[0][0], script)


def run_edgefl(scenario: Any, threads: int = 1) -> dict[str, Any]:
    """The virtual run of ``scenario`` with ``threads`` torch threads."""
    import dataclasses

    import torch  # noqa: F401  (imported before the clock starts, as the peers' imports are)

    from firmware_sim.virtual import run_virtual

    scenario = dataclasses.replace(scenario, config=scenario.config.replace(threads=threads))
    res = run_virtual(scenario.config, scenario=scenario)
    updates = res.record.summary(scenario.config.stop.target)["updates_received"]
    return {
        "system": f"edgefl-{threads}t",
        "threads": threads,
        "updates": updates,
        "train_wall_s": res.wall_s,
        "accuracy": res.record.summary(scenario.config.stop.target)["final_accuracy"],
        "train_calls": res.train_calls,
        "train_s": res.train_wall_s,
    }


def gemm_gflops(n: int = 256, seconds: float = 1.0) -> float:
    """Best single-thread float32 matmul rate (GFLOP/s) over ``seconds`` of ``n³`` products."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b)
            best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)


def physical_limit(scenario: Any) -> dict[str, float]:
    """FLOPs per update and the updates/s one core could do at its measured matmul rate."""
    from edgefl.stacked_nets import stacked_net

    per_example = stacked_net(scenario.spec).flops_per_example()
    mean_examples = float(np.mean([len(s) for s in scenario.slices]))
    per_update = per_example * mean_examples * scenario.config.local.epochs
    gflops = gemm_gflops()
    return {
        "flops_per_update": per_update,
        "gemm_gflops_per_core": gflops,
        "physical_limit_updates_per_s_per_core": gflops * 1e9 / per_update,
    }


def _line(r: dict[str, Any]) -> str:
    rate = r["updates"] / r["train_wall_s"]
    steady = r.get("steady_updates_per_s")
    after_first = f" ({steady:.1f}/s after round 1)" if steady else ""
    return (
        f"  {r['system']:9s} {r['updates']:4d} updates in {r['train_wall_s']:7.2f} s = "
        f"{rate:8.1f} updates/s{after_first}, accuracy {100 * r['accuracy']:.2f}%"
    )


def _summary(results: dict[str, dict[str, Any]], limit: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {k: round(v, 3) for k, v in limit.items()}
    for key, r in results.items():
        out[f"{key}_updates_per_s"] = round(r["updates"] / r["train_wall_s"], 2)
        out[f"{key}_accuracy"] = r["accuracy"]
        if "steady_updates_per_s" in r:
            out[f"{key}_steady_updates_per_s"] = round(r["steady_updates_per_s"], 2)
    mine = [k for k in results if k.startswith("edgefl_")]
    best_ours = max(mine, key=lambda k: out[f"{k}_updates_per_s"])
    out["edgefl_best"] = best_ours
    ours = out["edgefl_updates_per_s"] = out[f"{best_ours}_updates_per_s"]
    out["edgefl_accuracy"] = out[f"{best_ours}_accuracy"]
    if "flower" in results:
        out["ratio_vs_flower"] = round(ours / out["flower_updates_per_s"], 2)
        if "flower_steady_updates_per_s" in out:
            out["ratio_vs_flower_steady"] = round(ours / out["flower_steady_updates_per_s"], 2)
    pfl = [k for k in results if k.startswith("pfl_")]
    if pfl:
        best = max(pfl, key=lambda k: out[f"{k}_updates_per_s"])
        out["pfl_best"] = best
        out["pfl_updates_per_s"] = out[f"{best}_updates_per_s"]
        out["pfl_accuracy"] = out[f"{best}_accuracy"]
        out["ratio_vs_pfl"] = round(ours / out["pfl_updates_per_s"], 2)
    cores = results[best_ours]["threads"]
    per_core = limit["physical_limit_updates_per_s_per_core"]
    out["edgefl_share_of_limit"] = round(ours / (per_core * cores), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--skip", default="", help="comma list of systems to skip: flower,pfl")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from firmware_sim.scenario import build_scenario

    scenario = build_scenario(_sim_config(args.rounds))
    print(f"[vs_peers] load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefl-vs-peers-") as tmp:
        workload = Path(tmp) / "workload.npz"
        write_workload(scenario, args.rounds, workload)
        runs = [
            ("flower", "flower", "flower_fedavg.py", 1),
            ("pfl_1p", "pfl", "pfl_fedavg.py", 1),
            ("pfl_2p", "pfl", "pfl_fedavg.py", 2),
        ]
        for key, peer, script, workers in runs:
            if peer in skip:
                continue
            print(f"[vs_peers] {key} ...", flush=True)
            results[key] = run_peer(peer, script, workload, workers)
            print(_line(results[key]), flush=True)
    for threads in (1, 2):
        print(f"[vs_peers] edgefl_{threads}t ...", flush=True)
        results[f"edgefl_{threads}t"] = run_edgefl(scenario, threads)
        print(_line(results[f"edgefl_{threads}t"]), flush=True)
    limit = physical_limit(scenario)
    summary = _summary(results, limit)
    print(
        f"  physical limit: {limit['flops_per_update'] / 1e6:.1f} MFLOP per update at "
        f"{limit['gemm_gflops_per_core']:.1f} GFLOP/s per core (1-thread matmul) = "
        f"{limit['physical_limit_updates_per_s_per_core']:.0f} updates/s per core; edgefl "
        f"({summary['edgefl_best']}) at {100 * summary['edgefl_share_of_limit']:.0f}% of it on "
        "the cores it used"
    )
    for key in ("ratio_vs_flower", "ratio_vs_flower_steady", "ratio_vs_pfl"):
        if key in summary:
            print(f"  {key}: {summary[key]:.1f}x")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
