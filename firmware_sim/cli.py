"""``edgefl sim`` and ``edgefl demo``: plain typer-compatible functions (the lead wires them in).

``sim_command`` runs one simulation (or, with ``--compare fedbuff,fedavg``, one per algorithm on
the same fleet, data and seed), writes a report with ``--report DIR`` and prints a summary:
on stdout, or on stderr with ``--json``, which prints the summary object as the **last line** of
stdout. ``demo_command`` is the zero-configuration live demo.

Contract of both commands (docs/SIMULATOR.md, "Progress, exit codes and signals"):

* **Validation first.** Every option is checked (:mod:`firmware_sim.validate`) before anything
  is built or written; a bad one is one line on stderr naming the option and what it accepts,
  exit 2 (:class:`edgefl.clierror.UsageError`).
* **Progress** on stderr (:class:`firmware_sim.progress.ProgressReporter`): a rich bar on a
  terminal, else one plain line every few seconds and a line per phase.
* **Signals.** SIGINT/SIGTERM in any phase stop the command within about a second with exit 0
  and a short summary of what was done (:class:`firmware_sim.interrupt.SignalStop`); an
  interrupted run writes no report.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from edgefl.aggregation import Normalisation, RobustMode
from edgefl.clierror import ConfigError, UsageError
from edgefl.privacy.local import LocalDP
from edgefl.training import LocalTrainConfig
from firmware_sim import validate as check
from firmware_sim.attacks import AttackConfig, AttackKind
from firmware_sim.interrupt import SignalStop, StopRequested, exit_now
from firmware_sim.live_roles import RoleOptions, check_role, run_devices
from firmware_sim.progress import ProgressReporter, Sample, format_duration
from firmware_sim.record import Algorithm, RunRecord
from firmware_sim.report import partial_line, summary_lines, summary_object
from firmware_sim.scenario import SimConfig, parse_norm_bound

if TYPE_CHECKING:
    from edgefl.privacy import CentralDP
    from firmware_sim.live import LiveOptions
    from firmware_sim.virtual import Progress

# summary_object, summary_lines and partial_line live in firmware_sim.report; re-exported here
__all__ = [
    "demo_command",
    "partial_line",
    "run_sim",
    "sim_command",
    "summary_lines",
    "summary_object",
]

MODES = ("virtual", "live")
_DEFAULT = SimConfig()
"""``edgefl sim``'s defaults are the :class:`SimConfig` defaults (docs/SIMULATOR.md, "Defaults")."""
_K = "FedBuff K (updates per server step)."
LIVE_DEVICES = 100
"""``--mode live`` without ``--devices``: real MQTT clients cost memory, so fewer."""
BROKER_KINDS = ("auto", "mosquitto", "embedded")
DIGITS_SIZE = 1797  # images in scikit-learn's digits set: the most --samples can ask for


def _parse_compare(text: str | None) -> list[Algorithm]:
    if text is None:
        return []
    names = [a.strip() for a in text.split(",") if a.strip()]
    algos = [Algorithm(check.choice("--compare", a, [x.value for x in Algorithm])) for a in names]
    if len(set(algos)) != len(algos) or len(algos) < 2:
        choices = ", ".join(a.value for a in Algorithm)
        raise UsageError(
            f"--compare needs two different algorithms separated by a comma (of {choices}), "
            f"e.g. fedbuff,fedavg; got {text!r}"
        )
    return algos


def _check_profile(text: str) -> str:
    from firmware_sim.profiles import get_mix, list_profiles

    if "=" in text:
        return check.parsed(
            "--profile",
            text,
            lambda t: get_mix(t).name,
            f"a mix NAME=WEIGHT,... of {', '.join(p for p in list_profiles() if p != 'mixed')}",
        )
    return check.choice(
        "--profile", text, list_profiles(), extra="or a mix such as phone=50,sensor=50"
    )


