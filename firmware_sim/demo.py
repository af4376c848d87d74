"""``edgefl demo``: the whole system on one machine with zero configuration.

A private broker (Mosquitto from ``broker.launcher`` when the binary is installed, else the
embedded amqtt broker), the real aggregator (FedBuff, held-out evaluation) and about 100 live
device agents of mixed profiles on mnist1d with a Dirichlet(0.5) label split, each with its own
MQTT connection. Training and MQTT traffic are real; the simulated speeds, availability windows,
dropouts and crash restarts of the ``mixed`` fleet (50% phones, 30% sensors, 20% vehicles) run
100x faster than real time (``time_scale`` 0.01). The devices live in two worker processes (one
event loop each), the aggregator in the main process. The demo stops at 90% test accuracy (or
after ``max_wall_s``), writes the report and prints a short summary.

Settings (:data:`DEMO_CONFIG`) and why: 5 local epochs per update (more local work per update
converges in far fewer updates, so fewer models to distribute); K = 10 with 20 devices training
at once (1,220 updates to 90% in virtual mode, the fewest of the settings tried);
``max_staleness`` 2 (in live mode every update is at least as stale as the time a new model
takes to reach the devices; the few much older ones do more harm than good and are rejected,
counted as ``stale``).

The yardstick (:mod:`firmware_sim.estimate`): once the live run is over (so that it cannot
delay it), two spawned processes at the lowest CPU priority run the same config in virtual
time, once with FedBuff and once with the synchronous FedAvg baseline; the demo prints their
times to target in its own clock (virtual seconds times ``time_scale``) and the speed-up,
labelled as an estimate, and puts them in the summary (``estimated_fedavg_time_to_target_s``,
``estimated_fedbuff_time_to_target_s``, ``estimated_speedup_vs_fedavg``, ``estimate``). A
failed or late estimate is reported as unavailable; it never fails the demo.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edgefl.aggregation import Normalisation
from edgefl.training import LocalTrainConfig
from firmware_sim.estimate import BackgroundEstimate, Estimate
from firmware_sim.interrupt import SignalStop, StopRequested
from firmware_sim.live import LiveOptions, LiveResult, run_live
from firmware_sim.progress import ProgressReporter
from firmware_sim.record import RunRecord
from firmware_sim.report import partial_line, summary_object, write_report
from firmware_sim.scenario import SimConfig

__all__ = ["DEMO_CONFIG", "DEMO_OPTIONS", "run_demo"]

DEMO_CONFIG = SimConfig.build(
    devices=100,
    profile="mixed",
    dataset="mnist1d",
    partition="dirichlet:0.5",
    local=LocalTrainConfig(epochs=5, batch_size=32, lr=0.1),
    buffer_size=10,
    concurrency=20,
    max_staleness=2,
    # FedBuff paper's rule: the step is sum(s(tau) delta) / K, so the (uniformly 1-2 versions
    # stale) live buffers take damped steps. With the weighted mean instead, accuracy swung
    # between 20% and 70% and reached 90% only on a spike (119-154 s); with sum it climbs
    # smoothly (90% after 121 s, last version 89.8%).
    normalisation=Normalisation.SUM,
    target=0.9,
    max_wall_s=300.0,
    codec="int8",
)

DEMO_OPTIONS = LiveOptions(fleet="demo", time_scale=0.01, train_threads=1, workers=2)

ESTIMATE_MAX_WALL_S = 240.0
"""Wall-clock budget of each virtual run of the estimate (they run side by side after the live
run; the demo waits at most this plus a grace, then reports the estimate unavailable)."""


def run_demo(
    *,
    devices: int = 100,
    report: Path = Path("edgefl-demo-report"),
    seed: int = 0,
    json_out: bool = False,
    config: SimConfig | None = None,
    options: LiveOptions | None = None,
    stop: SignalStop | None = None,
    reporter: ProgressReporter | None = None,
    estimate: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns the summary (also printed, as the last line with ``json_out``).

    ``estimate``: also estimate FedAvg's time from a virtual run of the fleet (module doc);
    False leaves the ``estimated_*`` fields out (to measure the demo without it).

    Progress (phases and samples) goes to ``reporter`` (default: a :class:`ProgressReporter`
    on stderr). ``stop`` (an entered :class:`SignalStop`): SIGINT/SIGTERM end the demo early;
    it then prints what was done on stderr, writes no report and returns the partial summary
    with ``"interrupted"`` set to the signal's name."""
    cfg = replace(config or DEMO_CONFIG, devices=devices, seed=seed)
    opts = options or DEMO_OPTIONS
    progress = reporter or ProgressReporter(_PROG, cfg.stop.target)
    progress.message(
        f"{_PROG}: {cfg.devices} live devices ({cfg.fleet.profile} profile, "
        f"{cfg.partition} split of {cfg.dataset}), FedBuff K={cfg.aggregation.buffer_size}, "
        f"target {100 * cfg.stop.target:.0f}% test accuracy"
    )
    started = time.monotonic()
    result = None
    try:
        progress.phase("building the scenario")
        result = run_live(
            cfg,
            opts,
            on_broker=_broker_announcer(progress, opts.fleet),
            on_phase=progress.phase,
            on_sample=progress.update,
            stop=stop,
        )
        if stop is not None:
            stop.check()
        progress.phase(f"writing the report to {report}")
        paths = write_report([result.record], report, cfg.stop.target)
        yardstick = _estimate(cfg, opts, progress, stop) if estimate else None
    except StopRequested as exc:
        return _interrupted(progress, str(exc), result, cfg.stop.target, report)
    progress.phase("done")
    progress.close()
    summary = summary_object(
        [result.record],
        cfg.stop.target,
        extra={
            "report": str(paths.out_dir),
            "wall_s": time.monotonic() - started,
            "live_updates_per_s": result.updates_per_s,
            "rss_mb": result.rss_mb,
            "trainings_per_stack": _per_stack(result.agent_totals),
            **({} if yardstick is None else yardstick.fields()),
        },
    )
    out = sys.stderr if json_out else sys.stdout
    _print_summary(out, result.record, cfg.stop.target, summary)
    if yardstick is not None:
        _say(out, _estimate_line(yardstick, cfg.stop.target))
    if json_out:
        sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
        sys.stdout.flush()
    return summary


