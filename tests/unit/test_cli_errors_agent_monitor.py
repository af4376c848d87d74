"""One error path for ``edgefl agent``, ``edgefl monitor`` and ``edgefl provision``: a table of
bad invocations, each run through ``edgefl.cli.main`` (the console script's code path).

Every row asserts: the documented exit code (2 usage, 69 broker unreachable, 78 bad config),
exactly one line on stderr that names the option or config key, no traceback, and nothing
written in the working directory (no state dir, spool, provisioning output).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgefl.cli import main

pytest.importorskip("cryptography")  # the dev install has it; the rows below make real keys


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    code: int
    names: tuple[str, ...]  # every one must appear in the error line


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- files the rows refer to (created before the "nothing written" snapshot) ---------------------


def _write_fixtures(root: Path) -> None:
    from edgefl.security import generate_private_key, write_private_key, write_public_key
    from edgefl.security.pki import make_ca

    np.savez(root / "train.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    (root / "train.csv").write_text("a,b,target\n1,2,0\n")
    np.save(root / "x.npy", np.zeros((2, 64), np.float32))
    (root / "garbage.pem").write_text("not a key or a certificate\n")
    ca = make_ca("test-ca")
    (root / "cert.pem").write_bytes(ca.cert_pem())
    (root / "other.key").write_bytes(make_ca("other").key_pem())  # does not match cert.pem
    key = generate_private_key()
    write_private_key(root / "good.key", key)
    write_public_key(root / "good.pub", key.public_key())
    (root / "agent.toml").write_text(
        'fleet = "f"\ndevice_id = "d1"\nstate_dir = "state"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1883"\n'
        '[data]\nkind = "npz"\npath = "train.npz"\n'
    )
    (root / "nobroker.toml").write_text(
        'fleet = "f"\ndevice_id = "d1"\n[data]\nkind = "npz"\npath = "train.npz"\n'
    )


def _agent(*args: str) -> list[str]:
    return ["agent", *args[:1], "--config", "agent.toml", *args[1:]]


TLS_URL = "broker.url=mqtts://127.0.0.1:8883"
TLS = ["--set", TLS_URL]


def _bad_config(name: str, command: str, *settings: str, names: tuple[str, ...]) -> Case:
    """``edgefl agent <command>`` with ``--set`` each of ``settings``: a config error (78)."""
    sets = [arg for setting in settings for arg in ("--set", setting)]
    return Case(name, _agent(command, *sets), 78, names)


CLOSED = f"mqtt://127.0.0.1:{_free_port()}"

CASES = [
    # edgefl agent: usage (2)
    Case("agent run --set without =", _agent("run", "--set", "fleet"), 2, ("--set",)),
    Case("agent check-config --set =x", _agent("check-config", "--set", "=x"), 2, ("--set",)),
    Case("agent unknown option", ["agent", "run", "--confg", "x"], 2, ("--confg",)),
    Case("agent predict without --input", _agent("predict"), 2, ("--input",)),
    Case("agent predict bad --input", _agent("predict", "--input", "nope.npy"), 2, ("--input",)),
    Case(
        "agent predict without a model",
        _agent("predict", "--input", "x.npy"),
        78,
        ("state_dir", "model"),
    ),
    # edgefl agent: configuration (78)
    Case("agent config file missing", ["agent", "run", "--config", "no.toml"], 78, ("config",)),
    Case(
        "agent run required key missing",
        ["agent", "run", "--config", "nobroker.toml"],
        78,
        ("broker.url",),
    ),
    _bad_config("agent unknown key", "check-config", "brokr.url=x", names=("brokr.url",)),
    _bad_config(
        "agent bad broker scheme", "run", "broker.url=ftp://x", names=("broker.url", "mqtts")
    ),
    _bad_config(
        "agent bad choice",
        "run",
        "training.isolation=container",
        names=("training.isolation", "'thread', 'process'"),
    ),
    _bad_config(
        "agent run data.path missing",
        "run",
        "data.path=missing.npz",
        names=("data.path", "missing.npz"),
    ),
    _bad_config(
        "agent check-config data.path missing",
        "check-config",
        "data.path=missing.npz",
        names=("data.path",),
    ),
    _bad_config(
        "agent data.path not an npz", "check-config", "data.path=garbage.pem", names=("data.path",)
    ),
    _bad_config(
        "agent npz without y_key",
        "check-config",
        "data.y_key=labels",
        names=("data.y_key", "labels"),
    ),
    _bad_config(
        "agent csv without label column",
        "check-config",
        "data.kind=csv",
        "data.path=train.csv",
        names=("data.label_column", "label"),
    ),
    _bad_config(
        "agent entrypoint module missing",
        "check-config",
        "data.kind=entrypoint",
        "data.path=",
        "data.entrypoint=no_such_module_x:load",
        names=("data.entrypoint", "no_such_module_x"),
    ),
    _bad_config(
        "agent garbage signing key",
        "check-config",
        "security.signing_key_file=garbage.pem",
        names=("security.signing_key_file",),
    ),
    _bad_config(
        "agent run garbage signing key",
        "run",
        "security.signing_key_file=garbage.pem",
        names=("security.signing_key_file",),
    ),
    _bad_config(
        "agent public key given as signing key",
        "check-config",
        "security.signing_key_file=good.pub",
        names=("security.signing_key_file",),
    ),
    _bad_config(
        "agent garbage manifest key",
        "check-config",
        "security.aggregator_public_key_file=garbage.pem",
        names=("security.aggregator_public_key_file",),
    ),
    _bad_config(
        "agent garbage CA",
        "check-config",
        TLS_URL,
        "broker.ca_file=garbage.pem",
        names=("broker.ca_file",),
    ),
    _bad_config(
        "agent garbage client cert",
        "check-config",
        TLS_URL,
        "broker.cert_file=garbage.pem",
        "broker.key_file=good.key",
        names=("broker.cert_file",),
    ),
    _bad_config(
        "agent key not matching cert",
        "run",
        TLS_URL,
        "broker.cert_file=cert.pem",
        "broker.key_file=other.key",
        names=("broker.key_file",),
    ),
    _bad_config("agent state_dir is a file", "run", "state_dir=train.csv", names=("state_dir",)),
    # edgefl monitor
    Case("monitor bad fleet", ["monitor", "--fleet", "bad fleet"], 2, ("--fleet", "bad fleet")),
    Case("monitor no fleet", ["monitor", "--once"], 2, ("--fleet",)),
    Case(
        "monitor bad scheme",
        ["monitor", "--fleet", "f", "--broker", "ftp://x"],
        2,
        ("--broker", "mqtt", "mqtts"),
    ),
    Case(
        "monitor bad protocol",
        ["monitor", "--fleet", "f", "--protocol", "7"],
        2,
        ("--protocol", "3.1.1"),
    ),
    Case("monitor dry-run alone", ["monitor", "--fleet", "f", "--dry-run"], 2, ("--dry-run",)),
    Case(
        "monitor clear outside fleet",
        ["monitor", "--fleet", "f", "--clear-retained", "#"],
        2,
        ("--clear-retained", "edgefl/v1/f/", "lost"),
    ),
    Case("monitor bad topic", ["monitor", "--fleet", "f", "--topic", "a/#/b"], 2, ("--topic",)),
    Case(
        "monitor negative interval",
        ["monitor", "--fleet", "f", "--json", "--interval", "-1"],
        2,
        ("--interval",),
    ),
    Case(
        "monitor zero connect timeout",
        ["monitor", "--fleet", "f", "--once", "--connect-timeout", "0"],
        2,
        ("--connect-timeout",),
    ),
    Case(
        "monitor TLS file on plain URL",
        ["monitor", "--fleet", "f", "--ca-file", "cert.pem"],
        2,
        ("--ca-file", "mqtts://"),
    ),
    Case(
        "monitor cert without key",
        ["monitor", "--fleet", "f", "--broker", "mqtts://h", "--cert-file", "cert.pem"],
        2,
        ("--cert-file", "--key-file"),
    ),
    Case(
        "monitor password and password file",
        ["monitor", "--fleet", "f", "--password", "x", "--password-file", "cert.pem"],
        2,
        ("--password", "--password-file"),
    ),
    Case(
        "monitor password file missing",
        ["monitor", "--fleet", "f", "--password-file", "nope"],
        78,
        ("--password-file",),
    ),
    Case(
        "monitor garbage CA",
        ["monitor", "--fleet", "f", "--broker", "mqtts://h", "--ca-file", "garbage.pem"],
        78,
        ("--ca-file",),
    ),
    Case(
        "monitor key not matching cert",
        [
            "monitor",
            "--fleet",
            "f",
            "--broker",
            "mqtts://h",
            "--cert-file",
            "cert.pem",
            "--key-file",
            "other.key",
        ],
        78,
        ("--key-file",),
    ),
    Case(
        "monitor broker unreachable",
        ["monitor", "--fleet", "f", "--broker", CLOSED, "--once", "--connect-timeout", "0.5"],
        69,
        ("--broker", CLOSED, "Connection refused"),
    ),
    Case(
        "monitor stream broker unreachable",
        ["monitor", "--fleet", "f", "--broker", CLOSED, "--json", "--connect-timeout", "0.5"],
        69,
        ("--broker",),
    ),
    # edgefl provision
    Case(
        "provision device bad id",
        ["provision", "device", "--out", "pki", "--device", "bad id"],
        2,
        ("--device", "bad id"),
    ),
    Case(
        "provision init bad fleet",
        ["provision", "init", "--out", "pki", "--fleet", "bad f", "--broker-host", "h"],
        2,
        ("--fleet",),
    ),
    Case(
        "provision init bad port",
        ["provision", "init", "--out", "pki", "--fleet", "f", "--broker-host", "h", "--port", "0"],
        2,
        ("--port",),
    ),
    Case(
        "provision init bad host",
        ["provision", "init", "--out", "pki", "--fleet", "f", "--broker-host", "a b"],
        2,
        ("--broker-host",),
    ),
    Case(
        "provision init out is a file",
        ["provision", "init", "--out", "train.csv", "--fleet", "f", "--broker-host", "h"],
        2,
        ("--out",),
    ),
    Case("provision init no fleet", ["provision", "init", "--out", "pki"], 2, ("--fleet",)),
    Case(
        "provision device no fleet dir",
        ["provision", "device", "--out", "pki", "--device", "d1"],
        78,
        ("--out", "provision init"),
    ),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in list(os.environ):
        if var.startswith("EDGEFL_") or var == "STATE_DIRECTORY":
            monkeypatch.delenv(var)
    _write_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_invocation_is_one_line_with_its_exit_code(
    case: Case, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    before = _tree(workdir)

    # Act
    with pytest.raises(SystemExit) as stop:
        main(case.args)
    out = capsys.readouterr()

    # Assert
    lines = out.err.strip().splitlines()
    print(f"{case.code} edgefl {' '.join(case.args)}\n    -> {out.err.strip()}")
    assert stop.value.code == case.code, out.err
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err
    assert "error:" in lines[0]
    for name in case.names:
        assert name in lines[0], (name, lines[0])
    assert _tree(workdir) == before  # nothing written: no state dir, spool, keys, output dir


def test_good_check_config_passes_the_same_file_checks(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fixtures the table breaks one at a time are accepted together (the checks are not
    refusing everything)."""
    args = _agent(
        "check-config",
        *TLS,
        "--set",
        "broker.ca_file=cert.pem",
        "--set",
        "broker.cert_file=cert.pem",
        "--set",
        "broker.key_file=" + str(workdir / "ca.key"),
        "--set",
        "security.signing_key_file=good.key",
        "--set",
        "security.aggregator_public_key_file=good.pub",
    )
    from edgefl.security.pki import make_ca

    ca = make_ca("pair")
    (workdir / "cert.pem").write_bytes(ca.cert_pem())
    (workdir / "ca.key").write_bytes(ca.key_pem())

    with pytest.raises(SystemExit) as stop:
        main(args)
    out = capsys.readouterr()

    assert stop.value.code == 0, out.err
    assert "configuration OK" in out.err
    assert not (workdir / "state").exists()  # check-config never creates the state dir


def test_ed25519_keys_without_cryptography_name_the_extra(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    for name in [
        m for m in sys.modules if m == "edgefl.security" or m.startswith("edgefl.security.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m.split(".")[0] == "cryptography"] + ["cryptography"]:
        monkeypatch.setitem(sys.modules, name, None)  # imports fail as if it was not installed

    with pytest.raises(SystemExit) as stop:
        main(_agent("check-config", "--set", "security.signing_key_file=good.key"))
    err = capsys.readouterr().err

    assert stop.value.code == 78
    assert "security.signing_key_file" in err
    assert "'cryptography'" in err
    assert "edgefl-mqtt[security]" in err
