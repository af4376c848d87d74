"""Secure aggregation against plaintext: accuracy on the demo workload (virtual simulator).

Runs the virtual fleet simulator on the demo workload (mnist1d, 100 devices of the ``mixed``
profile, Dirichlet(0.5) data, K = 4, 20 training at once) three times with the same seed and
update budget (:mod:`firmware_sim.secagg_model`):

* **plaintext** — the simulator's defaults: int8 codec, adaptive norm bound, example weights;
* **plaintext on the share schedule** — the same aggregator, its uploads timed as secure
  aggregation's (``4 P`` bytes plus the envelopes) and its lease sized for them: the same
  trainings, arrivals, refusals and versions as the next run;
* **secure aggregation** — what the leader decodes and steps with: every update clipped to
  ``C`` and encoded on the ring with stochastic rounding, the leader's integer weights
  (``--secagg-weight-scale``, the example cap), the norm bound off, the share's upload.

The second against the third is the cost of the secure-aggregation arithmetic alone; the first
against the third adds the cost of the 7x bigger upload in the simulated fleet's time.

    nice python bench/secagg_accuracy.py [--json] [--updates 3000] [--clip 1.0] [--seed 0]
        [--weight-scale 256] [--weighting examples] [--example-cap 1000]

With ``--json`` the last line is ``{"accuracy_plain": ..., "accuracy_secagg": ...,
"accuracy_plain_same_schedule": ..., "late_...": ..., "clipped_fraction": ..., ...}``;
``late`` is the mean of the last 5 of 20 evaluations (the last quarter of the run).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from edgefl.aggregation import ExampleWeighting
from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.secagg_model import (
    LeaderModel,
    SameScheduleSimulator,
    SecAggSimulator,
    accuracies,
)
from firmware_sim.virtual import VirtualSimulator

EVALS = 20


def _run(sim: VirtualSimulator) -> dict[str, Any]:
    t0 = time.perf_counter()
    sim.run()
    counts = sim.record.outcome_counts()
    final, late = accuracies(sim)
    return {
        "accuracy": final,
        "late": late,
        "versions": sim.core.version,
        "applied": counts.get("applied", 0),
        "refused": {k: v for k, v in sorted(counts.items()) if k != "applied"},
        "wall": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--weight-scale", type=int, default=256)
    parser.add_argument("--weighting", type=ExampleWeighting, default=ExampleWeighting.EXAMPLES)
    parser.add_argument("--example-cap", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = SimConfig.build(
        devices=args.devices,
        dataset="mnist1d",
        stop_at_target=False,
        max_updates=args.updates,
        eval_every_updates=max(1, args.updates // EVALS),
        seed=args.seed,
    )
    scenario = build_scenario(base)
    leader = LeaderModel(
        clip_norm=args.clip,
        weight_scale=args.weight_scale,
        weighting=args.weighting,
        example_cap=args.example_cap,
    )
    plain = _run(VirtualSimulator(scenario, label="plain"))
    same = _run(SameScheduleSimulator(scenario, label="plain-same-schedule"))
    sim = SecAggSimulator(scenario, leader, label="secagg")
    secagg = _run(sim)
    print(
        f"mnist1d, {args.devices} devices, K = {base.aggregation.buffer_size}, "
        f"{args.updates} updates, seed {args.seed}; ring b = 32, "
        f"scale 2^{sim.spec.scale.bit_length() - 1}, C = {args.clip}, "
        f"W = {args.weight_scale}, {args.weighting.value} weighting (cap {args.example_cap})"
    )
    cols = (
        ("plaintext (int8)", plain),
        ("plaintext, share schedule", same),
        ("secure aggregation", secagg),
    )
    print(f"{'':16}" + "".join(f"{name:>28}" for name, _ in cols))
    print(f"{'final accuracy':16}" + "".join(f"{100 * r['accuracy']:>27.1f}%" for _, r in cols))
    print(f"{'late accuracy':16}" + "".join(f"{100 * r['late']:>27.1f}%" for _, r in cols))
    for key in ("applied", "versions"):
        print(f"{key:16}" + "".join(f"{r[key]:>28}" for _, r in cols))
    print(f"{'wall (s)':16}" + "".join(f"{r['wall']:>28.1f}" for _, r in cols))
    for name, r in cols:
        print(f"  {name}: not applied {r['refused']}")
    print(f"updates clipped to C on the device: {100 * sim.clipped_fraction:.1f}%")
    if args.json:
        print(
            json.dumps(
                {
                    "accuracy_plain": round(plain["accuracy"], 4),
                    "accuracy_secagg": round(secagg["accuracy"], 4),
                    "accuracy_plain_same_schedule": round(same["accuracy"], 4),
                    "late_plain": round(plain["late"], 4),
                    "late_secagg": round(secagg["late"], 4),
                    "late_plain_same_schedule": round(same["late"], 4),
                    "applied_plain": plain["applied"],
                    "applied_secagg": secagg["applied"],
                    "applied_plain_same_schedule": same["applied"],
                    "clipped_fraction": round(sim.clipped_fraction, 4),
                    "updates": args.updates,
                    "devices": args.devices,
                    "clip_norm": args.clip,
                    "weight_scale": args.weight_scale,
                    "weighting": args.weighting.value,
                    "example_cap": args.example_cap,
                    "scale": sim.spec.scale,
                    "seed": args.seed,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