def _check_private_broker(option: str, kind: str) -> None:
    """The private broker ``kind`` (auto | mosquitto | embedded) can be started here."""
    import importlib.util

    from broker.launcher import find_mosquitto

    has_mosquitto = find_mosquitto() is not None
    has_amqtt = importlib.util.find_spec("amqtt") is not None
    if kind == "mosquitto" and not has_mosquitto:
        raise UsageError(
            f"{option}: no mosquitto binary found (install Mosquitto, or use --broker-kind "
            "embedded, or --broker mqtt://HOST:PORT)"
        )
    if (kind == "embedded" or (kind == "auto" and not has_mosquitto)) and not has_amqtt:
        raise UsageError(
            f"{option}: neither Mosquitto nor the embedded broker (the amqtt package) is "
            "installed; install Mosquitto, or pass --broker mqtt://HOST:PORT"
        )


@dataclass(frozen=True)
class AlgorithmOptions:
    """``--algorithm``, ``--buffer-size``, ``--concurrency``, ``--staleness``,
    ``--max-staleness``, as given."""

    algorithm: str
    buffer_size: int
    concurrency: int
    staleness: str
    max_staleness: int


@dataclass(frozen=True)
class FleetOptions:
    """``--devices``, ``--dropout``, ``--profile``, ``--speed``, as given."""

    devices: int
    dropout: float | None
    profile: str
    speed: str | None


@dataclass(frozen=True)
class DataOptions:
    """``--dataset``, ``--partition``, ``--codec``, ``--samples``, as given."""

    dataset: str
    partition: str
    codec: str
    samples: int | None


@dataclass(frozen=True)
class LimitOptions:
    """``--target``, ``--max-time``, ``--max-updates``, ``--seed``, as given."""

    target: float
    max_time: float | None
    max_updates: int | None
    seed: int


@dataclass(frozen=True)
class AttackOptions:
    """``--malicious``, ``--attack``, ``--attack-scale``, ``--robust``, ``--norm-bound``, as
    given."""

    malicious: float
    attack: str
    attack_scale: float
    robust: str
    norm_bound: str | None  # None: "auto", or "off" with --dp


@dataclass(frozen=True)
class TrainingOptions:
    """``--epochs``, ``--lr``, ``--batch-size``, ``--server-lr``, ``--normalisation``,
    ``--round-deadline``, as given."""

    epochs: int
    lr: float
    batch_size: int
    server_lr: float
    normalisation: Normalisation | None  # None: mean, or sum with --dp
    round_deadline: float | None
    server_momentum: float = _DEFAULT.aggregation.server_momentum
    overselect: float = _DEFAULT.aggregation.overselect
    lease: float | None = None


@dataclass(frozen=True)
class SimOptions:
    """The options of ``edgefl sim`` that go into the :class:`SimConfig`, as given."""

    mode: str
    fleet: FleetOptions
    algorithm: AlgorithmOptions
    data: DataOptions
    limits: LimitOptions
    attack: AttackOptions
    training: TrainingOptions
    dp: str | None = None


def sim_config_from_options(o: SimOptions) -> SimConfig:
    """Check every option of ``edgefl sim`` that goes into the :class:`SimConfig` (in the order
    of the help) and build it; raises :class:`UsageError` naming the first bad option (nothing
    is loaded or written)."""
    check.at_least("--devices", o.fleet.devices)
    mode = check.choice("--mode", o.mode, MODES)
    algo, staleness = _check_algorithm(o.algorithm)
    profile = _check_fleet(o.fleet)
    dataset, partition = _check_data(o.data)
    _check_limits(o.limits)
    attack, robust = _check_attack_and_defence(o.attack)
    _check_training(o.training)
    _check_samples(o.data.samples, dataset)
    privacy, normalisation, norm_bound = _check_dp(o, algo, robust)
    limits, training = o.limits, o.training
    try:
        return SimConfig.build(
            devices=o.fleet.devices,
            algorithm=algo,
            profile=profile,
            speed=o.fleet.speed,
            dropout=o.fleet.dropout,
            dataset=dataset,
            num_samples=o.data.samples,
            partition=partition,
            local=LocalTrainConfig(
                epochs=training.epochs, lr=training.lr, batch_size=training.batch_size
            ),
            buffer_size=o.algorithm.buffer_size,
            concurrency=o.algorithm.concurrency,
            staleness=staleness,
            max_staleness=o.algorithm.max_staleness,
            server_lr=training.server_lr,
            server_momentum=training.server_momentum,
            overselect=training.overselect,
            lease_s=training.lease,
            normalisation=normalisation,
            norm_bound=norm_bound,
            robust=robust,
            round_deadline_s=training.round_deadline,
            codec=o.data.codec,
            attack=attack,
            target=limits.target,
            max_time_s=limits.max_time if mode == "virtual" else None,
            max_wall_s=(limits.max_time or 600.0) if mode == "live" else None,
            max_updates=limits.max_updates,
            seed=limits.seed,
            privacy=None if isinstance(privacy, LocalDP) else privacy,
            local_dp=privacy if isinstance(privacy, LocalDP) else None,
        )
    except (ValueError, KeyError) as exc:  # a combination the checks above do not cover
        raise UsageError(f"bad combination of options: {exc}") from None


