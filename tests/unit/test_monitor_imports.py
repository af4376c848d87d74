"""The monitor never imports torch (nor the other training-side packages), checked in a fresh
interpreter so that other tests' imports cannot hide it."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "sklearn", "onnxruntime", "onnx", "mnist1d", "matplotlib")

PROBE = f"""
import json, sys
import edgefl.monitor, edgefl.monitor.client, edgefl.monitor.modes, edgefl.monitor.cli
import edgefl.monitor.tui
heavy = {HEAVY!r}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
print(json.dumps("textual" in sys.modules))
"""


def test_monitor_modules_do_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    heavy, textual = (json.loads(line) for line in result.stdout.splitlines())
    assert heavy == []
    assert textual is True  # the probe really imported the UI


def test_non_interactive_modes_do_not_import_textual() -> None:
    probe = "import sys, edgefl.monitor.cli, edgefl.monitor.modes; print('textual' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
