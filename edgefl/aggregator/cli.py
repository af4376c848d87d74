"""``edgefl aggregator``: the typer command around :func:`edgefl.aggregator.run_aggregator`.

``edgefl/cli.py`` mounts :func:`aggregator_command` as the ``aggregator`` subcommand. Imports stay
light: no torch (only ``--eval-dataset`` / ``--publish-onnx`` load it, lazily, at run time) and no
``cryptography`` unless ``--device-keys`` / ``--signing-key`` are given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from edgefl.aggregation import (
    ExampleWeighting,
    Normalisation,
    RobustMode,
    ServerOptimizerKind,
    StalenessKind,
)
from edgefl.codec import CodecConfig, Quantization

__all__ = ["aggregator_command"]


def aggregator_command(
    broker: Annotated[str, typer.Option(help="Broker URL, mqtt://host:port or mqtts://...")],
    fleet: Annotated[str, typer.Option(help="Fleet name (topic root edgefl/v1/<fleet>).")],
    model: Annotated[str, typer.Option(help="Model spec: mnist1d-cnn, digits-mlp, mlp-<N>.")],
    state_dir: Annotated[Path, typer.Option(help="Directory of the SQLite state (crash-safe).")],
    algorithm: Annotated[str, typer.Option(help="fedbuff (asynchronous) or fedavg (sync).")] = (
        "fedbuff"
    ),
    buffer_size: Annotated[
        int,
        typer.Option("--buffer-size", "-k", help="K: updates per server step (fedavg: cohort)."),
    ] = 10,
    staleness: Annotated[
        StalenessKind, typer.Option(help="Staleness weight s(tau).")
    ] = StalenessKind.POLYNOMIAL,
    staleness_a: Annotated[
        float | None, typer.Option(help="Staleness parameter a (default 0.5 / hinge 1).")
    ] = None,
    staleness_b: Annotated[float | None, typer.Option(help="Hinge parameter b.")] = None,
    max_staleness: Annotated[
        int | None, typer.Option(help="Reject updates staler than this (versions).")
    ] = 100,
    example_weighting: Annotated[
        ExampleWeighting, typer.Option(help="Weigh updates by example count or equally.")
    ] = ExampleWeighting.EXAMPLES,
    example_cap: Annotated[int | None, typer.Option(help="Cap of the example weight.")] = 1000,
    normalisation: Annotated[
        Normalisation,
        typer.Option(
            help="mean: weighted mean of the buffer (FedAvg-compatible); sum: divide by K as in "
            "the FedBuff paper, so stale buffers take smaller steps (use with small K)."
        ),
    ] = Normalisation.MEAN,
    server_optimizer: Annotated[
        ServerOptimizerKind, typer.Option(help="Server optimizer.")
    ] = ServerOptimizerKind.SGD,
    server_lr: Annotated[float, typer.Option(help="Server learning rate.")] = 1.0,
    server_momentum: Annotated[float, typer.Option(help="Server SGD momentum.")] = 0.0,
    norm_bound: Annotated[
        str,
        typer.Option(
            help="adaptive-clip (default), adaptive-reject, static-clip, static-reject, off."
        ),
    ] = "adaptive-clip",
    max_norm: Annotated[float | None, typer.Option(help="Static update-norm bound.")] = None,
    robust: Annotated[RobustMode, typer.Option(help="Robust aggregation.")] = RobustMode.NONE,
    trim_beta: Annotated[float, typer.Option(help="Trimmed-mean fraction per side.")] = 0.2,
    round_deadline: Annotated[
        float, typer.Option(help="fedavg: seconds a round waits for its cohort.")
    ] = 60.0,
    min_fraction: Annotated[
        float, typer.Option(help="fedavg: fraction of K needed to step at the deadline.")
    ] = 0.5,
    local_epochs: Annotated[int, typer.Option(help="Hint: local epochs per update.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Hint: local batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Hint: local learning rate.")] = 0.1,
    quantization: Annotated[
        Quantization, typer.Option(help="Hint: update quantization.")
    ] = Quantization.INT8,
    topk: Annotated[float | None, typer.Option(help="Hint: top-k fraction (e.g. 0.01).")] = None,
    publish_onnx: Annotated[bool, typer.Option(help="Also publish each version as ONNX.")] = False,
    eval_dataset: Annotated[
        str | None, typer.Option(help="Evaluate each version on digits or mnist1d (test split).")
    ] = None,
    metrics_interval: Annotated[float, typer.Option(help="Seconds between METRICS.")] = 5.0,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    metrics_bind: Annotated[str, typer.Option(help="Address of the Prometheus server.")] = (
        "127.0.0.1"
    ),
    max_update_bytes: Annotated[int, typer.Option(help="Largest accepted update.")] = 64 << 20,
    rate_limit: Annotated[
        float | None, typer.Option(help="Accepted updates per device per minute (off).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Messages per group commit.")] = 512,
    max_inflight_mib: Annotated[
        int,
        typer.Option(
            help="MiB of update packets held unacknowledged (receive window; memory vs rate)."
        ),
    ] = 32,
    no_fsync: Annotated[
        bool,
        typer.Option("--no-fsync", help="SQLite synchronous=NORMAL: crash-safe, not power-safe."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of version 0 and of the evaluation data.")] = 0,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id.")] = None,
    username: Annotated[str | None, typer.Option(help="MQTT user name.")] = None,
    password: Annotated[
        str | None, typer.Option(envvar="EDGEFL_MQTT_PASSWORD", help="MQTT password.")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle (mqtts).")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="Client certificate (mqtts).")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Client key (mqtts).")] = None,
    device_keys: Annotated[
        Path | None, typer.Option(help="Directory of device public keys: verify signed updates.")
    ] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="Private key file: sign every manifest.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the FedBuff (or synchronous FedAvg) aggregator for one fleet until SIGTERM/Ctrl-C."""
    from edgefl.aggregator.config import AggregatorConfig, Algorithm, NormBoundSetting
    from edgefl.aggregator.runner import run_aggregator

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    authenticator = None
    signer = None
    if device_keys is not None:
        from edgefl.security import load_update_authenticator

        authenticator = load_update_authenticator(device_keys)
    if signing_key is not None:
        from edgefl.security import load_signer

        signer = load_signer(signing_key)
    try:
        config = AggregatorConfig(
            broker_url=broker,
            fleet=fleet,
            model=model,
            state_dir=state_dir,
            algorithm=Algorithm(algorithm),
            buffer_size=buffer_size,
            staleness=staleness,
            staleness_a=staleness_a,
            staleness_b=staleness_b,
            max_staleness=max_staleness,
            example_weighting=example_weighting,
            example_cap=example_cap,
            normalisation=normalisation,
            server_optimizer=server_optimizer,
            server_lr=server_lr,
            server_momentum=server_momentum,
            norm_bound=NormBoundSetting(norm_bound),
            max_norm=max_norm,
            robust=robust,
            trim_beta=trim_beta,
            round_deadline_s=round_deadline,
            min_fraction=min_fraction,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            codec=CodecConfig(quantization=quantization, topk_fraction=topk),
            publish_onnx=publish_onnx,
            eval_dataset=eval_dataset,
            metrics_interval_s=metrics_interval,
            metrics_port=metrics_port,
            metrics_bind=metrics_bind,
            max_update_bytes=max_update_bytes,
            rate_limit_per_minute=rate_limit,
            max_batch=max_batch,
            max_inflight_bytes=max_inflight_mib * 1024 * 1024,
            fsync=not no_fsync,
            seed=seed,
            authenticator=authenticator,
            manifest_signer=signer,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            client_id=client_id,
        )
    except (KeyError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    raise typer.Exit(run_aggregator(config))


def main() -> None:
    """``python -m edgefl.aggregator.cli``: the command without the umbrella CLI."""
    typer.run(aggregator_command)


if __name__ == "__main__":
    main()