def _check_algorithm(o: AlgorithmOptions) -> tuple[Algorithm, str]:
    """The algorithm and the normalised staleness."""
    from firmware_sim.scenario import parse_staleness

    algo = Algorithm(check.choice("--algorithm", o.algorithm, [a.value for a in Algorithm]))
    check.at_least("--buffer-size", o.buffer_size)
    check.at_least("--concurrency", o.concurrency)
    staleness = check.parsed(
        "--staleness",
        o.staleness,
        lambda t: (parse_staleness(t).weight(), t.strip().lower())[1],
        "constant | polynomial[:A] | hinge:A,B (A, B >= 0)",
    )
    check.at_least("--max-staleness", o.max_staleness, 0)
    return algo, staleness


def _check_fleet(o: FleetOptions) -> str:
    """The profile (or mix) name (``--devices`` is checked first of all)."""
    from firmware_sim.profiles import parse_distribution

    if o.dropout is not None:
        check.probability("--dropout", o.dropout)
    profile = _check_profile(o.profile)
    if o.speed is not None:
        check.parsed(
            "--speed",
            o.speed,
            parse_distribution,
            "lognormal:MU,SIGMA | halfnormal:SCALE | const:V | uniform:LO,HI | exp:MEAN",
        )
    return profile


def _check_data(o: DataOptions) -> tuple[str, str]:
    """The dataset and the normalised partition (``--samples`` is checked last)."""
    from edgefl.data.partition import PartitionSpec
    from firmware_sim.scenario import DATASET_MODELS, parse_codec

    dataset = check.choice("--dataset", o.dataset, DATASET_MODELS)
    partition = check.parsed(
        "--partition",
        o.partition,
        lambda t: str(PartitionSpec.parse(t)),
        "iid | dirichlet:ALPHA (ALPHA > 0) | shards:N (N >= 1)",
    )
    check.parsed(
        "--codec",
        o.codec,
        parse_codec,
        "fp32|fp16|int8|int4|int2 with optional +topk=F, +clip=C, +zstd=L, +block=B",
    )
    return dataset, partition


def _check_limits(o: LimitOptions) -> None:
    check.number("--target", o.target, low=0.0, high=1.0)
    if o.max_time is not None:
        check.number("--max-time", o.max_time)
    if o.max_updates is not None:
        check.at_least("--max-updates", o.max_updates)
    check.at_least("--seed", o.seed, 0)


def _check_attack_and_defence(o: AttackOptions) -> tuple[AttackConfig, RobustMode]:
    check.probability("--malicious", o.malicious)
    attack_kind = AttackKind(check.choice("--attack", o.attack, [a.value for a in AttackKind]))
    check.number("--attack-scale", o.attack_scale)
    robust = RobustMode(check.choice("--robust", o.robust, [r.value for r in RobustMode]))
    if o.norm_bound is not None:
        check.parsed(
            "--norm-bound", o.norm_bound, parse_norm_bound, "auto | off | MAX (a number > 0)"
        )
    return AttackConfig(fraction=o.malicious, kind=attack_kind, scale=o.attack_scale), robust


