"""``edgefl agent``: run the device agent, check its configuration, classify with its model.

Wire into the top-level command with ``app.add_typer(agent_app, name="agent")``::

    edgefl agent --config /etc/edgefl/agent.toml [--set key=value ...]     run the daemon
    edgefl agent run --config ...                                          the same
    edgefl agent check-config --config agent.toml [--set key=value ...]   validate and print
    edgefl agent predict --config agent.toml --input samples.npy|csv       local inference

The config path defaults to ``$EDGEFL_CONFIG`` or ``/etc/edgefl/agent.toml``. Environment
overrides (``EDGEFL_...``) and ``--set`` flags apply as described in ``device_agent.config``.
``run`` and ``check-config`` also open the files the configuration names
(:mod:`device_agent.preflight`: data, TLS files, Ed25519 keys) before anything is written.

Errors go through :func:`edgefl.clierror.run_cli` (one line on stderr, no traceback without
``edgefl --debug``). Exit codes: 0 clean stop (also on SIGTERM/SIGINT, in any phase), 2 a bad
command-line option (e.g. ``--set`` without ``=``), 78 (``EX_CONFIG``) a configuration, data or
key-file problem found at start (the systemd unit does not restart on it:
``RestartPreventExitStatus=78``), 1 anything else (a bug). The agent never gives up on an
unreachable broker (it reconnects with backoff), so it does not exit 69. Logs go to stderr (the
journal under systemd), one line per event, without timestamps when ``$JOURNAL_STREAM`` says
journald adds them. torch is imported only when the first training starts; ``predict`` uses
onnxruntime only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from device_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config
from edgefl.cliapp import setup_logging
from edgefl.clierror import UsageError, run_cli

__all__ = [
    "agent_app",
    "check_config_command",
    "main",
    "predict_command",
    "run_command",
    "run_subcommand",
]

agent_app = typer.Typer(
    name="agent",
    help="The edgefl device agent (a systemd daemon on a Raspberry Pi or gateway).",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Agent TOML file (default: $EDGEFL_CONFIG or /etc/edgefl/agent.toml).",
        dir_okay=False,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: --set broker.url=mqtt://host (repeatable)."),
]


def _parse_sets(items: list[str] | None) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set: expected key=value, got {item!r}")
        overrides[key.strip()] = value
    return overrides


def _load(config: Path | None, sets: list[str] | None) -> AgentConfig:
    path = config
    if path is None:
        env_path = os.environ.get("EDGEFL_CONFIG")
        path = Path(env_path) if env_path else DEFAULT_CONFIG_PATH
        if env_path is None and not path.exists():
            path = None  # everything from environment and flags
    return load_config(path, os.environ, _parse_sets(sets))


def run_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run the agent until SIGTERM/SIGINT (the systemd unit's ExecStart).

    Validates the configuration and its files first (nothing is written before); a signal in any
    phase (start-up, connecting, idle, training) stops it cleanly with exit status 0.
    """
    cfg = _load(config, set_)
    from device_agent.preflight import check_files

    check_files(cfg)
    stop_early = _StopFlag.install()  # a signal before the event loop runs is not lost
    setup_logging(cfg.log_level)
    from device_agent.agent import DeviceAgent
    from device_agent.local_privacy import LedgerCorrupt
    from device_agent.spool import SpoolLocked
    from edgefl.data.sources import DataSourceError

    async def main() -> None:
        agent = DeviceAgent(cfg)
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            stop_early.signalled = True
            agent.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if stop_early.is_set():
            agent.stop()
        await agent.run()

    try:
        if not stop_early.is_set():
            asyncio.run(main())
    except DataSourceError as exc:
        key = "data.entrypoint" if cfg.data.entrypoint is not None else "data.path"
        raise ConfigError(key, str(exc)) from None
    except LedgerCorrupt as exc:
        raise ConfigError("state_dir", str(exc)) from None
    except SpoolLocked as exc:
        raise ConfigError(
            "state_dir", f"{exc} (is another agent running with the same state_dir?)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            "state_dir", f"cannot use {str(cfg.state_dir)!r}: {exc.strerror or exc}"
        ) from None
    finally:
        stop_early.restore()
    if stop_early.is_set():
        _exit_now_if_stuck()


EXIT_GRACE_S = 0.5
"""After a signal stopped the agent, how long the process waits for worker threads to end."""


def _exit_now_if_stuck() -> None:
    """The agent stopped on a signal: its state is closed (offline published, spool closed), and
    a training thread only computes (an aborted training writes nothing). Such a thread cannot be
    interrupted inside ``import torch`` (seconds on a Pi, the first training of a process), and
    the interpreter joins it and then tears torch down (1.5 s measured on a loaded 2-core host)
    before exiting. To stop within the 2 s a service manager expects, wait ``EXIT_GRACE_S`` for
    worker threads, then, if one is still running or torch is loaded, flush and end the process
    with status 0 without the interpreter's teardown."""
    import threading
    import time

    deadline = time.monotonic() + EXIT_GRACE_S
    me = threading.current_thread()
    workers = [t for t in threading.enumerate() if t is not me and not t.daemon]
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in workers) or "torch" in sys.modules:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)