_PROG = "edgefl demo"


def _broker_announcer(progress: ProgressReporter, fleet: str) -> Callable[[str, str], None]:
    """``run_live``'s ``on_broker``: say where the broker is and how to watch the fleet."""

    def announce(url: str, kind: str) -> None:
        what = {"mosquitto": "private Mosquitto", "embedded": "embedded amqtt broker"}
        progress.message(
            f"{_PROG}: broker: {what.get(kind, 'external broker')} at {url}; watch the fleet "
            f"with: edgefl monitor --broker {url} --fleet {fleet}"
        )

    return announce


def _interrupted(
    progress: ProgressReporter,
    why: str,
    result: LiveResult | None,
    target: float,
    report: Path,
) -> dict[str, Any]:
    """Stopped by a signal: say what was done (stderr); the partial summary."""
    progress.close()
    where = f" while {progress.current_phase}" if progress.current_phase else ""
    _say(sys.stderr, partial_line(_PROG, f"{why}{where}", progress.last, target))
    if result is None:
        return {"interrupted": why}
    partial = summary_object([result.record], target, extra={"interrupted": why})
    if not result.interrupted:  # the run had finished: the report was being written
        _say(sys.stderr, f"{_PROG}: the report in {report} may be incomplete")
    else:
        _say(sys.stderr, f"{_PROG}: interrupted; no report written")
    _say(
        sys.stderr,
        f"  partial run: {partial['updates_applied']:,} updates applied, "
        f"{partial['model_versions']} versions, last accuracy "
        f"{100 * (partial['final_accuracy'] or 0):.1f}%",
    )
    return partial


def _print_summary(out: TextIO, record: RunRecord, target: float, summary: dict[str, Any]) -> None:
    """Two lines: time to target, best and last model; traffic, dropouts and the report."""
    ttt = summary["time_to_target_s"]
    evals = record.evals()
    best = int(np.argmax(evals.accuracy)) if len(evals.accuracy) else None
    _say(
        out,
        (
            f"{100 * target:.0f}% reached after {ttt:.0f} s"
            if ttt is not None
            else "target not reached"
        )
        + (
            f"; best {100 * evals.accuracy[best]:.1f}% (model v{evals.version[best]})"
            if best is not None
            else ""
        )
        + f"; last version v{summary['model_versions']} "
        f"{100 * (summary['final_accuracy'] or 0):.1f}% after "
        f"{summary['updates_applied']:,} updates (in-flight updates keep landing after the stop)",
    )
    _say(
        out,
        f"{summary['bytes_uploaded'] / 1e6:.1f} MB uploaded "
        f"({summary['bytes_fp32_equivalent'] / 1e6:.1f} MB as float32), "
        f"{summary['dropouts']} dropouts; report: {summary['report']}",
    )


def _estimate(
    cfg: SimConfig, opts: LiveOptions, progress: ProgressReporter, stop: SignalStop | None
) -> Estimate:
    """The yardstick, started once the live run is over, so that it cannot delay it."""
    progress.phase("estimating FedAvg's time from a virtual run of this fleet")
    budget = min(ESTIMATE_MAX_WALL_S, cfg.stop.max_wall_s or ESTIMATE_MAX_WALL_S)
    with BackgroundEstimate(cfg, time_scale=opts.time_scale, max_wall_s=budget) as background:
        return background.result(check=None if stop is None else stop.check)


def _estimate_line(estimate: Estimate, target: float) -> str:
    """The estimate's console line, with how its units relate to the demo's clock."""
    line = estimate.line(target)
    if estimate.speedup is None:
        return line
    return (
        f"{line} (virtual fleet seconds x time scale {estimate.time_scale:g}; "
        "the live FedBuff time above is measured)"
    )


def _per_stack(totals: dict[str, int]) -> float | None:
    """Mean trainings per stacked pass in the worker processes (firmware_sim/stacked_compute.py)."""
    stacks = totals.get("training_stacks", 0)
    return round(totals.get("trainings_computed", 0) / stacks, 2) if stacks else None


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()
