"""The aggregator's systemd unit: notify + watchdog, hardened, and its commands are valid."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgefl.cli import main

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "edgefl" / "aggregator" / "systemd" / "edgefl-aggregator.service"
EXAMPLE = REPO / "edgefl" / "aggregator" / "examples" / "aggregator.toml"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_unit_is_notify_with_a_watchdog_and_hardened() -> None:
    # Act
    d = directives()

    # Assert
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert int(d["WatchdogSec"][0]) >= 2
    assert d["User"][0] not in ("", "root")
    assert d["StateDirectory"] == ["edgefl-aggregator"]
    for key, value in (
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ):
        assert d[key] == [value], key
    assert "78" in d["RestartPreventExitStatus"][0].split()
    assert d["Restart"] == ["on-failure"]


@pytest.mark.parametrize("directive", ["ExecStartPre", "ExecStart"])
def test_unit_commands_are_valid_edgefl_command_lines(
    directive: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: the unit's argv with the example config; check-config validates it without
    # running (the run command gets `check-config` appended: the same options, validated)
    argv = shlex.split(directives()[directive][0])
    assert argv[0].endswith("/bin/edgefl")
    args = [str(EXAMPLE) if a == "/etc/edgefl/aggregator.toml" else a for a in argv[1:]]
    if "check-config" not in args:
        args.append("check-config")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))

    # Act
    with pytest.raises(SystemExit) as info:
        main(args)

    # Assert
    assert info.value.code == 0, capsys.readouterr().err


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    # Arrange: the unit with its commands pointing at this interpreter's edgefl
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    edgefl = Path(sys.executable).parent / "edgefl"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/edgefl/venv/bin/edgefl", str(edgefl)))

    # Act
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )

    # Assert: no complaint about this unit (other units of the host may be reported)
    complaints = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert complaints == []