DP_FORMS = (
    "central:z=Z,C=C[,eps=E][,delta=D][,cap=N][,accountant=rdp|pld][,seed=S] "
    "| local:[gaussian|laplace,]eps=E,C=C[,delta=D][,budget=B] | off"
)
"""What ``--dp`` accepts: :func:`edgefl.privacy.parse_dp`'s text (the aggregator's ``--dp``
for central DP, the agent's ``[privacy] dp`` for local DP)."""


def _check_dp(
    o: SimOptions, algo: Algorithm, robust: RobustMode
) -> tuple[CentralDP | LocalDP | None, Normalisation, str]:
    """``--dp`` (parsed by :func:`edgefl.privacy.parse_dp`, as ``edgefl aggregator --dp``) and
    the normalisation and norm bound of the run.

    Without DP or with local DP (noise added on the device: any aggregation is
    post-processing): ``mean`` and ``auto`` unless given. With central DP the defaults are what
    the aggregator's ``--dp`` makes them (``sum``, ``off``), and a setting central DP's
    sensitivity argument does not hold under is a usage error naming it (docs/PRIVACY.md):
    FedAvg, ``mean``, an adaptive norm bound, a robust mode."""
    normalisation, norm_bound = o.training.normalisation, o.attack.norm_bound
    dp = None if o.dp is None else _parse_dp(o.dp)
    if dp is None or isinstance(dp, LocalDP):
        return (
            dp,
            normalisation or _DEFAULT.aggregation.normalisation,
            norm_bound or _DEFAULT.aggregation.norm_bound,
        )
    why = "differential privacy (--dp) needs"
    if algo is Algorithm.FEDAVG:
        raise UsageError(f"--algorithm fedavg with --dp: {why} --algorithm fedbuff")
    if normalisation is Normalisation.MEAN:
        raise UsageError(
            f"--normalisation mean with --dp: {why} sum (under mean one device's weight is in "
            "the divisor, so its influence is not bounded by the clip C)"
        )
    if norm_bound is not None and parse_norm_bound(norm_bound).adaptive_multiplier is not None:
        raise UsageError(
            f"--norm-bound {norm_bound} with --dp: {why} off or a static MAX (the adaptive "
            "bound follows every device's norm)"
        )
    if robust is not RobustMode.NONE:
        raise UsageError(
            f"--robust {robust.value} with --dp: {why} none (a robust statistic's sensitivity "
            "is not the clip C)"
        )
    return dp, Normalisation.SUM, norm_bound or "off"


def _parse_dp(text: str) -> CentralDP | LocalDP | None:
    from edgefl.extras import install_hint
    from edgefl.privacy import LocalSpend, parse_dp

    try:
        dp = check.parsed("--dp", text, parse_dp, DP_FORMS)
    except ImportError as exc:  # the accountant: dp-accounting
        raise ConfigError(
            f"--dp needs the dp-accounting package ({exc}): {install_hint('sim')}"
        ) from None
    if isinstance(dp, LocalDP) and not dp.may_train(LocalSpend()):
        raise UsageError(
            f"--dp: budget {dp.budget_epsilon:g} allows no update of epsilon {dp.epsilon:g}"
        )
    return dp


def _check_training(o: TrainingOptions) -> None:
    """(``--normalisation`` is an enum: typer checked it.)"""
    check.at_least("--epochs", o.epochs)
    check.number("--lr", o.lr)
    check.at_least("--batch-size", o.batch_size)
    check.number("--server-lr", o.server_lr)
    check.number("--server-momentum", o.server_momentum, low_open=False, high=1.0, high_open=True)
    check.number("--overselect", o.overselect, low=1.0, low_open=False)
    if o.round_deadline is not None:
        check.number("--round-deadline", o.round_deadline)
    if o.lease is not None:
        check.number("--lease", o.lease)


def _check_samples(samples: int | None, dataset: str) -> None:
    if samples is not None:
        check.at_least("--samples", samples, 20)
        if dataset == "digits" and samples > DIGITS_SIZE:
            raise UsageError(
                f"--samples must be in [20, {DIGITS_SIZE}] for --dataset digits, got {samples}"
            )


