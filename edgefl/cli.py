"""The ``edgefl`` command line.

Every subcommand imports its implementation lazily, so ``edgefl monitor`` or ``edgefl aggregator``
start without importing torch, and ``edgefl --help`` is instant. ``edgefl provision`` needs the
``cryptography`` package only when it runs, so a device install without the security extra still
has a working ``edgefl``. Errors and exit codes go through :func:`edgefl.clierror.run_cli`.
"""

from __future__ import annotations

import signal
from typing import Annotated, Any

import typer

from edgefl import __version__
from edgefl.clierror import run_cli, set_debug

app = typer.Typer(
    name="edgefl",
    help="Asynchronous federated learning (FedBuff) for fleets of edge and IoT devices over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edgefl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the edgefl version and exit.",
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Print tracebacks of errors (also EDGEFL_DEBUG=1).")
    ] = False,
) -> None:
    """Asynchronous federated learning (FedBuff) for fleets of edge and IoT devices over MQTT."""
    if debug:
        set_debug(True)


@app.command()
def version() -> None:
    """Print the edgefl version."""
    typer.echo(__version__)


_registered = False


def _register_subcommands() -> None:
    """Attach the subcommands that live next to their implementation (once per process)."""
    global _registered
    if _registered:
        return
    _registered = True
    from broker.cli import broker_command
    from device_agent.cli import agent_app
    from edgefl.aggregator.cli import aggregator_app
    from edgefl.monitor.cli import monitor_command
    from edgefl.provision_cli import provision_app
    from firmware_sim.cli import demo_command, sim_command

    app.command(name="demo")(demo_command)
    app.command(name="sim")(sim_command)
    app.add_typer(aggregator_app, name="aggregator")
    app.add_typer(agent_app, name="agent")
    app.command(name="monitor")(monitor_command)
    app.command(name="broker")(broker_command)
    app.add_typer(provision_app, name="provision")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one error line and a documented exit code on failure.

    Always ends in ``SystemExit`` with an :class:`edgefl.clierror.ExitCode`; ``argv`` (default
    ``sys.argv[1:]``) lets tests run the real command path.
    """
    previous = _quiet_signals()
    try:
        _register_subcommands()
    except KeyboardInterrupt:
        raise SystemExit(0) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    run_cli(lambda: app(args=argv, prog_name="edgefl", standalone_mode=False))


def _quiet_signals() -> dict[int, Any]:
    """While the subcommands import (seconds on a loaded Pi), SIGTERM and SIGINT end the process
    quietly with exit 0 (no KeyboardInterrupt traceback, no -15); returns the handlers to put
    back, after which each command installs its own."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, leave)
    return previous


if __name__ == "__main__":
    main()
