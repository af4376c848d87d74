# ruff: noqa: E501  (one row per case: the tables read better unwrapped)
"""``edgefl aggregator`` with bad input: one line naming the option or key, a documented exit
code, no traceback, and no state written (the state directory stays absent).

Every case runs the real command path, ``edgefl.cli.main([...])``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgefl.cli import main

GOOD = ["--fleet", "f1", "--model", "digits-mlp"]
# Never a real broker: port 9 (discard) is closed on the test machines, and a case that got
# past validation by mistake gives up after --connect-timeout instead of hanging.
URL = "mqtt://127.0.0.1:9"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    code = info.value.code
    return (code if isinstance(code, int) else 1), [line for line in err.splitlines() if line]


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "garbage": tmp / "garbage.pem",
        "a_file": tmp / "plain-file",
        "empty": tmp / "empty-password",
    }
    files["garbage"].write_text("not a key\n")
    files["a_file"].write_text("x\n")
    files["empty"].write_text("")
    return files


# (id, extra argv (after the command), exit code, words the one line must contain)
USAGE_CASES: list[tuple[str, list[str], int, tuple[str, ...]]] = [
    ("url scheme", ["--broker", "ftp://x", *GOOD], 2, ("--broker", "ftp")),
    ("url port", ["--broker", "mqtt://127.0.0.1:99999", *GOOD], 2, ("--broker",)),
    ("model", ["--broker", URL, "--fleet", "f1", "--model", "nope"], 2, ("--model", "digits-mlp")),
    ("fleet", ["--broker", URL, "--fleet", "bad fleet", "--model", "digits-mlp"], 2, ("--fleet",)),
    ("eval dataset", ["--broker", URL, *GOOD, "--eval-dataset", "cifar"], 2, ("--eval-dataset", "digits", "mnist1d")),
    ("algorithm", ["--broker", URL, *GOOD, "--algorithm", "fedsgd"], 2, ("--algorithm", "fedbuff", "did you mean 'fedavg'")),
    ("staleness", ["--broker", URL, *GOOD, "--staleness", "polinomial"], 2, ("--staleness", "polynomial")),
    ("protocol", ["--broker", URL, *GOOD, "--protocol", "4"], 2, ("--protocol", "3.1.1")),
    ("norm bound", ["--broker", URL, *GOOD, "--norm-bound", "static-clip"], 2, ("--norm-bound", "max_norm")),
    ("buffer size", ["--broker", URL, *GOOD, "--buffer-size", "0"], 2, ("--buffer-size",)),
    ("metrics interval", ["--broker", URL, *GOOD, "--metrics-interval", "0"], 2, ("--metrics-interval",)),
    ("until accuracy without evaluation", ["--broker", URL, *GOOD, "--until-accuracy", "0.9"], 2, ("--until-accuracy", "eval_dataset")),
    ("until accuracy above 1", ["--broker", URL, *GOOD, "--eval-dataset", "digits", "--until-accuracy", "2"], 2, ("--until-accuracy", "(0, 1]")),
    ("connect timeout", ["--broker", URL, *GOOD, "--connect-timeout", "0"], 2, ("--connect-timeout",)),
    ("tls on plain", ["--broker", URL, *GOOD, "--tls-insecure"], 2, ("--tls-insecure",)),
    ("ca file", ["--broker", "mqtts://127.0.0.1:9", *GOOD, "--ca-file", "{tmp}/missing.crt"], 2, ("--ca-file", "missing.crt")),
    ("password file missing", ["--broker", URL, *GOOD, "--username", "u", "--password-file", "{tmp}/nope"], 2, ("--password-file", "nope")),
    ("password file empty", ["--broker", URL, *GOOD, "--username", "u", "--password-file", "{empty}"], 2, ("--password-file", "empty")),
    ("password twice", ["--broker", URL, *GOOD, "--username", "u", "--password", "p", "--password-file", "{a_file}"], 2, ("--password-file", "broker.password")),
    ("signing key", ["--broker", URL, *GOOD, "--signing-key", "{garbage}"], 2, ("--signing-key",)),
    ("device keys", ["--broker", URL, *GOOD, "--device-keys", "{a_file}"], 2, ("--device-keys", "not a directory")),
    ("state dir", ["--broker", URL, *GOOD, "--state-dir", "{a_file}/state"], 2, ("--state-dir", "not a directory")),
    ("missing model", ["--broker", URL, "--fleet", "f1"], 2, ("--model",)),
    ("missing broker", GOOD, 2, ("--broker",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "code", "words"), [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(
    argv: list[str],
    code: int,
    words: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Arrange
    files = _files(tmp_path)
    state = tmp_path / "state"
    args = [a.format(tmp=tmp_path, **files) for a in argv]
    if "--connect-timeout" not in args:
        args += ["--connect-timeout", "1"]
    if "--state-dir" not in args:
        args += ["--state-dir", str(state)]

    # Act
    exit_code, lines = _run(["aggregator", *args], capsys)

    # Assert
    assert exit_code == code
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for word in words:
        assert word in lines[0]
    assert not state.exists()


def _config(tmp: Path, body: str) -> Path:
    path = tmp / "aggregator.toml"
    path.write_text(
        'fleet = "f1"\nmodel = "digits-mlp"\nstate_dir = "state"\n'
        f'[broker]\nurl = "{URL}"\nconnect_timeout_s = 1\n' + body
    )
    return path


CONFIG_CASES: list[tuple[str, str, dict[str, str], tuple[str, ...]]] = [
    ("unknown key", "conect_timeout_s = 3\n", {}, ("broker.conect_timeout_s", "did you mean 'broker.connect_timeout_s'")),
    ("unknown section", "[aggregaton]\nbuffer_size = 3\n", {}, ("aggregaton", "did you mean [aggregation]")),
    ("bad type", "[aggregation]\nbuffer_size = \"ten\"\n", {}, ("aggregation.buffer_size", "integer")),
    ("bad enum", "[aggregation]\nrobust = \"mean\"\n", {}, ("aggregation.robust", "trimmed_mean")),
    ("bad value", "[aggregation]\nbuffer_size = 0\n", {}, ("aggregation.buffer_size",)),
    ("bad eval dataset", "[outputs]\neval_dataset = \"cifar\"\n", {}, ("outputs.eval_dataset",)),
    ("bad device keys", "[security]\ndevice_keys = \"aggregator.toml\"\n", {}, ("security.device_keys",)),
    ("env typo", "", {"EDGEFL_AGG_BROKER_URL": "mqtt://x"}, ("EDGEFL_AGG_BROKER_URL", "EDGEFL_AGG_BROKER__URL")),
    ("env bad value", "", {"EDGEFL_AGG_BROKER__URL": "ftp://x"}, ("broker.url", "EDGEFL_AGG_BROKER__URL")),
    ("not toml", "[[[", {}, ("config", "not valid TOML")),
    ("dp with mean", "[aggregation]\nnormalisation = \"mean\"\n[privacy]\ndp = \"central:z=3\"\n", {}, ("aggregation.normalisation", "privacy.dp", "'sum'")),
    ("dp adaptive bound", "[aggregation]\nnorm_bound = \"adaptive-clip\"\n[privacy]\ndp = \"central:z=3\"\n", {}, ("aggregation.norm_bound", "static")),
    ("dp robust", "[aggregation]\nrobust = \"median\"\n[privacy]\ndp = \"central:z=3\"\n", {}, ("aggregation.robust", "privacy.dp")),
    ("dp fedavg", "[privacy]\ndp = \"central:z=3\"\n", {"EDGEFL_AGG_ALGORITHM": "fedavg"}, ("algorithm", "fedbuff only")),
    ("dp bad text", "[privacy]\ndp = \"central:zz=3\"\n", {}, ("privacy.dp", "bad dp option")),
    ("dp too little noise", "[privacy]\ndp = \"central:z=0.3,eps=1\"\n", {}, ("privacy.dp", "noise multiplier")),
    ("dp local", "[privacy]\ndp = \"local:gaussian,eps=8\"\n", {}, ("privacy.dp", "device setting")),
]  # fmt: skip


@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
@pytest.mark.parametrize(
    ("body", "env", "words"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_is_one_line_exit_78_naming_the_key(
    body: str,
    env: dict[str, str],
    words: tuple[str, ...],
    check: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange
    path = _config(tmp_path, body)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = (
        ["aggregator", "check-config", "--config", str(path)]
        if check
        else ["aggregator", "--config", str(path)]
    )

    # Act
    exit_code, lines = _run(argv, capsys)

    # Assert
    assert exit_code == 78
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "state").exists()


def test_missing_config_file_is_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Act
    exit_code, lines = _run(["aggregator", "--config", str(tmp_path / "nope.toml")], capsys)

    # Assert
    assert exit_code == 78
    assert lines == [
        f"edgefl: error: config: cannot read '{tmp_path / 'nope.toml'}': No such file or directory"
    ]


def test_unreachable_broker_is_exit_69_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: nothing listens on the port
    url = f"mqtt://127.0.0.1:{_closed_port()}"

    # Act
    exit_code, lines = _run(
        ["aggregator", "--broker", url, *GOOD, "--state-dir", str(tmp_path / "s"), "--connect-timeout", "0.5"],
        capsys,
    )  # fmt: skip

    # Assert
    assert exit_code == 69
    assert lines[-1].startswith("edgefl: error: cannot reach the broker")
    assert url in lines[-1]
    assert not any("Traceback" in line for line in lines)