def run_sim(
    config: SimConfig,
    *,
    mode: str = "virtual",
    compare: list[Algorithm] | None = None,
    broker: str | None = None,
    fleet_name: str = "sim",
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    reporter: ProgressReporter | None = None,
    stop: SignalStop | None = None,
    role: str = "all",
) -> list[RunRecord]:
    """Run ``config`` once (or once per algorithm of ``compare`` on the same scenario).

    ``reporter`` gets phases and samples; ``stop`` (an entered :class:`SignalStop`): a signal
    during a virtual run raises :class:`StopRequested`; during a live run it ends the run early
    and the partial records are returned (``stop.requested`` tells the caller)."""
    algos = compare or [config.algorithm]
    if mode == "virtual":
        return _run_virtual(config, algos, progress, reporter)
    if mode == "live":
        from firmware_sim.live import LiveOptions, LiveRole

        options = LiveOptions(
            broker_url=broker, fleet=fleet_name, workers=workers, role=LiveRole(role)
        )
        return _run_live(config, algos, options, progress, reporter, stop)
    raise UsageError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")


def _run_virtual(
    config: SimConfig,
    algos: list[Algorithm],
    progress: Callable[[str], None] | None,
    reporter: ProgressReporter | None,
) -> list[RunRecord]:
    """One virtual run per algorithm, all on the same scenario (fleet, data, seed)."""
    from firmware_sim.scenario import build_scenario
    from firmware_sim.virtual import run_virtual

    if reporter is not None:
        reporter.phase(f"building the scenario ({config.devices:,} devices, {config.dataset})")
    scenario = build_scenario(config)
    records: list[RunRecord] = []
    for algo in algos:
        if reporter is not None:
            reporter.new_run(f"training {algo.value} (virtual time)")
        report = _virtual_progress(algo, progress, reporter)
        cfg = config.replace(algorithm=algo)
        records.append(run_virtual(cfg, scenario=scenario, progress=report).record)
    return records


def _virtual_progress(
    algo: Algorithm, progress: Callable[[str], None] | None, reporter: ProgressReporter | None
) -> Callable[[Progress], None]:
    """The virtual simulator's progress callback: a text line and a :class:`Sample`."""

    def report(p: Progress) -> None:
        if progress is not None:
            progress(
                f"{algo.value}: t={p.t:,.0f}s  v{p.version}  acc {100 * p.accuracy:.1f}%  "
                f"updates {p.updates_received:,}  wall {p.wall_s:.1f}s"
            )
        if reporter is not None:
            reporter.update(
                Sample(
                    elapsed_s=p.wall_s,
                    accuracy=p.accuracy,
                    updates=p.updates_received,
                    version=p.version,
                    detail=f"virtual {format_duration(p.t)}",
                )
            )

    return report


def _run_live(
    config: SimConfig,
    algos: list[Algorithm],
    options: LiveOptions,
    progress: Callable[[str], None] | None,
    reporter: ProgressReporter | None,
    stop: SignalStop | None,
) -> list[RunRecord]:
    """One live run per algorithm; a run stopped by a signal ends the series."""
    from firmware_sim.live import run_live

    records: list[RunRecord] = []
    for algo in algos:
        if reporter is not None:
            reporter.new_run(f"live {algo.value}: building the scenario")
        result = run_live(
            config.replace(algorithm=algo),
            options,
            progress=progress,
            on_phase=reporter.phase if reporter is not None else None,
            on_sample=reporter.update if reporter is not None else None,
            stop=stop,
        )
        records.append(result.record)
        if result.interrupted:
            break
    return records


