"""Central differential privacy: accuracy against epsilon on the demo workload.

Runs the virtual fleet simulator (mnist1d, the simulator's default fleet of 100 devices: mixed
profiles, Dirichlet(0.5) data, 20 devices training at once) once per epsilon with central DP at
the aggregator, and once without privacy (epsilon = infinity: the same clip to C, as a static
norm bound, without noise or caps), all with the same update budget, buffer size K, server
optimizer and ``sum`` normalisation, so that only the noise and the caps differ.

For each finite epsilon the noise multiplier z is calibrated
(:func:`edgefl.privacy.calibrate_noise`, RDP accountant, ``delta = min(1e-5, 1/N)``) so that
every device may take part in ``--participations`` flushes; each run's update budget is
``slack * N * participations`` received updates (an update past its device's cap is rejected,
``dp_budget_exhausted``; a second one in a buffer ``dp_one_per_buffer``).

    nice python bench/privacy.py [--json] [--quick] [--devices N] [--epsilons 1,4,8]

Prints one row per epsilon: z, the cap, K, fleet size, final accuracy, updates received and
applied, flushes, wall time, and the largest participation count with its epsilon. With
``--json`` the last line is ``{"rows": [{"epsilon": ..., "delta": ..., "accuracy": ...,
"updates": ...}, ...]}`` (epsilon infinity as null; ``updates`` = updates received by the end).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from edgefl.aggregation import Normalisation
from edgefl.errors import EdgeflError
from edgefl.privacy import CentralDP, calibrate_noise
from edgefl.training import LocalTrainConfig
from firmware_sim.scenario import Scenario, SimConfig, build_scenario
from firmware_sim.virtual import VirtualSimulator


@dataclass(frozen=True)
class Plan:
    devices: int
    buffer_size: int
    concurrency: int
    participations: int
    clip: float
    server_lr: float
    server_momentum: float
    epsilons: tuple[float, ...]
    seed: int
    slack: float = 1.5
    local_epochs: int = 1

    @property
    def delta(self) -> float:
        return min(1e-5, 1.0 / self.devices)

    @property
    def max_updates(self) -> int:
        return int(self.slack * self.devices * self.participations)


def _base_config(plan: Plan) -> SimConfig:
    return SimConfig.build(
        devices=plan.devices,
        dataset="mnist1d",
        buffer_size=plan.buffer_size,
        concurrency=plan.concurrency,
        normalisation=Normalisation.SUM,
        norm_bound="off",
        staleness="polynomial:0.5",
        server_lr=plan.server_lr,
        server_momentum=plan.server_momentum,
        stop_at_target=False,
        max_updates=plan.max_updates,
        eval_every_updates=plan.max_updates // 10,
        seed=plan.seed,
        local=LocalTrainConfig(epochs=plan.local_epochs),
    )


def _privacy(plan: Plan, eps: float) -> CentralDP:
    z = calibrate_noise(eps, plan.participations, delta=plan.delta)
    return CentralDP(
        clip_norm=plan.clip,
        noise_multiplier=z,
        delta=plan.delta,
        target_epsilon=eps,
        seed=plan.seed,  # reproducible noise: a benchmark, not a deployment
    )


def _run(plan: Plan, scenario: Scenario, eps: float | None) -> dict[str, Any]:
    privacy = None if eps is None else _privacy(plan, eps)
    cfg = _base_config(plan).replace(privacy=privacy)
    if privacy is None:  # the same clip to C, without noise, cap or one-per-buffer rule
        cfg = cfg.replace(norm_bound=f"{plan.clip:g}")
    t0 = time.perf_counter()
    sim = VirtualSimulator(replace(scenario, config=cfg), label=f"eps={eps}")
    diverged = False
    try:
        sim.run()
    except EdgeflError:  # the noise drove the model to NaN: a device's training failed
        diverged = True
    wall = time.perf_counter() - t0
    spent = getattr(sim.core.statistics(), "privacy", None)
    record = sim.record
    counts = record.outcome_counts()
    evals = record.evals()
    row: dict[str, Any] = {
        "epsilon": eps,
        "delta": plan.delta if eps is not None else None,
        "accuracy": round(float(evals.accuracy[-1]), 4),
        "diverged": diverged,
        "updates": sum(counts.values()),
        "applied": counts.get("applied", 0),
        "budget_exhausted": counts.get("rejected:dp_budget_exhausted", 0),
        "one_per_buffer": counts.get("rejected:dp_one_per_buffer", 0),
        "flushes": sim.core.version,
        "wall_s": round(wall, 1),
        "noise_multiplier": None if privacy is None else round(privacy.noise_multiplier, 4),
        "cap": None if privacy is None else privacy.participation_cap,
    }
    row["participation_max"] = None if spent is None else spent.participation_max
    row["spent_epsilon"] = None if spent is None else round(spent.epsilon, 3)
    return row


def _print_row(plan: Plan, row: dict[str, Any]) -> None:
    eps = "inf" if row["epsilon"] is None else f"{row['epsilon']:g}"
    z = "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
    cap = "-" if row["cap"] is None else str(row["cap"])
    spent = (
        "-"
        if row["spent_epsilon"] is None
        else f"{row['participation_max']}, {row['spent_epsilon']:.3f}"
    )
    print(
        f"| {eps:>3} | {z:>6} | {cap:>3} | {plan.buffer_size} | {plan.devices} | "
        f"{100 * row['accuracy']:5.1f}% | {row['updates']:>5} | {row['applied']:>5} | "
        f"{row['flushes']:>4} | {row['wall_s']:>6.1f} s | {spent} |"
        f"{' diverged' if row['diverged'] else ''}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=100, help="fleet size N (default: 100)")
    ap.add_argument("-k", "--buffer-size", type=int, default=10, help="K (default: 10)")
    ap.add_argument("--concurrency", type=int, default=20, help="devices training at once")
    ap.add_argument("--participations", type=int, default=10, help="flushes per device")
    ap.add_argument("--clip", type=float, default=0.3, help="clip norm C (default: 0.3)")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, default=0.0)
    ap.add_argument(
        "--slack", type=float, default=1.5, help="update budget: slack * N * participations"
    )
    ap.add_argument("--epsilons", default="1,4,8", help="finite epsilons (comma-separated)")
    ap.add_argument("--local-epochs", type=int, default=1, help="local epochs per update")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="epsilon 8 and infinity only")
    ap.add_argument("--json", action="store_true", help="print the JSON result last")
    args = ap.parse_args(argv)
    epsilons = tuple(float(e) for e in args.epsilons.split(",") if e)
    if args.quick:
        epsilons = (8.0,)
    given = {f.name: getattr(args, f.name) for f in fields(Plan) if f.name != "epsilons"}
    plan = Plan(epsilons=epsilons, **given)
    scenario = build_scenario(_base_config(plan))
    print(
        f"mnist1d, {plan.devices} devices, K = {plan.buffer_size}, concurrency "
        f"{plan.concurrency}, C = {plan.clip:g}, {plan.participations} participations per "
        f"device, delta = {plan.delta:g}, server SGD lr {plan.server_lr:g} momentum "
        f"{plan.server_momentum:g}, {plan.max_updates} updates per run",
        flush=True,
    )
    print(
        "| eps | z | cap | K | N | accuracy | updates | applied | flushes | wall "
        "| max participations, their epsilon |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for eps in (*plan.epsilons, None):
        row = _run(plan, scenario, eps)
        _print_row(plan, row)
        rows.append(row)
    if args.json:
        keys = ("epsilon", "delta", "accuracy", "updates")
        print(json.dumps({"rows": [{k: r[k] for k in keys} for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
