"""Install per role: the CLI runs without any optional package, and a missing extra is named.

The subprocess tests make the optional packages unimportable with a ``sitecustomize`` that puts a
blocking finder first on ``sys.meta_path`` (PYTHONPATH points at it), so they see what a core
install (``pip install edgefl-mqtt``, no extras) sees, even inside the dev venv. ``.ci/roles``
checks the same against real per-role installs of the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest

from edgefl.clierror import ConfigError, ExitCode
from edgefl.extras import (
    DISTRIBUTION,
    EXTRA_OF_MODULE,
    ensure_installed,
    install_hint,
    missing_extra_error,
    require,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = ROOT / "device_agent" / "examples" / "agent.toml"

OPTIONAL = sorted(EXTRA_OF_MODULE)

BLOCKER = """
import sys

BLOCKED = frozenset({blocked!r})


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            message = f"No module named {{name!r}} (blocked by the test)"
            raise ModuleNotFoundError(message, name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


def _blocked_env(tmp_path: Path, blocked: list[str]) -> dict[str, str]:
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env.pop("EDGEFL_CONFIG", None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "120"
    return env


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """Run ``code`` with ``args`` in a fresh interpreter (with ``env``: behind the blocker)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )


def _edgefl(env: dict[str, str], *args: str) -> CompletedProcess[str]:
    """Run the ``edgefl`` console script's entry point in a fresh interpreter."""
    return _python("import sys; from edgefl.cli import main; main(sys.argv[1:])", *args, env=env)


def _config_error_output(tmp_path: Path, blocked: list[str], call: str) -> list[str]:
    """What a fresh interpreter with ``blocked`` unimportable prints when it runs ``call``
    (from :mod:`edgefl.extras`): the ``ConfigError`` message it raises, then whether torch
    got imported."""
    probe = (
        "import sys\n"
        "from edgefl.extras import ensure_installed, require\n"
        "from edgefl.clierror import ConfigError\n"
        "try:\n"
        f"    {call}\n"
        "except ConfigError as exc:\n"
        "    print(exc.message)\n"
        "print('torch' in sys.modules)\n"
    )
    result = _python(probe, env=_blocked_env(tmp_path, blocked))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_blocker_blocks(tmp_path: Path) -> None:
    env = _blocked_env(tmp_path, ["numpy"])
    result = _python("import numpy", env=env)
    assert result.returncode == 1
    assert "blocked by the test" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("version",),
        ("agent", "--help"),
        ("agent", "check-config", "--help"),
        ("agent", "run", "--help"),
        ("aggregator", "--help"),
        ("monitor", "--help"),
        ("broker", "--help"),
        ("sim", "--help"),
        ("demo", "--help"),
        ("provision", "--help"),
    ],
)
def test_cli_help_runs_without_optional_packages(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = _blocked_env(tmp_path, OPTIONAL)
    result = _edgefl(env, *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip()


def test_agent_check_config_runs_without_optional_packages(tmp_path: Path) -> None:
    data = tmp_path / "train.npz"
    np.savez(data, x=np.zeros((4, 40), np.float32), y=np.array([0, 1, 2, 3]))
    env = _blocked_env(tmp_path, OPTIONAL)
    result = _edgefl(
        env,
        "agent",
        "check-config",
        "--config",
        str(EXAMPLE_CONFIG),
        "--set",
        f"data.path={data}",
        "--set",
        f"state_dir={tmp_path / 'state'}",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "greenhouse" in result.stdout


def test_importing_the_cli_and_its_commands_imports_no_optional_package(tmp_path: Path) -> None:
    probe = (
        "import json, sys\n"
        "import edgefl.cli\n"
        "edgefl.cli._register_subcommands()\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r})))\n"
    )
    result = _python(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_extra_error_names_the_extra() -> None:
    err = missing_extra_error(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert isinstance(err, ConfigError)
    assert err.exit_code == ExitCode.CONFIG
    assert err.message == (
        "this needs the optional package 'torch', which is not installed: "
        "pip install 'edgefl-mqtt[train]'"
    )


def test_missing_extra_error_uses_the_top_level_package_and_the_feature() -> None:
    exc = ModuleNotFoundError("No module named 'textual.app'", name="textual.app")
    err = missing_extra_error(exc, feature="the terminal UI")
    assert err is not None
    assert err.message.startswith("the terminal UI needs the optional package 'textual'")
    assert err.message.endswith(install_hint("monitor"))


def test_missing_extra_error_leaves_other_errors_alone() -> None:
    assert missing_extra_error(ModuleNotFoundError("No module named 'foo'", name="foo")) is None
    assert missing_extra_error(ModuleNotFoundError("no name")) is None
    assert missing_extra_error(ImportError("cannot import name 'x'", name="torch")) is None


def test_require_imports_an_installed_optional_package() -> None:
    module = require("cryptography", feature="signing")
    assert module.__name__ == "cryptography"


def test_ensure_installed_passes_for_installed_packages() -> None:
    ensure_installed("cryptography", "textual", feature="x")


@pytest.mark.parametrize(
    ("blocked", "call", "message"),
    [
        pytest.param(
            "amqtt",
            "require('amqtt.broker', feature='the embedded broker')",
            "the embedded broker needs the optional package 'amqtt', which is not installed: "
            "pip install 'edgefl-mqtt[broker]'",
            id="require",
        ),
        pytest.param(
            "onnx",
            "ensure_installed('torch', 'onnx', feature='--publish-onnx')",
            "--publish-onnx needs the optional package 'onnx', which is not installed: "
            "pip install 'edgefl-mqtt[onnx]'",
            id="ensure_installed names the first missing extra",
        ),
        pytest.param(
            "matplotlib",
            "ensure_installed('torch', 'matplotlib', feature='edgefl sim', extra='sim')",
            "edgefl sim needs the optional package 'matplotlib', which is not installed: "
            "pip install 'edgefl-mqtt[sim]'",
            id="ensure_installed suggests the feature's extra",
        ),
    ],
)
def test_a_missing_optional_package_is_a_config_error_naming_its_extra(
    tmp_path: Path, blocked: str, call: str, message: str
) -> None:
    lines = _config_error_output(tmp_path, [blocked], call)
    assert lines == [message, "False"]  # checked without importing torch


def test_ensure_installed_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="not an optional dependency"):
        ensure_installed("numpy", feature="x")
    with pytest.raises(ValueError, match="not an extra"):
        ensure_installed("torch", feature="x", extra="gpu")


def test_require_rejects_a_module_that_is_not_optional() -> None:
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy", feature="x")


def test_extras_table_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    extras: dict[str, list[str]] = project["optional-dependencies"]
    pip_name = {"sklearn": "scikit-learn", "prometheus_client": "prometheus-client"}
    for module, extra in EXTRA_OF_MODULE.items():
        direct = [r for r in extras[extra] if not r.startswith(DISTRIBUTION)]
        names = {r.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip() for r in direct}
        assert pip_name.get(module, module) in names, (module, extra, direct)


def test_core_dependencies_hold_no_optional_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for name in (
        "torch",
        "amqtt",
        "aiomqtt",
        "cryptography",
        "matplotlib",
        "textual",
        "onnx",
        "prometheus",
    ):
        assert name not in core