def _emit_json(summary: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
    sys.stdout.flush()


def _print(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _require_packages(dataset: str, *, report: bool, feature: str) -> None:
    """The simulator trains with torch on a packaged dataset and plots with matplotlib: say
    which extra to install (exit 78) before anything starts, not a traceback half-way."""
    from edgefl.extras import ensure_installed

    modules = ["torch", "sklearn" if dataset == "digits" else "mnist1d"]
    if report:
        modules.append("matplotlib")
    ensure_installed(*modules, feature=feature, extra="sim")


def sim_command(
    devices: Annotated[
        int | None,
        typer.Option(
            "--devices",
            "-n",
            help=f"Simulated devices (default {_DEFAULT.devices:,}; live: {LIVE_DEVICES}).",
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="virtual (discrete-event, no broker) or live.")
    ] = "virtual",
    algorithm: Annotated[str, typer.Option(help="fedbuff or fedavg.")] = "fedbuff",
    buffer_size: Annotated[
        int, typer.Option("--buffer-size", "-k", help=_K)
    ] = _DEFAULT.aggregation.buffer_size,
    concurrency: Annotated[
        int, typer.Option(help="Devices training at once (FedAvg: devices selected per round).")
    ] = _DEFAULT.aggregation.concurrency,
    staleness: Annotated[
        str, typer.Option(help="constant | polynomial[:A] | hinge:A,B")
    ] = _DEFAULT.aggregation.staleness,
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
    role: Annotated[
        str,
        typer.Option(
            help="Live mode: all, aggregator (devices run elsewhere) or devices (only "
            "--device-range, against --broker)."
        ),
    ] = "all",
    device_range: Annotated[
        str | None,
        typer.Option(help="Live --role devices: run devices A..B-1 of the fleet (A:B)."),
    ] = None,
    malicious: Annotated[float, typer.Option(help="Fraction of attacking devices.")] = 0.0,
    attack: Annotated[str, typer.Option(help="scale | signflip | noise")] = "scale",
    attack_scale: Annotated[float, typer.Option(help="Attack factor s.")] = 20.0,
    robust: Annotated[str, typer.Option(help="none | trimmed_mean | median")] = "none",
    norm_bound: Annotated[
        str | None, typer.Option(help="auto | off | MAX (static clip). [auto; off with --dp]")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Local epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 32,
    server_lr: Annotated[
        float, typer.Option(help="Server SGD learning rate.")
    ] = _DEFAULT.aggregation.server_lr,
    server_momentum: Annotated[
        float, typer.Option(help="Server SGD momentum (0 <= m < 1).")
    ] = _DEFAULT.aggregation.server_momentum,
    overselect: Annotated[
        float,
        typer.Option(
            help="FedAvg: select this many times the reporting goal; a round closes at "
            "ceil(concurrency / overselect) updates, stragglers' work is discarded."
        ),
    ] = _DEFAULT.aggregation.overselect,
    lease: Annotated[
        float | None,
        typer.Option(help="FedBuff participation lease (s); default the p90 training time."),
    ] = None,
    normalisation: Annotated[
        Normalisation | None,
        typer.Option(
            help="FedBuff buffer: mean (weighted mean) or sum (divide by K, equal weights, as "
            "in the FedBuff paper; stale buffers take smaller steps, stable with small K). "
            "[mean; sum with --dp]"
        ),
    ] = None,
    round_deadline: Annotated[float | None, typer.Option(help="FedAvg round deadline (s).")] = None,
    samples: Annotated[int | None, typer.Option(help="Dataset size (train + test).")] = None,
    dp: Annotated[
        str | None,
        typer.Option(
            "--dp",
            help="Differential privacy: central:z=1,C=1,eps=8 (noise at the aggregator) or "
            "local:gaussian,eps=1,C=1,budget=20 (noise on every device) (docs/PRIVACY.md). [off]",
        ),
    ] = None,
) -> None:
    """Simulate a fleet (virtual time or live MQTT) and report accuracy, time and traffic.

    Progress goes to stderr; the summary to stdout (to stderr with --json, whose JSON object is
    the last line of stdout). Exit codes: 0 done or stopped by SIGINT/SIGTERM, 2 a bad option.
    """
    if devices is None:
        devices = LIVE_DEVICES if mode.strip().lower() == "live" else _DEFAULT.devices
    options = SimOptions(
        mode=mode,
        fleet=FleetOptions(devices=devices, dropout=dropout, profile=profile, speed=speed),
        algorithm=AlgorithmOptions(
            algorithm=algorithm,
            buffer_size=buffer_size,
            concurrency=concurrency,
            staleness=staleness,
            max_staleness=max_staleness,
        ),
        data=DataOptions(dataset=dataset, partition=partition, codec=codec, samples=samples),
        limits=LimitOptions(target=target, max_time=max_time, max_updates=max_updates, seed=seed),
        attack=AttackOptions(
            malicious=malicious,
            attack=attack,
            attack_scale=attack_scale,
            robust=robust,
            norm_bound=norm_bound,
        ),
        training=TrainingOptions(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            server_lr=server_lr,
            normalisation=normalisation,
            round_deadline=round_deadline,
            server_momentum=server_momentum,
            overselect=overselect,
            lease=lease,
        ),
        dp=dp,
    )
    config = sim_config_from_options(options)
    mode = mode.strip().lower()
    algos = _parse_compare(compare)
    if config.aggregation.privacy is not None and Algorithm.FEDAVG in algos:
        raise UsageError("--compare with --dp: differential privacy runs fedbuff only")
    _check_live_options(mode, devices, fleet, workers, broker)
    roles = check_role(mode, role, device_range, (devices, workers), broker, algos, report)
    if report is not None:
        report = check.output_dir("--report", report)
    _require_packages(config.dataset, report=report is not None, feature="edgefl sim")
    _execute(_SimRun(config, mode, algos, broker, fleet, workers, report, json_out, roles))


def _execute(run: _SimRun) -> None:
    """Run a validated invocation: a devices-only process (``--role devices``), or the whole
    simulation with its report; a signal stops either and exits 0."""
    with SignalStop() as stop:
        if run.roles.role == "devices":
            with ProgressReporter("edgefl sim", run.config.stop.target) as reporter:
                run_devices(
                    run.config,
                    roles=run.roles,
                    broker=run.broker or "",
                    fleet=run.fleet,
                    workers=run.workers,
                    json_out=run.json_out,
                    reporter=reporter,
                    stop=stop,
                )
        else:
            _run_and_report(run, stop)
    if stop.requested:
        exit_now(0)  # all released; skip the interpreter's slow teardown (see interrupt.py)


def _check_live_options(
    mode: str, devices: int, fleet: str, workers: int, broker: str | None
) -> None:
    """``--fleet``, ``--workers`` and ``--broker`` (live mode only; without it, a private
    broker must be possible here)."""
    check.fleet_name("--fleet", fleet)
    check.at_least("--workers", workers)
    if workers > devices:
        raise UsageError(f"--workers must be between 1 and --devices ({devices}), got {workers}")
    if broker is not None:
        if mode != "live":
            raise UsageError("--broker applies to --mode live only (virtual mode has no broker)")
        check.broker_url("--broker", broker)
    elif mode == "live":
        _check_private_broker("--mode live", "auto")


@dataclass(frozen=True)
class _SimRun:
    """A validated ``edgefl sim`` invocation."""

    config: SimConfig
    mode: str
    algos: list[Algorithm]
    broker: str | None
    fleet: str
    workers: int
    report: Path | None
    json_out: bool
    roles: RoleOptions = field(default_factory=RoleOptions)


def _run_and_report(run: _SimRun, stop: SignalStop) -> None:
    """Run the simulation(s), then write the report and print the summary; a signal in any
    phase prints what was done instead (see :func:`_interrupted`)."""
    prog = "edgefl sim"
    target = run.config.stop.target
    with ProgressReporter(prog, target) as reporter:
        records: list[RunRecord] = []
        try:
            records = run_sim(
                run.config,
                mode=run.mode,
                compare=run.algos,
                broker=run.broker,
                fleet_name=run.fleet,
                workers=run.workers,
                reporter=reporter,
                stop=stop,
                role=run.roles.role,
            )
            stop.check()  # a live run stopped by a signal returns early: report it below
        except StopRequested as exc:
            _interrupted(prog, reporter, str(exc), records, target)
            return
        try:
            _finish(prog, records, target, run.report, run.json_out, reporter)
        except StopRequested as exc:
            reporter.close()
            where = f" while {reporter.current_phase}" if reporter.current_phase else ""
            _print(sys.stderr, f"{prog}: stopped by {exc}{where}")
            if run.report is not None:
                _print(sys.stderr, f"{prog}: the report in {run.report} may be incomplete")


def _interrupted(
    prog: str, reporter: ProgressReporter, why: str, records: list[RunRecord], target: float
) -> None:
    """What a command stopped by a signal during its run prints (stderr): the phase, the last
    progress sample and the partial runs' summary lines."""
    reporter.close()
    where = f" while {reporter.current_phase}" if reporter.current_phase else ""
    _print(sys.stderr, partial_line(prog, why + where, reporter.last, target))
    for line in summary_lines(records, target, {}):
        _print(sys.stderr, f"  partial run {line}")
    _print(sys.stderr, f"{prog}: interrupted; no report written")


def _finish(
    prog: str,
    records: list[RunRecord],
    target: float,
    report: Path | None,
    json_out: bool,
    reporter: ProgressReporter,
) -> None:
    """Write the report (if asked) and print the summary: stdout, or stderr with ``json_out``
    (then the JSON object is the last line of stdout)."""
    extra: dict[str, Any] = {}
    if report is not None:
        from firmware_sim.report import write_report

        reporter.phase(f"writing the report to {report}")
        paths = write_report(records, report, target)
        extra["report"] = str(paths.out_dir)
    reporter.phase("done")
    reporter.close()
    out = sys.stderr if json_out else sys.stdout
    summary = summary_object(records, target, extra=extra)
    for line in summary_lines(records, target, summary):
        _print(out, line)
    if report is not None:
        _print(out, f"report: {extra['report']}")
    if json_out:
        _emit_json(summary)


def demo_command(
    devices: Annotated[int, typer.Option("--devices", "-n", help="Live devices (>= 1).")] = 100,
    report: Annotated[Path, typer.Option("--report", help="Report directory.")] = Path(
        "edgefl-demo-report"
    ),
    seed: Annotated[int, typer.Option(help="Random seed (>= 0).")] = 0,
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
            "or embedded (amqtt, MQTT 3.1.1, no persistence; see broker/conf/README.md)."
        ),
    ] = "auto",
    target: Annotated[float, typer.Option(help="Stop at this test accuracy (0-1).")] = 0.9,
    max_time: Annotated[
        float, typer.Option("--max-time", help="Stop after this many wall-clock seconds.")
    ] = 300.0,
    estimate: Annotated[
        bool,
        typer.Option(
            help="After the run, estimate FedAvg's time on this fleet from two virtual runs "
            "(printed as an estimate; adds their wall time at the end)."
        ),
    ] = True,
) -> None:
    """Zero-configuration demo: its own broker, the aggregator and ~100 live devices on mnist1d.

    Progress goes to stderr; the summary to stdout (to stderr with --json). Exit codes: 0 done
    or stopped by SIGINT/SIGTERM, 2 a bad option.
    """
    from firmware_sim.demo import DEMO_CONFIG, DEMO_OPTIONS, run_demo

    check.at_least("--devices", devices)
    report = check.output_dir("--report", report)
    check.at_least("--seed", seed, 0)
    if broker is not None:
        check.broker_url("--broker", broker)
    broker_kind = check.choice("--broker-kind", broker_kind, BROKER_KINDS)
    if broker is None:
        _check_private_broker(f"--broker-kind {broker_kind}", broker_kind)
    check.number("--target", target, low=0.0, high=1.0)
    check.number("--max-time", max_time)
    _require_packages(DEMO_CONFIG.dataset, report=True, feature="edgefl demo")
    options = replace(DEMO_OPTIONS, broker_url=broker, broker_kind=broker_kind)
    config = DEMO_CONFIG.replace(target=target, max_wall_s=max_time)
    with SignalStop() as stop:
        run_demo(
            devices=devices,
            report=report,
            seed=seed,
            json_out=json_out,
            config=config,
            options=options,
            stop=stop,
            estimate=estimate,
        )
    if stop.requested:
        exit_now(0)  # all released; skip the interpreter's slow teardown (see interrupt.py)
