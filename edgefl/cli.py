"""The ``edgefl`` command line.

Every subcommand imports its implementation lazily, so ``edgefl monitor`` or ``edgefl aggregator``
start without importing torch, and ``edgefl --help`` is instant.
"""

from __future__ import annotations

import typer

from edgefl import __version__

app = typer.Typer(
    name="edgefl",
    help="Asynchronous federated learning (FedBuff) for fleets of edge and IoT devices over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.command()
def version() -> None:
    """Print the edgefl version."""
    typer.echo(__version__)


def _register_subcommands() -> None:
    """Attach the subcommands that live next to their implementation."""
    from broker.cli import broker_command
    from device_agent.cli import agent_app
    from edgefl.aggregator.cli import aggregator_command
    from edgefl.monitor.cli import monitor_command
    from edgefl.security.cli import provision_app
    from firmware_sim.cli import demo_command, sim_command

    app.command(name="demo")(demo_command)
    app.command(name="sim")(sim_command)
    app.command(name="aggregator")(aggregator_command)
    app.add_typer(agent_app, name="agent")
    app.command(name="monitor")(monitor_command)
    app.command(name="broker")(broker_command)
    app.add_typer(provision_app, name="provision")


def main() -> None:
    """Console-script entry point."""
    _register_subcommands()
    app()


if __name__ == "__main__":
    main()
