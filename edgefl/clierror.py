"""One error path for every ``edgefl`` command: typed command errors and documented exit codes.

A command that cannot go on raises one of the :class:`CommandError` subclasses below (or lets a
click usage error through); :func:`run_cli` turns it into **one line on stderr** and the exit code
of :class:`ExitCode`. A traceback is printed only with ``edgefl --debug`` (or ``EDGEFL_DEBUG=1``).

Exit codes (documented in docs/OPERATIONS.md and docs/AGGREGATOR.md; stable):

====  ==================  ==========================================================
code  name                meaning
====  ==================  ==========================================================
0     OK                  success, or a clean stop on SIGTERM / SIGINT
1     FAILURE             an unexpected error (a bug: run with ``--debug`` and report it)
2     USAGE               a bad option or argument on the command line
69    UNAVAILABLE         the broker could not be reached (``EX_UNAVAILABLE``)
78    CONFIG              a bad configuration file, key file or data path (``EX_CONFIG``)
====  ==================  ==========================================================

Contract for command implementations: validate everything (options, config, files) **before**
writing anything (state, reports, keys); raise :class:`UsageError` for a bad option (name the
option and the valid choices), :class:`ConfigError` for a bad config key or file (name the key),
and :class:`BrokerUnavailable` when connecting gave up.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from typer import TyperException

__all__ = [
    "BrokerUnavailable",
    "CommandError",
    "ConfigError",
    "ExitCode",
    "UsageError",
    "choices_hint",
    "debug_enabled",
    "run_cli",
    "set_debug",
]


class ExitCode(IntEnum):
    """Process exit codes of every ``edgefl`` command (see the module docstring)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 69
    CONFIG = 78


class CommandError(Exception):
    """A command cannot go on; ``str()`` is the one line the user sees (without a prefix)."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CommandError, ValueError):
    """A bad command-line option or argument. The message names the option (``--profile``)."""

    exit_code = ExitCode.USAGE


class ConfigError(CommandError, ValueError):
    """A bad configuration key, config file, key file or data path. The message names the key."""

    exit_code = ExitCode.CONFIG


class BrokerUnavailable(CommandError, ConnectionError):
    """The MQTT broker could not be reached (after the configured retries)."""

    exit_code = ExitCode.UNAVAILABLE


def choices_hint(value: str, choices: Iterable[str]) -> str:
    """``"'x' is not one of a, b, c (did you mean 'b'?)"``: the tail of a usage message."""
    import difflib

    options = list(choices)
    text = f"{value!r} is not one of {', '.join(options)}"
    close = difflib.get_close_matches(value, options, n=1)
    if close:
        text += f" (did you mean {close[0]!r}?)"
    return text


_debug = os.environ.get("EDGEFL_DEBUG", "") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Turn tracebacks on (``edgefl --debug``)."""
    global _debug
    _debug = enabled


def debug_enabled() -> bool:
    """Whether ``--debug`` (or ``EDGEFL_DEBUG=1``) asked for tracebacks."""
    return _debug


def _fail(prog: str, message: str, code: int) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _usage_exit(prog: str, exc: TyperException) -> NoReturn:
    """Typer's (vendored click's) usage errors: bad option, missing option, bad choice."""
    if _debug:
        traceback.print_exc()
    message = " ".join(exc.format_message().split())
    exit_code = exc.exit_code
    if not message:  # ``no_args_is_help``: the help was printed already
        raise SystemExit(exit_code) from None
    ctx = getattr(exc, "ctx", None)
    command_path = getattr(ctx, "command_path", "") or prog
    _fail(command_path, message, exit_code)


def _unexpected_exit(prog: str, exc: Exception) -> NoReturn:
    """Any other exception: a missing optional extra's own error, else one line naming the
    exception's type and exit 1 (the traceback only with ``--debug``)."""
    if _debug:
        traceback.print_exc()
    from edgefl.extras import missing_extra_error

    missing = missing_extra_error(exc)
    if missing is not None:  # an optional package of an extra that is not installed
        _fail(prog, missing.message, missing.exit_code)
    if _debug:
        raise SystemExit(ExitCode.FAILURE) from None
    _fail(
        prog,
        f"{type(exc).__name__}: {exc} (run with --debug for the traceback)",
        ExitCode.FAILURE,
    )


def run_cli(invoke: Callable[[], object], *, prog: str = "edgefl") -> NoReturn:
    """Run a click/typer command in non-standalone mode and map every outcome to an exit code.

    ``invoke`` is e.g. ``lambda: app(standalone_mode=False)``. Typer's usage errors become one
    line and exit 2; :class:`CommandError` subclasses their own code; ``KeyboardInterrupt`` a
    quiet 130; any other exception one line naming its type and exit 1 (the traceback only with
    ``--debug``).
    """
    import typer

    try:
        result = invoke()
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except typer.TyperException as exc:
        _usage_exit(prog, exc)
    except CommandError as exc:
        if _debug:
            traceback.print_exc()
        _fail(prog, exc.message, exc.exit_code)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:
        _unexpected_exit(prog, exc)
    code = result if isinstance(result, int) else 0
    raise SystemExit(code)