class _StopFlag:
    """SIGTERM/SIGINT handlers that only remember the signal, for the time before the event loop
    installs its own (which stop the agent); :meth:`restore` puts the previous ones back."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous: dict[int, object] = {}

    def is_set(self) -> bool:
        return self.signalled

    def _handle(self, signum: int, frame: object) -> None:
        self.signalled = True

    @classmethod
    def install(cls) -> _StopFlag:
        flag = cls()
        for sig in (signal.SIGTERM, signal.SIGINT):
            flag._previous[sig] = signal.signal(sig, flag._handle)
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


@agent_app.callback()
def _default(
    ctx: typer.Context,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Run the agent (no subcommand), or one of the subcommands below."""
    if ctx.invoked_subcommand is None:
        run_command(config, set_)
    else:
        ctx.obj = (config, set_)


@agent_app.command("run")
def run_subcommand(ctx: typer.Context, config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run the agent until SIGTERM/SIGINT (the same as ``edgefl agent`` without a subcommand)."""
    parent = ctx.obj if isinstance(ctx.obj, tuple) else (None, None)
    run_command(config or parent[0], (parent[1] or []) + (set_ or []))


def _inherit(ctx: typer.Context, config: Path | None, sets: list[str] | None) -> AgentConfig:
    parent = ctx.obj if isinstance(ctx.obj, tuple) else (None, None)
    return _load(config or parent[0], (parent[1] or []) + (sets or []))


@agent_app.command("check-config")
def check_config_command(
    ctx: typer.Context,
    config: ConfigOption = None,
    set_: SetOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Validate the configuration (file < environment < --set) and the files it names (data,
    TLS files, Ed25519 keys), then print the effective values."""
    cfg = _inherit(ctx, config, set_)
    from device_agent.preflight import file_problems

    problems = file_problems(cfg)
    if problems:  # one error line: the first problem, and the keys of any others
        first, others = problems[0], [p.key for p in problems[1:]]
        also = f" (also check {', '.join(others)})" if others else ""
        raise ConfigError(first.key, first.problem + also, source=first.source)
    described = cfg.describe()
    local_dp = _local_dp_report(cfg)
    if json_out:
        extra = {} if local_dp is None else {"local_dp": local_dp}
        typer.echo(json.dumps({**described, **extra}, indent=2, sort_keys=True))
        return
    width = max(len(k) for k in described)
    for key in sorted(described):
        typer.echo(f"{key:<{width}}  {described[key]!r}")
    if local_dp is not None:
        typer.echo(f"local DP: {local_dp['summary']}")
    typer.echo("configuration OK", err=True)


def _local_dp_report(cfg: AgentConfig) -> dict[str, object] | None:
    """Local DP's noise and the epsilon spent so far (the ledger in the state directory, read
    only), for ``check-config``; None when local DP is off. An unreadable ledger is the error
    ``run`` would stop with."""
    if cfg.privacy.local is None:
        return None
    from device_agent.local_privacy import LedgerCorrupt, read_report

    try:
        report = read_report(cfg.privacy.local, cfg.state_dir)
    except LedgerCorrupt as exc:
        raise ConfigError("state_dir", str(exc)) from None
    return {**report.to_json(), "summary": report.summary()}


@agent_app.command("predict")
def predict_command(
    ctx: typer.Context,
    input_: Annotated[
        Path, typer.Option("--input", "-i", help="Samples: .npy (N, ...) or .csv rows.")
    ],
    config: ConfigOption = None,
    set_: SetOption = None,
    proba: Annotated[bool, typer.Option("--proba", help="Also print probabilities.")] = False,
) -> None:
    """Classify samples with the model the agent holds (ONNX, onnxruntime; no torch)."""
    cfg = _inherit(ctx, config, set_)
    from device_agent.predict import LocalModel, NoModel, NoOnnxModel, load_input

    try:
        x = load_input(input_)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--input {str(input_)!r}: {exc}") from None
    if not (cfg.state_dir / "model").is_dir():  # LocalModel would create the directory
        raise ConfigError(
            "state_dir",
            f"no model in {str(cfg.state_dir)!r} (has the agent received one yet?)",
        )
    try:
        model = LocalModel(cfg.state_dir, threads=cfg.training.max_threads)
        result = model.predict(x)
    except (NoModel, NoOnnxModel) as exc:  # nothing to run: a fresh or wrong state_dir
        raise ConfigError("state_dir", f"{exc} (in {str(cfg.state_dir)!r})") from None
    except ValueError as exc:  # samples that do not fit the model's input
        raise UsageError(f"--input {str(input_)!r}: {exc}") from None
    typer.echo(f"# model {model.model} v{result.model_version}", err=True)
    for i, label in enumerate(result.labels):
        if proba:
            probs = " ".join(f"{p:.4f}" for p in result.probabilities[i])
            typer.echo(f"{int(label)}\t{probs}")
        else:
            typer.echo(str(int(label)))


def main(argv: list[str] | None = None) -> None:
    """``python -m device_agent``: the agent's commands through the one error path
    (:func:`edgefl.clierror.run_cli`), as ``edgefl agent`` runs them."""
    run_cli(
        lambda: agent_app(args=argv, prog_name="edgefl agent", standalone_mode=False),
        prog="edgefl agent",
    )
