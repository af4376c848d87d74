"""What the tests need from the machine, checked loudly.

The project's own set-up (``bash .ci/setup``) installs every tool the tests use (Mosquitto and its
clients included), so a missing tool is a broken set-up, never a reason to skip: each helper fails
the test with the command that fixes it.
"""

from __future__ import annotations

import os
import shutil

import pytest

from broker.launcher import find_mosquitto

SETUP_HINT = "run `bash .ci/setup` (it installs mosquitto and mosquitto-clients)"


def tool(name: str) -> str:
    """The path of the command-line tool ``name`` (e.g. ``mosquitto_pub``); fails if missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: {SETUP_HINT}")
    return path


def mosquitto() -> str:
    """The ``mosquitto`` broker binary; fails if missing."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail(f"mosquitto is not installed: {SETUP_HINT}")
    return str(binary)


def network_namespaces(available: bool) -> None:
    """For a test whose "hosts" are network namespaces (``available``: root and ``ip``, as
    ``cluster.netns_available()`` says): without them it skips on a developer's machine but
    fails under CI (``CI`` set), which runs the suite as root."""
    if available:
        return
    message = "network namespaces need root and iproute2 (`ip netns`)"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)")
    pytest.skip(message)
