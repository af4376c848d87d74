"""``edgefl sim`` and ``edgefl demo``: plain typer-compatible functions (the lead wires them in).

``sim_command`` runs one simulation (or, with ``--compare fedbuff,fedavg``, one per algorithm on
the same fleet, data and seed), prints rich progress on a terminal and stays quiet otherwise,
writes a report with ``--report DIR`` and, with ``--json``, prints the summary object as the
**last line** of stdout. ``demo_command`` is the zero-configuration live demo.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.aggregation import Normalisation, RobustMode
from edgefl.training import LocalTrainConfig
from firmware_sim.attacks import AttackConfig, AttackKind
from firmware_sim.record import Algorithm, RunRecord
from firmware_sim.scenario import SimConfig

__all__ = ["demo_command", "run_sim", "sim_command", "summary_object"]


def _parse_compare(text: str | None) -> list[Algorithm]:
    if not text:
        return []
    algos = [Algorithm(a.strip().lower()) for a in text.split(",") if a.strip()]
    if len(set(algos)) != len(algos) or len(algos) < 2:
        raise typer.BadParameter("--compare needs two different algorithms, e.g. fedbuff,fedavg")
    return algos


def summary_object(
    records: list[RunRecord], target: float, *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``--json`` object: the first run's summary at top level (minus its bulky config);
    with several runs also ``runs`` (label -> summary) and ``speedup_vs_fedavg``."""
    from firmware_sim.report import build_summary, speedup_vs_fedavg

    first: dict[str, Any] = build_summary(records[:1], target)
    first.pop("config", None)
    if len(records) > 1:
        full = build_summary(records, target)
        for run in full["runs"].values():
            run.pop("config", None)
        first["runs"] = full["runs"]
        first["speedup_vs_fedavg"] = speedup_vs_fedavg(records, target)
    if extra:
        first.update(extra)
    return first


