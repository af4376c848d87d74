"""``edgefl aggregator --role leader|helper``: a bad role, key or option is one line and exit 78,
before anything connects (the real command path, ``edgefl.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.cli import main
from edgefl.secagg import HelperKeys


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    return int(info.value.code or 0), [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--role", "helpr", "--helper-key", "KEY"], "did you mean 'helper'?"),
        (["--role", "leader"], "--helper-key is required"),
        (["--role", "leader", "--helper-key", "NOPE"], "not a readable X25519 public key"),
        (["--role", "helper", "--helper-key", "KEY"], "not a readable X25519 private key"),
        (["--role", "leader", "--helper-key", "KEY", "--robust", "median"], "needs individual"),
        (["--role", "leader", "--helper-key", "KEY", "--secagg-bits", "16"], "bits must be"),
        (
            ["--role", "leader", "--helper-key", "KEY", "--dp", "central:z=1,C=0.5,cap=3"],
            "--secagg-clip 1 with --dp under secure aggregation",
        ),
        (
            ["--role", "helper", "--helper-key", "KEY", "--eval-dataset", "digits"],
            "--eval-dataset: the helper holds no model",
        ),
        (
            [
                "--role",
                "leader",
                "--helper-key",
                "KEY",
                "--eval-dataset",
                "digits",
                "--until-accuracy",
                "0.9",
            ],
            "--until-accuracy is not available with --role leader",
        ),
        (
            ["--role", "leader", "--helper-key", "KEY", "--metrics-port", "9108"],
            "--metrics-port is not available with --role leader",
        ),
        (
            ["--role", "helper", "--helper-key", "KEY", "--metrics-port", "9108"],
            "--metrics-port is not available with --role helper",
        ),
    ],
)
def test_bad_secagg_options_are_one_line_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    key = tmp_path / "helper.pub"
    key.write_bytes(HelperKeys.generate().public_pem())
    argv = [
        "aggregator", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "digits-mlp",
        "--state-dir", str(tmp_path / "state"),
        *[str(key) if a == "KEY" else str(tmp_path / a) if a == "NOPE" else a for a in extra],
    ]  # fmt: skip
    code, lines = _run(argv, capsys)
    assert code == 78
    assert len(lines) == 1
    assert message in lines[0]
