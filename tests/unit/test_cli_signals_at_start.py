"""A signal while ``edgefl`` is still importing its subcommands ends it quietly with exit 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import edgefl.cli as cli

    def slow_imports():
        os.kill(os.getpid(), signal.{sig})  # arrives in the middle of the imports
        time.sleep(30)

    cli._register_subcommands = slow_imports
    cli.main(["version"])
    """
)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_exits_zero_without_a_traceback(sig: str) -> None:
    # Act
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(sig=sig)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.returncode != -signal.SIGTERM
