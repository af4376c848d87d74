"""``edgefl aggregator``: run the aggregator service, or check its configuration.

``edgefl/cli.py`` mounts :data:`aggregator_app` as ``edgefl aggregator``::

    edgefl aggregator --config /etc/edgefl/aggregator.toml [--buffer-size 20 ...]  run it
    edgefl aggregator --broker mqtt://... --fleet f --model m --state-dir d          flags only
    edgefl aggregator check-config --config aggregator.toml [--json]                validate
    edgefl aggregator reset-device DEVICE [--to SEQ] --state-dir d | --config f    offline repair

Settings come from the TOML file < ``EDGEFL_AGG_*`` environment < flags
(:mod:`edgefl.aggregator.config_file`). Everything is validated (URL, model, dataset names, TLS
and key files, a usable state directory) before any state is created. Exit codes
(:mod:`edgefl.clierror`): 0 clean stop (also on SIGTERM/SIGINT), 2 a bad flag, 78 a bad config
key or file, 69 the broker was unreachable for ``broker.connect_timeout_s``.

Imports stay light: no torch (only ``eval_dataset`` / ``publish_onnx`` load it, lazily, at run
time) and no ``cryptography`` unless key files are configured.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefl.aggregation import (
    ExampleWeighting,
    Normalisation,
    RobustMode,
    ServerOptimizerKind,
    StalenessKind,
)
from edgefl.cliapp import command_group, config_option, setup_logging
from edgefl.codec import Quantization
from edgefl.transport.config import MqttProtocol

if TYPE_CHECKING:
    from edgefl.aggregator.config_file import LoadedConfig

__all__ = ["aggregator_app", "check_config_command", "main"]

aggregator_app = command_group(
    "aggregator", "The FedBuff (or synchronous FedAvg) aggregator service for one fleet."
)

ConfigOption = Annotated[
    Path | None,
    config_option(
        "Aggregator TOML file (default: $EDGEFL_AGG_CONFIG, else "
        "/etc/edgefl/aggregator.toml if it exists)."
    ),
]


def _load(config: Path | None, overrides: dict[str, object]) -> LoadedConfig:
    from edgefl.aggregator.config_file import default_config_path, load_aggregator_config

    path = config if config is not None else default_config_path(os.environ)
    return load_aggregator_config(path, os.environ, overrides)


@aggregator_app.callback()
def aggregator_command(
    ctx: typer.Context,
    config: ConfigOption = None,
    broker: Annotated[
        str | None,
        typer.Option(
            help="Broker URL: mqtt://, mqtts://, ws://, wss:// host[:port], or a comma list of"
            " a cluster's nodes (tried in turn) [broker.url]"
        ),
    ] = None,
    fleet: Annotated[
        str | None, typer.Option(help="Fleet name (topic root edgefl/v1/<fleet>).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model spec: mnist1d-cnn, digits-mlp, mlp-<N>.")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Directory of the SQLite state (default: $STATE_DIRECTORY)."),
    ] = None,
    algorithm: Annotated[
        str | None, typer.Option(help="fedbuff (asynchronous, default) or fedavg (sync).")
    ] = None,
    buffer_size: Annotated[
        int | None,
        typer.Option(
            "--buffer-size", "-k", help="K: updates per server step (fedavg: cohort). [10]"
        ),
    ] = None,
    staleness: Annotated[
        StalenessKind | None, typer.Option(help="Staleness weight s(tau). [polynomial]")
    ] = None,
    staleness_a: Annotated[
        float | None, typer.Option(help="Staleness parameter a (default 0.5 / hinge 1).")
    ] = None,
    staleness_b: Annotated[float | None, typer.Option(help="Hinge parameter b.")] = None,
    max_staleness: Annotated[
        int | None, typer.Option(help="Reject updates staler than this (versions). [100]")
    ] = None,
    example_weighting: Annotated[
        ExampleWeighting | None,
        typer.Option(help="Weigh updates by example count or equally. [examples]"),
    ] = None,
    example_cap: Annotated[
        int | None, typer.Option(help="Cap of the example weight. [1000]")
    ] = None,
    normalisation: Annotated[
        Normalisation | None,
        typer.Option(
            help="mean: weighted mean of the buffer (FedAvg-compatible, default); sum: divide "
            "by K as in the FedBuff paper, so stale buffers take smaller steps (use with "
            "small K)."
        ),
    ] = None,
    server_optimizer: Annotated[
        ServerOptimizerKind | None, typer.Option(help="Server optimizer. [sgd]")
    ] = None,
    server_lr: Annotated[float | None, typer.Option(help="Server learning rate. [1.0]")] = None,
    server_momentum: Annotated[
        float | None, typer.Option(help="Server SGD momentum. [0.0]")
    ] = None,
    norm_bound: Annotated[
        str | None,
        typer.Option(
            help="adaptive-clip (default), adaptive-reject, static-clip, static-reject, off."
        ),
    ] = None,
    max_norm: Annotated[float | None, typer.Option(help="Static update-norm bound.")] = None,
    robust: Annotated[RobustMode | None, typer.Option(help="Robust aggregation. [none]")] = None,
    trim_beta: Annotated[
        float | None, typer.Option(help="Trimmed-mean fraction per side. [0.2]")
    ] = None,
    round_deadline: Annotated[
        float | None, typer.Option(help="fedavg: seconds a round waits for its cohort. [60]")
    ] = None,
    min_fraction: Annotated[
        float | None,
        typer.Option(help="fedavg: fraction of K needed to step at the deadline. [0.5]"),
    ] = None,
    receipts: Annotated[
        bool | None,
        typer.Option(
            "--receipts/--no-receipts",
            help="Publish a receipt to each device after its updates are committed. [on]",
        ),
    ] = None,
    participation: Annotated[
        bool | None,
        typer.Option(
            "--participation/--no-participation",
            help="Grant training leases: at most --concurrency devices train at once. [on]",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Participation: leases held at once (C). [20]")
    ] = None,
    lease_s: Annotated[
        float | None, typer.Option("--lease-s", help="Participation: lease length, s. [600]")
    ] = None,
    lease_grace: Annotated[
        float | None,
        typer.Option(help="Participation: late updates accepted, fraction of --lease-s. [0.1]"),
    ] = None,
    checkin_ttl: Annotated[
        float | None, typer.Option(help="Participation: a check-in lasts this long, s. [3600]")
    ] = None,
    flush_after: Annotated[
        float | None,
        typer.Option(help="Participation: step a partly filled buffer after N s. [120]"),
    ] = None,
    dp: Annotated[
        str | None,
        typer.Option(
            "--dp",
            help="Central differential privacy: central:z=3,C=1,eps=8 (docs/PRIVACY.md). [off]",
        ),
    ] = None,
    local_epochs: Annotated[
        int | None, typer.Option(help="Hint: local epochs per update. [1]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Hint: local batch size. [32]")] = None,
    lr: Annotated[float | None, typer.Option(help="Hint: local learning rate. [0.1]")] = None,
    quantization: Annotated[
        Quantization | None, typer.Option(help="Hint: update quantization. [int8]")
    ] = None,
    topk: Annotated[float | None, typer.Option(help="Hint: top-k fraction (e.g. 0.01).")] = None,
    publish_onnx: Annotated[
        bool | None,
        typer.Option("--publish-onnx/--no-publish-onnx", help="Also publish each version as ONNX."),
    ] = None,
    eval_dataset: Annotated[
        str | None, typer.Option(help="Evaluate each version on digits or mnist1d (test split).")
    ] = None,
    until_accuracy: Annotated[
        float | None,
        typer.Option(
            help="Stop once the newest version's held-out accuracy reaches it (with"
            " --eval-dataset)."
        ),
    ] = None,
    metrics_interval: Annotated[
        float | None, typer.Option(help="Seconds between METRICS. [5]")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    metrics_bind: Annotated[
        str | None, typer.Option(help="Address of the Prometheus server. [127.0.0.1]")
    ] = None,
    max_update_bytes: Annotated[
        int | None, typer.Option(help="Largest accepted update. [64 MiB]")
    ] = None,
    rate_limit: Annotated[
        float | None, typer.Option(help="Accepted updates per device per minute (off).")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Messages per group commit. [512]")] = None,
    max_inflight_mib: Annotated[
        int | None,
        typer.Option(
            help="MiB of update packets held unacknowledged (receive window; memory vs rate). [32]"
        ),
    ] = None,
    max_seq_jump: Annotated[
        int | None,
        typer.Option(help="Refuse a seq this far above the device's highest (seq_jump). [2^32]"),
    ] = None,
    no_fsync: Annotated[
        bool,
        typer.Option("--no-fsync", help="SQLite synchronous=NORMAL: crash-safe, not power-safe."),
    ] = False,
    seed: Annotated[
        int | None, typer.Option(help="Seed of version 0 and of the evaluation data. [0]")
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(help="MQTT client id (default: edgefl-aggregator-<fleet>).")
    ] = None,
    username: Annotated[str | None, typer.Option(help="MQTT user name.")] = None,
    password: Annotated[
        str | None, typer.Option(envvar="EDGEFL_MQTT_PASSWORD", help="MQTT password.")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="Read the MQTT password from this file.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle (mqtts; default: system trust store).")
    ] = None,
    cert_file: Annotated[Path | None, typer.Option(help="Client certificate (mqtts).")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Client key (mqtts).")] = None,
    tls_insecure: Annotated[
        bool,
        typer.Option(
            "--tls-insecure", help="mqtts: skip certificate and host name checks (never in prod)."
        ),
    ] = False,
    protocol: Annotated[
        MqttProtocol | None, typer.Option(help="MQTT version: auto (default), 5 or 3.1.1.")
    ] = None,
    connect_timeout: Annotated[
        float | None,
        typer.Option(help="Give up (exit 69) when the broker is not reachable within N s. [30]"),
    ] = None,
    device_keys: Annotated[
        Path | None, typer.Option(help="Directory of device public keys: verify signed updates.")
    ] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="Private key file: sign every manifest.")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO (default), WARNING, ERROR.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging (--log-level DEBUG).")
    ] = False,
    role: Annotated[
        str,
        typer.Option(help="plain, or a secure-aggregation role: leader or helper (PRIVACY.md)."),
    ] = "plain",
    helper_key: Annotated[
        Path | None,
        typer.Option(help="Secagg: the helper's X25519 key, private (helper) or public (leader)."),
    ] = None,
    secagg_bits: Annotated[int, typer.Option(help="Secagg: ring width, 32 or 64.")] = 32,
    secagg_clip: Annotated[float, typer.Option(help="Secagg: device clip norm C.")] = 1.0,
    secagg_weight_scale: Annotated[
        int, typer.Option(help="Secagg: the integer weight of a full-weight update.")
    ] = 256,
    share_timeout: Annotated[
        float, typer.Option(help="Secagg: seconds one share waits for the other.")
    ] = 60.0,
    seed_timeout: Annotated[
        float, typer.Option(help="Secagg: seconds the helper keeps an unclaimed seed.")
    ] = 3600.0,
    min_members: Annotated[
        int, typer.Option(help="Secagg: the smallest buffer the helper answers.")
    ] = 2,
) -> None:
    """Run the aggregator for one fleet until SIGTERM/Ctrl-C (or a subcommand below).

    Settings: --config FILE < EDGEFL_AGG_* environment < these flags (docs/AGGREGATOR.md).
    """
    overrides = flag_overrides(ctx.params)
    if ctx.invoked_subcommand is not None:
        ctx.obj = (config, overrides)
        return
    if role != "plain":
        secagg = (helper_key, secagg_bits, secagg_clip, secagg_weight_scale)
        timeouts = (share_timeout, seed_timeout, min_members)
        _run_secagg(config, overrides, role, secagg, timeouts)
        return
    _run(config, overrides)


def flag_overrides(params: Mapping[str, object]) -> dict[str, object]:
    """Every configuration key's value from the command line (None: the flag was not given),
    read from the command's parameters: each is named after its key's flag (``--buffer-size``
    sets ``aggregation.buffer_size`` through ``buffer_size``). The switches that can only turn
    something on or off give None when absent, so the lower layers keep their value."""
    from edgefl.aggregator.config_file import FLAGS

    values = {key: params[flag.removeprefix("--").replace("-", "_")] for key, flag in FLAGS.items()}
    values["log_level"] = "DEBUG" if params["verbose"] else values["log_level"]
    values["broker.tls_insecure"] = True if params["tls_insecure"] else None
    values["limits.fsync"] = False if params["no_fsync"] else None
    return values


def _run_secagg(
    config: Path | None,
    overrides: dict[str, object],
    role: str,
    secagg: tuple[Path | None, int, float, int],
    timeouts: tuple[float, float, int],
) -> None:
    """``--role leader|helper``: a secure-aggregation role (edgefl.aggregator.secagg_runner)."""
    from edgefl.aggregator.config_file import preflight
    from edgefl.aggregator.secagg_config import Role, SecAggSettings
    from edgefl.aggregator.secagg_runner import run_role
    from edgefl.clierror import ConfigError, choices_hint

    helper_key, bits, clip, weight_scale = secagg
    if role not in {r.value for r in Role}:
        raise ConfigError(f"--role: {choices_hint(role, [r.value for r in Role])}")
    try:
        which = Role(role)
        if helper_key is None:
            raise ValueError("--helper-key is required with --role leader or helper")
        settings = SecAggSettings(
            helper_key=helper_key,
            bits=bits,
            clip_norm=clip,
            weight_scale=weight_scale,
            share_timeout_s=timeouts[0],
            seed_timeout_s=timeouts[1],
            min_members=timeouts[2],
        )
        loaded = _load(config, overrides)
        preflight(loaded)
        setup_logging(loaded.log_level)
        code = run_role(which, loaded.aggregator, settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    raise typer.Exit(code)


def _run(config: Path | None, overrides: dict[str, object]) -> None:
    from edgefl.aggregator.config_file import preflight
    from edgefl.aggregator.runner import run_aggregator

    loaded = _load(config, overrides)
    preflight(loaded)  # before anything is written
    setup_logging(loaded.log_level)
    raise typer.Exit(run_aggregator(loaded.aggregator))


@aggregator_app.command("check-config")
def check_config_command(
    ctx: typer.Context,
    config: ConfigOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Validate the configuration (file < environment < flags) and print the effective values.

    Also checks that TLS files exist, key files parse, every device key in security.device_keys
    is valid and the state directory is usable. Exit 78 on a bad key (named), 2 on a bad flag.
    """
    from edgefl.aggregator.config_file import describe, preflight
    from edgefl.clierror import ConfigError

    parent_config, overrides = ctx.obj if isinstance(ctx.obj, tuple) else (None, {})
    loaded = _load(config or parent_config, overrides)
    preflight(loaded)
    authenticator = loaded.aggregator.authenticator
    statistics = getattr(authenticator, "statistics", None)
    if statistics is not None:
        bad = statistics().bad_files
        if bad:
            name, problem = sorted(bad.items())[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ConfigError(f"security.device_keys: bad key file {name}: {problem}{more}")
    described = describe(loaded)
    if json_out:
        typer.echo(json.dumps(described, indent=2, sort_keys=True))
        return
    width = max(len(k) for k in described)
    for key in sorted(described):
        source = loaded.sources.get(key, "default")
        typer.echo(f"{key:<{width}}  {described[key]!r:<28}  # {source}")
    typer.echo("configuration OK", err=True)


@aggregator_app.command("reset-device")
def reset_device_command(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="The device id whose seq mark to reset.")],
    to: Annotated[
        int | None,
        typer.Option(
            "--to",
            help="Store this seq as the device's highest (default: the highest committed seq "
            "reachable within --max-seq-jump steps).",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="The aggregator's state directory (or take it from --config)."),
    ] = None,
    config: ConfigOption = None,
    max_seq_jump: Annotated[
        int | None,
        typer.Option(help="The sequence window (default: the configuration's, else 2^32)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recover a device locked out by a far seq jump: reset its highest accepted seq.

    Reads the device's committed seqs from the state's seen table and stores the highest one
    reachable without a jump above --max-seq-jump (or --to SEQ). Committed updates stay
    recorded, so nothing can be counted twice. Refuses while the aggregator runs.
    """
    from edgefl.aggregator.maintenance import NoState, reset_device
    from edgefl.aggregator.statelock import StateDirBusy
    from edgefl.clierror import ConfigError, UsageError
    from edgefl.errors import EdgeflError
    from edgefl.protocol.sequence import DEFAULT_MAX_SEQ_JUMP
    from edgefl.protocol.topics import MAX_INT, device_id

    parent_config, overrides = ctx.obj if isinstance(ctx.obj, tuple) else (None, {})
    try:
        device_id(device)
    except (EdgeflError, ValueError) as exc:
        raise UsageError(f"DEVICE: not a device id: {device!r} ({exc})") from None
    if to is not None and not 0 <= to <= MAX_INT:
        raise UsageError(f"--to: expected a seq in [0, 2**63-1], got {to}")
    if max_seq_jump is not None and max_seq_jump < 1:
        raise UsageError(f"--max-seq-jump: expected at least 1, got {max_seq_jump}")
    path = state_dir or typing.cast("Path | None", overrides.get("state_dir"))
    jump = max_seq_jump or typing.cast("int | None", overrides.get("limits.max_seq_jump"))
    flag = "--state-dir"
    if path is None:
        config_path = config or parent_config or _default_config()
        if config_path is None:
            raise UsageError("missing option --state-dir (or --config FILE)")
        loaded = _load(config_path, overrides)
        path, flag = loaded.aggregator.state_dir, "state_dir"
        jump = jump or loaded.aggregator.limits.max_seq_jump
    jump = jump or DEFAULT_MAX_SEQ_JUMP
    try:
        result = reset_device(path, device, max_seq_jump=jump, to=to)
    except NoState as exc:
        raise (UsageError if flag.startswith("--") else ConfigError)(f"{flag}: {exc}") from None
    except StateDirBusy as exc:
        raise ConfigError(f"{flag}: {exc}; stop the aggregator first") from None
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "device": result.device,
                    "committed": result.committed,
                    "highest_committed": result.highest_committed,
                    "before": result.before,
                    "after": result.after,
                    "changed": result.changed,
                },
                sort_keys=True,
            )
        )
        return
    what = "reset" if result.changed else "unchanged"
    after = "none (a seq below the window is accepted)" if result.after is None else result.after
    typer.echo(
        f"{result.device}: highest accepted seq {result.before} -> {after} ({what}); "
        f"{result.committed} committed updates stay recorded "
        f"(highest {result.highest_committed}, never counted again)"
    )


def _default_config() -> Path | None:
    from edgefl.aggregator.config_file import default_config_path

    return default_config_path(os.environ)


def main(argv: list[str] | None = None) -> None:
    """``python -m edgefl.aggregator.cli``: the command without the umbrella CLI."""
    from edgefl.clierror import run_cli

    run_cli(
        lambda: aggregator_app(args=argv, prog_name="edgefl aggregator", standalone_mode=False),
        prog="edgefl aggregator",
    )


if __name__ == "__main__":
    main()
