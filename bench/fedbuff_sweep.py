"""Where FedBuff's defaults come from: a small coordinate sweep on the default fleet.

The default ``edgefl sim`` fleet (:class:`firmware_sim.scenario.SimConfig` defaults) is run once
with synchronous FedAvg (the reference: its virtual time and updates to target), then FedBuff is
swept one setting at a time, starting from the current defaults and keeping the best value of
each axis before moving to the next (coordinate descent; a full grid does not fit 2 shared
cores):

* ``buffer_size`` K, ``concurrency`` C, ``staleness``, ``normalisation``, ``server_lr``,
  ``server_momentum``. FedAvg selects C devices per round and uses the same server optimizer
  (``--server-lr`` and ``--server-momentum`` apply to both), so the reference is re-run when C or
  the server optimizer changes.

Score of a FedBuff run: its virtual time to target, if it used at most ``1.2x`` FedAvg's
updates to target (the issue's budget), else infinity. Every run is printed; the best setting
is the last line. docs/SIMULATOR.md records the output.

    python bench/fedbuff_sweep.py [--seed 7] [--devices N] [--profile P] [--axes A,B] [--quick]
                                  [--json]

``--axes`` sweeps only the named axes (e.g. ``buffer_size``), ``--quick`` only K and C;
``--profile`` runs the sweep on another fleet (the robustness check of a default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

UPDATE_BUDGET = 1.2
"""FedBuff may use at most this many times FedAvg's updates to target."""

AXES: dict[str, tuple[Any, ...]] = {
    "buffer_size": (2, 3, 4, 5, 10),
    "concurrency": (20, 50),
    "staleness": ("polynomial:0.5", "constant"),
    "normalisation": ("mean", "sum"),
    "server_lr": (1.0, 2.0),
    "server_momentum": (0.0, 0.5),
}
QUICK_AXES = ("buffer_size", "concurrency")


def _run(cfg: Any, scenario: Any) -> dict[str, Any]:
    from firmware_sim.virtual import run_virtual

    t = time.perf_counter()
    s = run_virtual(cfg, scenario=scenario).record.summary(cfg.stop.target)
    return {
        "time_to_target_s": s["time_to_target_s"],
        "updates_to_target": s["updates_to_target"],
        "staleness_mean": s["staleness_applied"]["mean"],
        "bottleneck": s.get("bottleneck"),
        "wall_s": round(time.perf_counter() - t, 1),
    }


def _score(run: dict[str, Any], reference: dict[str, Any], max_updates: int) -> float:
    """FedBuff's time to target within the update budget (a FedAvg reference that never
    reached the target used more than ``max_updates``), else infinity."""
    ttt, updates = run["time_to_target_s"], run["updates_to_target"]
    budget = UPDATE_BUDGET * (reference["updates_to_target"] or max_updates)
    if ttt is None or updates is None or updates > budget:
        return math.inf
    return float(ttt)


def sweep(
    seed: int, devices: int | None, axes: tuple[str, ...], profile: str | None = None
) -> dict[str, Any]:
    """The coordinate sweep over ``axes`` (see module docstring)."""
    from firmware_sim.record import Algorithm
    from firmware_sim.scenario import SimConfig, build_scenario

    base = SimConfig.build(seed=seed, max_updates=10_000)
    if devices is not None:
        base = base.replace(devices=devices)
    if profile is not None:
        base = base.replace(profile=profile)
    scenario = build_scenario(base)
    best = {axis: getattr(base, axis) for axis in AXES}
    references: dict[tuple[Any, ...], dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []

    def reference(setting: dict[str, Any]) -> dict[str, Any]:
        """FedAvg at the same C and the same server optimizer (both algorithms get them)."""
        shared = {k: setting[k] for k in ("concurrency", "server_lr", "server_momentum")}
        key = tuple(shared.values())
        if key not in references:
            cfg = base.replace(algorithm=Algorithm.FEDAVG, **shared)
            references[key] = _run(cfg, scenario)
            print(f"fedavg {shared}: {references[key]}", flush=True)
        return references[key]

    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    for axis in axes:
        scores = {}
        for value in AXES[axis]:
            setting = {**best, axis: value}
            key = tuple(setting.values())
            if key not in done:  # the axis' current best was run on an earlier axis
                cfg = base.replace(algorithm=Algorithm.FEDBUFF, **setting)
                ref = reference(setting)
                done[key] = {**setting, **_run(cfg, scenario)}
                done[key]["score"] = _score(done[key], ref, base.stop.max_updates or 0)
                runs.append(done[key])
                print(json.dumps(done[key]), flush=True)
            scores[value] = done[key]["score"]
        best[axis] = min(scores, key=lambda v: scores[v])
    ref = reference(best)
    final = done[tuple(best.values())]
    speedup = None
    if final["time_to_target_s"] and ref["time_to_target_s"]:
        speedup = ref["time_to_target_s"] / final["time_to_target_s"]
    print(f"best: {json.dumps(best)} speed-up {speedup}", flush=True)
    return {"best": best, "speedup_vs_fedavg": speedup, "fedavg": ref, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--axes", default=None, help=f"comma-separated, of {', '.join(AXES)}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    axes = QUICK_AXES if args.quick else tuple(AXES)
    if args.axes is not None:
        axes = tuple(a.strip() for a in args.axes.split(",") if a.strip())
        unknown = [a for a in axes if a not in AXES]
        if unknown:
            parser.error(f"--axes: unknown {', '.join(unknown)}; known: {', '.join(AXES)}")
    result = sweep(args.seed, args.devices, axes, args.profile)
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
