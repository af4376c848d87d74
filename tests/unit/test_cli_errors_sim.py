"""Every bad invocation of ``edgefl sim`` and ``edgefl demo`` through the real entry point
(``edgefl.cli.main``): one line on stderr naming the option (and its choices where there are
some), the documented exit code, no traceback, and nothing written (no report directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.cli import app, main
from edgefl.clierror import ExitCode


def test_main_registers_the_subcommands_once() -> None:
    # Act: two calls in one process (the table below makes dozens)
    for _ in range(2):
        with pytest.raises(SystemExit):
            main(["version"])

    # Assert
    names = [c.name for c in app.registered_commands]
    assert len(names) == len(set(names))


ROLE_DEVICES = ["--mode", "live", "--role", "devices", "--broker", "mqtt://127.0.0.1:1"]

# (argv after the command, option named in the message, words the message must contain)
SIM_CASES: list[tuple[list[str], str, list[str]]] = [
    (["--devices", "0"], "--devices", [">= 1"]),
    (["--devices", "-5"], "--devices", [">= 1"]),
    (["--mode", "realtime"], "--mode", ["virtual", "live"]),
    (["--algorithm", "fedsgd"], "--algorithm", ["fedbuff", "fedavg"]),
    (["--buffer-size", "0"], "--buffer-size", [">= 1"]),
    (["--concurrency", "0"], "--concurrency", [">= 1"]),
    (["--staleness", "exponential"], "--staleness", ["constant", "polynomial", "hinge"]),
    (["--staleness", "polynomial:-1"], "--staleness", ["polynomial"]),
    (["--staleness", "hinge:1"], "--staleness", ["hinge:A,B"]),
    (["--max-staleness", "-1"], "--max-staleness", [">= 0"]),
    (["--dropout", "1.5"], "--dropout", ["[0, 1]"]),
    (["--profile", "tablet"], "--profile", ["phone", "sensor", "vehicle", "lab", "mixed"]),
    (["--profile", "phone=1,tablet=2"], "--profile", ["phone", "sensor", "vehicle"]),
    (["--speed", "lognormal:1"], "--speed", ["lognormal:MU,SIGMA"]),
    (["--dataset", "cifar"], "--dataset", ["digits", "mnist1d"]),
    (["--partition", "dirichlet:-1"], "--partition", ["iid", "dirichlet:ALPHA", "shards:N"]),
    (["--partition", "random"], "--partition", ["iid", "dirichlet:ALPHA", "shards:N"]),
    (["--codec", "int9"], "--codec", ["fp32", "int8", "int4"]),
    (["--codec", "int8+foo=1"], "--codec", ["topk"]),
    (["--target", "0"], "--target", ["(0, 1]"]),
    (["--target", "1.5"], "--target", ["(0, 1]"]),
    (["--target", "nan"], "--target", ["(0, 1]"]),
    (["--max-time", "0"], "--max-time", ["(0, inf)"]),
    (["--max-updates", "0"], "--max-updates", [">= 1"]),
    (["--seed", "-1"], "--seed", [">= 0"]),
    (["--broker", "mqtt://127.0.0.1:1"], "--broker", ["--mode live"]),
    (["--mode", "live", "--broker", "ftp://x"], "--broker", ["mqtts", "wss"]),
    (["--fleet", "bad fleet"], "--fleet", ["letters, digits"]),
    (["--compare", "fedbuff"], "--compare", ["fedbuff", "fedavg"]),
    (["--compare", "fedbuff,fedbuff"], "--compare", ["fedbuff", "fedavg"]),
    (["--compare", "fedbuff,fedsgd"], "--compare", ["fedbuff", "fedavg"]),
    (["--workers", "0"], "--workers", [">= 1"]),
    (["--devices", "2", "--workers", "3"], "--workers", ["--devices"]),
    (["--malicious", "-0.1"], "--malicious", ["[0, 1]"]),
    (["--attack", "boost"], "--attack", ["scale", "signflip", "noise"]),
    (["--attack-scale", "0"], "--attack-scale", ["(0, inf)"]),
    (["--robust", "krum"], "--robust", ["none", "trimmed_mean", "median"]),
    (["--norm-bound", "-3"], "--norm-bound", ["auto", "off"]),
    (["--norm-bound", "big"], "--norm-bound", ["auto", "off"]),
    (["--epochs", "0"], "--epochs", [">= 1"]),
    (["--lr", "0"], "--lr", ["(0, inf)"]),
    (["--lr", "inf"], "--lr", ["(0, inf)"]),
    (["--batch-size", "0"], "--batch-size", [">= 1"]),
    (["--server-lr", "-1"], "--server-lr", ["(0, inf)"]),
    (["--normalisation", "median"], "--normalisation", ["mean", "sum"]),
    (["--round-deadline", "0"], "--round-deadline", ["(0, inf)"]),
    (["--samples", "10"], "--samples", [">= 20"]),
    (["--dataset", "digits", "--samples", "5000"], "--samples", ["1797"]),
    (["--devices", "ten"], "--devices", ["integer"]),
    (["--no-such-option"], "--no-such-option", []),
    (["--overselect", "0.9"], "--overselect", ["[1, inf)"]),
    (["--server-momentum", "1"], "--server-momentum", ["[0, 1)"]),
    (["--lease", "0"], "--lease", ["(0, inf)"]),
    (["--dp", "central:z=1,foo=2"], "--dp", ["foo=2", "central:z=Z,C=C"]),
    (["--dp", "bogus"], "--dp", ["central", "local", "off"]),
    (["--dp", "central:z=0.1,C=1,eps=0.1"], "--dp", ["raise the noise multiplier"]),
    (["--dp", "local:gaussian,eps=8,C=1,budget=4"], "--dp", ["budget 4", "allows no update"]),
    (["--mode", "live", "--dp", "local:laplace,eps=2,C=1,x=1"], "--dp", ["x=1", "local:"]),
    (["--dp", "central:z=1,C=1", "--algorithm", "fedavg"], "--algorithm", ["fedbuff"]),
    (["--dp", "central:z=1,C=1", "--normalisation", "mean"], "--normalisation", ["sum"]),
    (["--dp", "central:z=1,C=1", "--norm-bound", "auto"], "--norm-bound", ["static MAX"]),
    (["--dp", "central:z=1,C=1", "--robust", "median"], "--robust", ["none"]),
    (["--dp", "central:z=1,C=1", "--compare", "fedbuff,fedavg"], "--compare", ["fedbuff"]),
    (["--mode", "live", "--role", "boss"], "--role", ["all", "aggregator", "devices"]),
    (["--role", "devices"], "--role", ["--mode live"]),
    (["--mode", "live", "--role", "devices"], "--role", ["--broker"]),
    (["--mode", "live", "--device-range", "0:5"], "--device-range", ["--role devices"]),
    (["--mode", "live", "--role", "aggregator", "--compare", "fedbuff,fedavg"], "--compare", []),
    ([*ROLE_DEVICES, "--device-range", "5:3"], "--device-range", ["A:B", "(100)"]),
    ([*ROLE_DEVICES, "--device-range", "0:x"], "--device-range", ["A:B"]),
    ([*ROLE_DEVICES, "--device-range", "90:101"], "--device-range", ["A:B"]),
    ([*ROLE_DEVICES, "--device-range", "0:2", "--workers", "3"], "--workers", ["(2)"]),
    (ROLE_DEVICES, "--report", ["--role all or aggregator"]),
]

DEMO_CASES: list[tuple[list[str], str, list[str]]] = [
    (["--devices", "0"], "--devices", [">= 1"]),
    (["--devices", "-1"], "--devices", [">= 1"]),
    (["--seed", "-1"], "--seed", [">= 0"]),
    (["--broker", "ftp://x"], "--broker", ["mqtts", "wss"]),
    (["--broker", "mqtt://"], "--broker", ["mqtt://"]),
    (["--broker-kind", "rabbitmq"], "--broker-kind", ["auto", "mosquitto", "embedded"]),
    (["--target", "2"], "--target", ["(0, 1]"]),
    (["--max-time", "-1"], "--max-time", ["(0, inf)"]),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    code = exc.value.code
    assert isinstance(code, int)
    return code, captured.out, captured.err


def _assert_one_error_line(err: str, option: str, words: list[str]) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "error:" in line
    assert option in line, line
    for word in words:
        assert word in line, (word, line)


BAD_INVOCATIONS = [(["sim", *args, "--report", "report"], o, w) for args, o, w in SIM_CASES] + [
    (["demo", *args], o, w) for args, o, w in DEMO_CASES
]


@pytest.mark.parametrize(("argv", "option", "words"), BAD_INVOCATIONS, ids=lambda v: str(v))
def test_bad_sim_and_demo_invocations(
    argv: list[str],
    option: str,
    words: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A usage error: one line naming ``option`` and ``words``, and nothing written (no output,
    no file in the working directory, where a report (``demo``: the default one) would land)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(argv, capsys)
    assert code == ExitCode.USAGE
    _assert_one_error_line(err, option, words)
    assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["sim", "demo"])
def test_report_that_cannot_be_created(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    code, _, err = _run([command, "--report", str(blocker / "report")], capsys)
    assert code == ExitCode.USAGE
    _assert_one_error_line(err, "--report", ["not a directory"])
    assert blocker.read_text() == "not a directory\n"
    code, _, err = _run([command, "--report", str(blocker)], capsys)
    assert code == ExitCode.USAGE
    _assert_one_error_line(err, "--report", ["not a directory"])
