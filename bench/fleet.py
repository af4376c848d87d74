"""Fleet-simulator benchmark: everything side by side in one run.

1. FedBuff vs synchronous FedAvg, virtual time to 90% on mnist1d (DESIGN.md's calibration fleet:
   100 devices, Dirichlet(0.5), 30% dropouts, log-normal(sigma = 1) training times, 1 local
   epoch, batch 32, SGD lr 0.1, staleness (1+tau)^-0.5, server SGD lr 1; FedBuff K = 5 with 20
   devices training at once, FedAvg cohorts of 20). Target: FedBuff <= 0.5x FedAvg's time.
2. Virtual updates per wall second and peak RSS at 1,000, 10,000 and 100,000 devices (same
   data per device, fixed number of updates, each size in a fresh process). Target: 100k within
   25% of 1k.
3. Live mode (``--only live``): N real agents, each with its own MQTT connection, in
   ``--workers`` processes, plus the aggregator on a private Mosquitto for a fixed wall time
   (default 60 s + 1 s per 20 agents), one fleet size after the other: when all agents were
   connected, how many were at the end, RSS (all processes; per agent; and what the agents
   added to their processes), updates/s once all were connected and over the whole run, CPU
   per update (every process of the run: aggregator, workers, Mosquitto, start-up included) and
   the accuracy reached.
4. The demo (100 live devices, mnist1d): wall time to 90%.
5. The regime table (``--only regimes``): for each profile (mixed, phone, sensor, vehicle, lab)
   and fleet size (100, 1,000, 10,000), FedBuff and FedAvg on the default ``edgefl sim``
   settings (:class:`firmware_sim.scenario.SimConfig` defaults, seed 7): virtual time and
   updates to target, the speed-up and each run's measured bottleneck, as a Markdown table
   (docs/SIMULATOR.md, "Regimes"). ``--sizes`` and ``--profiles`` narrow it.

    python bench/fleet.py [--quick] [--json] [--agents N]
    python bench/fleet.py --only live --agents 500,1000,2000 [--workers 2] [--seconds S]
    python bench/fleet.py --only regimes [--sizes 100,1000,10000] [--profiles mixed,lab]

``--quick`` shrinks everything (digits for the comparison, fewer updates, 100 live devices for
15 s, no demo). With ``--json`` the last stdout line is the result object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _compare(quick: bool) -> dict[str, Any]:
    from firmware_sim.record import Algorithm
    from firmware_sim.report import speedup_vs_fedavg
    from firmware_sim.scenario import SimConfig, build_scenario
    from firmware_sim.virtual import run_virtual

    if quick:
        cfg = SimConfig.build(devices=40, dataset="digits", profile="lab", dropout=0.3, target=0.85)
    else:
        cfg = SimConfig.build(
            devices=100, dataset="mnist1d", profile="lab", dropout=0.3, target=0.9
        )
    cfg = cfg.replace(buffer_size=5, concurrency=20, server_lr=1.0, max_updates=20_000)
    scenario = build_scenario(cfg)
    out: dict[str, Any] = {"compare_dataset": cfg.dataset, "target": cfg.stop.target}
    records = []
    for algo in (Algorithm.FEDBUFF, Algorithm.FEDAVG):
        t = time.perf_counter()
        res = run_virtual(cfg.replace(algorithm=algo), scenario=scenario)
        s = res.record.summary(cfg.stop.target)
        records.append(res.record)
        out[f"{algo.value}_time_to_target_s"] = s["time_to_target_s"]
        out[f"{algo.value}_updates_to_target"] = s["updates_received_to_target"]
        out[f"{algo.value}_wall_s"] = time.perf_counter() - t
        if res.round_deadline_s is not None:
            out["fedavg_round_deadline_s"] = res.round_deadline_s
        wall = out[f"{algo.value}_wall_s"]
        print(
            f"  {algo.value:8s} time to {100 * cfg.stop.target:.0f}%: {s['time_to_target_s']} s "
            f"virtual, {s['updates_received_to_target']} updates, {wall:.1f} s wall",
            flush=True,
        )
    speedup = speedup_vs_fedavg(records, cfg.stop.target)
    out["speedup_vs_fedavg"] = speedup
    out["fedbuff_time_ratio"] = None if not speedup else 1.0 / speedup
    return out


REGIME_PROFILES = ("mixed", "phone", "sensor", "vehicle", "lab")
REGIME_SIZES = (100, 1_000, 10_000)
REGIME_MAX_UPDATES = 15_000


def _regime_cell(profile: str, devices: int, seed: int) -> dict[str, Any]:
    """FedBuff and FedAvg on one fleet (default settings): time, updates, bottleneck."""
    from firmware_sim.record import Algorithm
    from firmware_sim.scenario import SimConfig, build_scenario
    from firmware_sim.virtual import run_virtual

    cfg = SimConfig.build(
        devices=devices, profile=profile, seed=seed, max_updates=REGIME_MAX_UPDATES
    )
    scenario = build_scenario(cfg)
    cell: dict[str, Any] = {"profile": profile, "devices": devices}
    for algo in (Algorithm.FEDBUFF, Algorithm.FEDAVG):
        t = time.perf_counter()
        s = run_virtual(cfg.replace(algorithm=algo), scenario=scenario).record.summary(
            cfg.stop.target
        )
        cell[algo.value] = {
            "time_to_target_s": s["time_to_target_s"],
            "updates_to_target": s["updates_to_target"],
            "bottleneck": s["bottleneck"],
            "wall_s": round(time.perf_counter() - t, 1),
        }
    buff, avg = cell["fedbuff"]["time_to_target_s"], cell["fedavg"]["time_to_target_s"]
    cell["speedup"] = avg / buff if buff and avg else None
    return cell


def _fmt_run(run: dict[str, Any]) -> str:
    if run["time_to_target_s"] is None:
        return f"not reached in {REGIME_MAX_UPDATES:,} updates"
    return f"{run['time_to_target_s']:,.0f} s / {run['updates_to_target']:,}"


def regime_row(cell: dict[str, Any]) -> str:
    """One Markdown table row: profile, devices, FedBuff, FedAvg, speed-up, bottlenecks."""
    speedup = "n/a" if cell["speedup"] is None else f"{cell['speedup']:.1f}x"
    verdicts = "; ".join(
        f"{name}: {cell[name]['bottleneck'].split(';')[0]}" for name in ("fedbuff", "fedavg")
    )
    return (
        f"| {cell['profile']} | {cell['devices']:,} | {_fmt_run(cell['fedbuff'])} | "
        f"{_fmt_run(cell['fedavg'])} | {speedup} | {verdicts} |"
    )


def _regimes(sizes: list[int], profiles: list[str], seed: int) -> dict[str, Any]:
    print(
        "| profile | devices | FedBuff time / updates to target | FedAvg time / updates "
        "| speed-up | measured bottleneck |\n|---|---|---|---|---|---|",
        flush=True,
    )
    cells = []
    for profile in profiles:
        for devices in sizes:
            cell = _regime_cell(profile, devices, seed)
            cells.append(cell)
            print(regime_row(cell), flush=True)
    return {"regimes": cells}


def _scaling_one(n: int, updates: int) -> tuple[float, float, float, int, int]:
    """One fleet size in a fresh process: (updates/s, build seconds, peak RSS MB, trainings,
    batched training calls)."""
    import resource

    from firmware_sim.scenario import SimConfig, build_scenario
    from firmware_sim.virtual import run_virtual

    cfg = SimConfig.build(
        devices=n,
        dataset="mnist1d",
        profile="lab",
        dropout=0.3,
        min_examples=16,
        max_updates=updates,
        stop_at_target=False,
        eval_every_updates=100,
    )
    t = time.perf_counter()
    scenario = build_scenario(cfg)
    build_s = time.perf_counter() - t
    res = run_virtual(cfg, scenario=scenario)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res.updates_per_s, build_s, peak_mb, res.trainings_computed, res.train_calls


def _scaling(quick: bool) -> dict[str, Any]:
    import multiprocessing as mp

    updates = 150 if quick else 600
    rates: dict[str, float] = {}
    peaks: dict[str, float] = {}
    ctx = mp.get_context("spawn")
    for n in (1_000, 10_000, 100_000):
        with ctx.Pool(1) as pool:  # a fresh process per size: its peak RSS is its own
            rate, build_s, peak_mb, trainings, calls = pool.apply(_scaling_one, (n, updates))
        rates[str(n)] = rate
        peaks[str(n)] = round(peak_mb, 1)
        print(
            f"  {n:>7,} devices: built in {build_s:.2f} s, {rate:.1f} updates/s, "
            f"peak RSS {peak_mb:.0f} MB ({trainings} trainings in {calls} batched calls)",
            flush=True,
        )
    return {
        "virtual_updates_per_s": rates,
        "virtual_peak_rss_mb": peaks,
        "virtual_100k_vs_1k": rates["100000"] / rates["1000"],
    }


LIVE_HEADER = (
    "| agents | workers | all connected after | connected at end | RSS total | RSS / agent "
    "| agent RSS / agent | updates/s (all connected) | updates/s (whole run) | CPU / update "
    "| accuracy |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (workers, Mosquitto)."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _live_row(devices: int, workers: int, seconds: float) -> dict[str, Any]:
    """One live run: ``devices`` real agents (their own MQTT connections) in ``workers``
    processes, the aggregator in this one, a private Mosquitto, for ``seconds`` of wall time."""
    from firmware_sim.live import LiveOptions, run_live
    from firmware_sim.scenario import SimConfig

    cfg = SimConfig.build(
        devices=devices,
        dataset="mnist1d",
        profile="lab",
        dropout=0.1,
        concurrency=20,
        buffer_size=20,
        max_staleness=3,
        target=1.0,
        max_wall_s=seconds,
    )
    options = LiveOptions(broker_kind="mosquitto", fleet="bench", time_scale=0.02, workers=workers)
    cpu0 = _cpu_s()
    res = run_live(cfg, options)
    cpu = _cpu_s() - cpu0  # the run's processes: this one (aggregator), workers, Mosquitto
    s = res.record.summary(cfg.stop.target)
    updates = s["updates_received"]
    return {
        "agents": devices,
        "workers": workers,
        "wall_s": res.wall_s,
        "all_connected_s": res.all_connected_s,
        "peak_connected": res.peak_connected,
        "connected_at_end": res.connected_at_end,
        "rss_mb": res.rss_mb,
        "rss_mb_per_agent": res.rss_mb_per_device,
        "agent_rss_mb_per_agent": res.agents_rss_mb / devices,
        "updates": updates,
        "updates_per_s": res.updates_per_s,
        "steady_updates_per_s": res.steady_updates_per_s,
        "cpu_s": cpu,
        "cpu_ms_per_update": 1000 * cpu / updates if updates else None,
        "accuracy": s["final_accuracy"],
    }


def live_row(r: dict[str, Any]) -> str:
    """One Markdown row of :data:`LIVE_HEADER`."""

    def num(v: float | None, fmt: str, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:{fmt}}{unit}"

    return (
        f"| {r['agents']:,} | {r['workers']} | {num(r['all_connected_s'], '.0f', ' s')} | "
        f"{r['connected_at_end']:,} | {r['rss_mb']:,.0f} MB | {r['rss_mb_per_agent']:.2f} MB | "
        f"{1024 * r['agent_rss_mb_per_agent']:.0f} KB | "
        f"{num(r['steady_updates_per_s'], '.1f')} | {r['updates_per_s']:.1f} | "
        f"{num(r['cpu_ms_per_update'], '.0f', ' ms')} | {num(r['accuracy'], '.3f')} |"
    )


def _live(sizes: list[int], workers: int, seconds: float) -> dict[str, Any]:
    """The live table: one run per fleet size, one after the other (load average printed)."""
    import os

    print(f"  load average before: {os.getloadavg()[0]:.1f} (2-core machine)", flush=True)
    print(LIVE_HEADER, flush=True)
    rows = []
    for devices in sizes:
        row = _live_row(devices, workers, seconds)
        rows.append(row)
        print(live_row(row), flush=True)
    print(f"  load average after: {os.getloadavg()[0]:.1f}", flush=True)
    last = rows[-1]
    return {
        "live": rows,
        "live_devices": last["agents"],
        "live_peak_connected": last["peak_connected"],
        "live_updates_per_s": last["updates_per_s"],
        "live_rss_mb": last["rss_mb"],
        "live_rss_mb_per_device": last["rss_mb_per_agent"],
    }


def _demo() -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from firmware_sim.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        s = run_demo(report=Path(tmp) / "report")
    print(f"  demo: {s['time_to_target_s']} s to 90%, final {s['final_accuracy']}", flush=True)
    return {
        "demo_time_to_target_s": s["time_to_target_s"],
        "demo_final_accuracy": s["final_accuracy"],
        "demo_wall_s": s["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--agents",
        "--live-devices",
        default=None,
        help="live: agents, or a comma list of fleet sizes run one after the other [500]",
    )
    parser.add_argument("--workers", type=int, default=2, help="live: agent processes [2]")
    parser.add_argument("--seconds", type=float, default=None, help="live: wall time per run")
    parser.add_argument("--skip", default="", help="comma list of: compare,scaling,live,demo")
    parser.add_argument("--only", default=None, help="run only this part: regimes or live")
    parser.add_argument("--sizes", default=",".join(map(str, REGIME_SIZES)))
    parser.add_argument("--profiles", default=",".join(REGIME_PROFILES))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result: dict[str, Any] = {"quick": args.quick}
    t0 = time.perf_counter()
    if args.only == "regimes":
        sizes = [int(n) for n in args.sizes.split(",")]
        result.update(_regimes(sizes, args.profiles.split(","), args.seed))
        skip = {"compare", "scaling", "live", "demo"}
    elif args.only == "live":
        skip = {"compare", "scaling", "demo"}
    elif args.only is not None:
        parser.error(f"--only: {args.only!r} is not one of regimes, live")
    if "compare" not in skip:
        print("FedBuff vs FedAvg (virtual time):", flush=True)
        result.update(_compare(args.quick))
    if "scaling" not in skip:
        print("virtual mode scaling:", flush=True)
        result.update(_scaling(args.quick))
    if "live" not in skip:
        sizes = [int(n) for n in (args.agents or ("100" if args.quick else "500")).split(",")]
        seconds = args.seconds or (15.0 if args.quick else 60.0 + max(sizes) / 20)
        print(f"live mode ({seconds:.0f} s per run):", flush=True)
        result.update(_live(sizes, args.workers, seconds))
    if "demo" not in skip and not args.quick:
        print("demo:", flush=True)
        result.update(_demo())
    result["bench_wall_s"] = time.perf_counter() - t0
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