class _Console:
    """Rich progress on a TTY, nothing otherwise (``--json`` keeps stdout clean but the last
    line, so progress goes to stderr)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._console: Any = None
        if enabled:
            from rich.console import Console

            self._console = Console(stderr=True)

    def line(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, highlight=False)

    def status(self, text: str) -> Any:
        if self._console is None:
            return _NullCtx()
        return self._console.status(text)


class _NullCtx:
    def __enter__(self) -> _NullCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *args: object, **kwargs: object) -> None:
        return None


def run_sim(
    config: SimConfig,
    *,
    mode: str = "virtual",
    compare: list[Algorithm] | None = None,
    broker: str | None = None,
    fleet_name: str = "sim",
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[RunRecord]:
    """Run ``config`` once (or once per algorithm of ``compare`` on the same scenario)."""
    algos = compare or [config.algorithm]
    records: list[RunRecord] = []
    if mode == "virtual":
        from firmware_sim.scenario import build_scenario
        from firmware_sim.virtual import Progress, run_virtual

        scenario = build_scenario(config)
        for algo in algos:
            cfg = replace(config, algorithm=algo)

            def report(p: Progress, algo: Algorithm = algo) -> None:
                if progress is not None:
                    progress(
                        f"{algo.value}: t={p.t:,.0f}s  v{p.version}  acc {100 * p.accuracy:.1f}%  "
                        f"updates {p.updates_received:,}  wall {p.wall_s:.1f}s"
                    )

            records.append(run_virtual(cfg, scenario=scenario, progress=report).record)
        return records
    if mode == "live":
        from firmware_sim.live import LiveOptions, run_live

        for algo in algos:
            cfg = replace(config, algorithm=algo)
            options = LiveOptions(broker_url=broker, fleet=fleet_name, workers=workers)
            records.append(run_live(cfg, options, progress=progress).record)
        return records
    raise typer.BadParameter(f"unknown mode {mode!r}; expected virtual or live")


def sim_command(
    devices: Annotated[
        int, typer.Option("--devices", "-n", help="Number of simulated devices.")
    ] = 100,
    mode: Annotated[
        str, typer.Option(help="virtual (discrete-event, no broker) or live.")
    ] = "virtual",
    algorithm: Annotated[str, typer.Option(help="fedbuff or fedavg.")] = "fedbuff",
    buffer_size: Annotated[int, typer.Option("--buffer-size", "-k", help="FedBuff K.")] = 5,
    concurrency: Annotated[
        int, typer.Option(help="Devices training at once (FedAvg: cohort).")
    ] = 20,
    staleness: Annotated[
        str, typer.Option(help="constant | polynomial[:A] | hinge:A,B")
    ] = "polynomial:0.5",
    max_staleness: Annotated[int, typer.Option(help="Reject updates staler than this.")] = 100,
    dropout: Annotated[
        float | None, typer.Option(help="P(drop out mid-training); default per profile.")
    ] = None,
    profile: Annotated[
        str, typer.Option(help="phone | sensor | vehicle | lab | mixed | NAME=W,...")
    ] = "mixed",
    speed: Annotated[
        str | None, typer.Option(help="Override compute speed, e.g. lognormal:0,1.")
    ] = None,
    dataset: Annotated[str, typer.Option(help="digits or mnist1d.")] = "mnist1d",
    partition: Annotated[
        str, typer.Option(help="iid | dirichlet:ALPHA | shards:N")
    ] = "dirichlet:0.5",
    codec: Annotated[str, typer.Option(help="fp32|fp16|int8|int4|int2[+topk=F][+clip=C]")] = "int8",
    target: Annotated[float, typer.Option(help="Target test accuracy (0-1).")] = 0.9,
    max_time: Annotated[
        float | None, typer.Option("--max-time", help="Seconds (virtual or wall).")
    ] = None,
    max_updates: Annotated[int | None, typer.Option(help="Stop after this many updates.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    broker: Annotated[
        str | None, typer.Option(help="Live mode: broker URL (default: embedded).")
    ] = None,
    fleet: Annotated[
        str, typer.Option("--fleet", help="Live mode: fleet name in the topics.")
    ] = "sim",
    report: Annotated[
        Path | None, typer.Option("--report", help="Write summary.json + PNGs here.")
    ] = None,
    compare: Annotated[
        str | None, typer.Option(help="Run several algorithms: fedbuff,fedavg.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as the last line.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Live mode: processes to spread devices over.")] = 1,
    malicious: Annotated[float, typer.Option(help="Fraction of attacking devices.")] = 0.0,
    attack: Annotated[str, typer.Option(help="scale | signflip | noise")] = "scale",
    attack_scale: Annotated[float, typer.Option(help="Attack factor s.")] = 20.0,
    robust: Annotated[str, typer.Option(help="none | trimmed_mean | median")] = "none",
    norm_bound: Annotated[str, typer.Option(help="auto | off | MAX (static clip).")] = "auto",
    epochs: Annotated[int, typer.Option(help="Local epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 32,
    server_lr: Annotated[float, typer.Option(help="Server SGD learning rate.")] = 1.0,
    normalisation: Annotated[
        Normalisation,
        typer.Option(
            help="FedBuff buffer: mean (weighted mean) or sum (divide by K, equal weights, as "
            "in the FedBuff paper; stale buffers take smaller steps, stable with small K)."
        ),
    ] = Normalisation.MEAN,
    round_deadline: Annotated[float | None, typer.Option(help="FedAvg round deadline (s).")] = None,
    samples: Annotated[int | None, typer.Option(help="Dataset size (train + test).")] = None,
) -> None:
    """Simulate a fleet (virtual time or live MQTT) and report accuracy, time and traffic."""
    try:
        algos = _parse_compare(compare)
        config = SimConfig(
            devices=devices,
            algorithm=Algorithm(algorithm),
            profile=profile,
            speed=speed,
            dropout=dropout,
            dataset=dataset,
            num_samples=samples,
            partition=partition,
            local=LocalTrainConfig(epochs=epochs, lr=lr, batch_size=batch_size),
            buffer_size=buffer_size,
            concurrency=concurrency,
            staleness=staleness,
            max_staleness=max_staleness,
            server_lr=server_lr,
            normalisation=normalisation,
            norm_bound=norm_bound,
            robust=RobustMode(robust),
            round_deadline_s=round_deadline,
            codec=codec,
            attack=AttackConfig(fraction=malicious, kind=AttackKind(attack), scale=attack_scale),
            target=target,
            max_time_s=max_time if mode == "virtual" else None,
            max_wall_s=(max_time or 600.0) if mode == "live" else None,
            max_updates=max_updates,
            seed=seed,
        )
    except (ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    console = _Console(sys.stderr.isatty())
    with console.status("simulating...") as status:
        records = run_sim(
            config,
            mode=mode,
            compare=algos,
            broker=broker,
            fleet_name=fleet,
            workers=workers,
            progress=(lambda text: status.update(text)) if console.enabled else None,
        )
    extra: dict[str, Any] = {}
    if report is not None:
        from firmware_sim.report import write_report

        paths = write_report(records, report, target)
        extra["report"] = str(paths.out_dir)
    summary = summary_object(records, target, extra=extra)
    for r in records:
        s = r.summary(target)
        ttt = s["time_to_target_s"]
        console.line(
            f"[bold]{s['label']}[/]: final accuracy {100 * (s['final_accuracy'] or 0):.1f}%, "
            + (f"target reached at {ttt:,.0f}s" if ttt is not None else "target not reached")
            + f", {s['updates_applied']:,} updates applied, {s['model_versions']} versions"
        )
    if summary.get("speedup_vs_fedavg") is not None:
        console.line(
            f"FedBuff speed-up vs FedAvg (time to target): {summary['speedup_vs_fedavg']:.2f}x"
        )
    if report is not None:
        console.line(f"report: {extra['report']}")
    if json_out:
        sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
        sys.stdout.flush()


def demo_command(
    devices: Annotated[int, typer.Option("--devices", "-n", help="Live devices.")] = 100,
    report: Annotated[Path, typer.Option("--report", help="Report directory.")] = Path(
        "edgefl-demo-report"
    ),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as the last line.")
    ] = False,
    broker: Annotated[
        str | None, typer.Option(help="Use this broker instead of starting a private one.")
    ] = None,
    broker_kind: Annotated[
        str,
        typer.Option(
            help="Private broker: auto (Mosquitto when installed, else embedded), mosquitto, "
            "or embedded (amqtt in a child process; much slower with 100 devices)."
        ),
    ] = "auto",
) -> None:
    """Zero-configuration demo: its own broker, the aggregator and ~100 live devices on mnist1d."""
    from dataclasses import replace

    from firmware_sim.demo import DEMO_OPTIONS, run_demo

    if broker_kind not in ("auto", "mosquitto", "embedded"):
        raise typer.BadParameter("expected auto, mosquitto or embedded", param_hint="--broker-kind")
    options = replace(DEMO_OPTIONS, broker_url=broker, broker_kind=broker_kind)
    run_demo(devices=devices, report=report, seed=seed, json_out=json_out, options=options)
