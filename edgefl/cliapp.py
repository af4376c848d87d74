"""The conventions every ``edgefl`` command group shares, written once.

A command group (``edgefl aggregator``, ``edgefl agent``, ...) has no shell-completion
commands and no rich tracebacks (errors are one line, see :mod:`edgefl.clierror`), and runs
its default command when called bare; its ``--config``/``-c`` option names one TOML file. A
service (the aggregator, the agent) logs to stderr with :func:`setup_logging`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer

__all__ = ["command_group", "config_option", "setup_logging"]


def command_group(name: str, help: str) -> typer.Typer:
    """A Typer app for ``edgefl <name>``, described by ``help``."""
    return typer.Typer(
        name=name,
        help=help,
        invoke_without_command=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )


def config_option(help: str) -> Any:
    """The ``--config``/``-c`` option (a file, not a directory) described by ``help``."""
    return typer.Option("--config", "-c", help=help, dir_okay=False)


def setup_logging(level: str) -> None:
    """Log at ``level`` to stderr, without timestamps under systemd's journal (it adds its
    own); paho's chatter only from WARNING up."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journal:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("paho").setLevel(logging.WARNING)
