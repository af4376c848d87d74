"""Checks of the files an agent configuration names, before the agent writes anything.

:func:`device_agent.config.load_config` validates values (types, ranges, URLs, that TLS files
exist). :func:`file_problems` goes further and opens the files: the training data exists (and an
``.npz`` holds ``x_key``/``y_key``, a CSV has ``label_column``), the TLS CA bundle, client
certificate and key parse (with the standard library's :mod:`ssl`), and the Ed25519 signing and
manifest keys parse (with ``cryptography``, the security extra; without it the problem says which
extra to install). Each problem is one :class:`~device_agent.config.ConfigError` naming its key.

``edgefl agent check-config`` reports these; ``edgefl agent run`` refuses to start on the first
one, before it creates its state directory. Reads files only; writes nothing.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import ssl
import zipfile
from collections.abc import Callable
from pathlib import Path

from device_agent.config import AgentConfig, ConfigError, DataKind

__all__ = ["SECURITY_EXTRA_HINT", "check_files", "file_problems"]

SECURITY_EXTRA_HINT = "install the security extra (pip install 'edgefl-mqtt[security]') to check it"
"""What to do when an Ed25519 key file is configured but ``cryptography`` is not installed."""

_MAX_HEADER = 64 * 1024


def file_problems(config: AgentConfig) -> list[ConfigError]:
    """Every file problem of ``config``, in key order of the config file (empty: all good)."""
    problems: list[ConfigError] = []
    for check in (_data_problem, _state_dir_problem):
        problem = check(config)
        if problem is not None:
            problems.append(problem)
    problems.extend(_tls_problems(config))
    problems.extend(_ed25519_problems(config))
    return problems


def check_files(config: AgentConfig) -> None:
    """Raise the first of :func:`file_problems`, if any."""
    problems = file_problems(config)
    if problems:
        raise problems[0]


# --- data ----------------------------------------------------------------------------------------


def _data_problem(config: AgentConfig) -> ConfigError | None:
    data = config.data
    if data.kind is DataKind.ENTRYPOINT:
        module = (data.entrypoint or "").partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return ConfigError("data.entrypoint", f"no module {module!r} on the Python path")
        if data.path is not None and not data.path.exists():
            return ConfigError("data.path", f"no such file or directory {str(data.path)!r}")
        return None
    path = data.path
    assert path is not None  # DataConfig requires it for npz and csv
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        return ConfigError("data.path", f"{what}: {str(path)!r}")
    try:
        if data.kind is DataKind.NPZ:
            return _npz_problem(path, data.x_key, data.y_key)
        return _csv_problem(path, data.label_column)
    except OSError as exc:
        return ConfigError("data.path", f"cannot read {str(path)!r}: {exc.strerror or exc}")


def _npz_problem(path: Path, x_key: str, y_key: str) -> ConfigError | None:
    if not zipfile.is_zipfile(path):
        return ConfigError("data.path", f"{str(path)!r} is not an .npz file (numpy.savez)")
    with zipfile.ZipFile(path) as archive:
        arrays = sorted(name.removesuffix(".npy") for name in archive.namelist())
    for key, name in (("data.x_key", x_key), ("data.y_key", y_key)):
        if name not in arrays:
            return ConfigError(key, f"{str(path)!r} has no array {name!r} (it has {arrays})")
    return None


def _csv_problem(path: Path, label_column: str) -> ConfigError | None:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        first = handle.readline(_MAX_HEADER)
    header = next(csv.reader([first]), [])
    columns = [c.strip() for c in header]
    if label_column not in columns:
        shown = ", ".join(columns[:10]) + (", ..." if len(columns) > 10 else "")
        return ConfigError(
            "data.label_column",
            f"{str(path)!r} has no column {label_column!r} in its header ({shown or 'empty'})",
        )
    return None


def _state_dir_problem(config: AgentConfig) -> ConfigError | None:
    state = config.state_dir
    if state.exists() and not state.is_dir():
        return ConfigError("state_dir", f"{str(state)!r} exists and is not a directory")
    return None


# --- TLS (standard library only) -----------------------------------------------------------------


def _no_password() -> bytes:
    # an encrypted key must fail here instead of prompting on the terminal
    return b""


def _ssl_reason(exc: ssl.SSLError | OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc))
    return str(exc.strerror or exc)


def _tls_problems(config: AgentConfig) -> list[ConfigError]:
    broker = config.broker
    problems: list[ConfigError] = []
    if broker.ca_file is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=broker.ca_file)
        except (ssl.SSLError, OSError) as exc:
            problems.append(
                ConfigError(
                    "broker.ca_file",
                    f"{str(broker.ca_file)!r} is not a PEM CA bundle ({_ssl_reason(exc)})",
                )
            )
    if broker.cert_file is not None and broker.key_file is not None:
        cert_ok = True
        try:  # parses every certificate in the file, nothing else
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=broker.cert_file)
        except (ssl.SSLError, OSError) as exc:
            cert_ok = False
            problems.append(
                ConfigError(
                    "broker.cert_file",
                    f"{str(broker.cert_file)!r} is not a PEM certificate ({_ssl_reason(exc)})",
                )
            )
        if cert_ok:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                    broker.cert_file, broker.key_file, password=_no_password
                )
            except (ssl.SSLError, OSError) as exc:
                problems.append(
                    ConfigError(
                        "broker.key_file",
                        f"{str(broker.key_file)!r} is not an unencrypted PEM private key for "
                        f"broker.cert_file ({_ssl_reason(exc)})",
                    )
                )
    return problems


# --- Ed25519 keys (cryptography) -----------------------------------------------------------------


def _ed25519_problems(config: AgentConfig) -> list[ConfigError]:
    security = config.security
    wanted = [
        ("security.signing_key_file", security.signing_key_file, "load_signer"),
        (
            "security.aggregator_public_key_file",
            security.aggregator_public_key_file,
            "load_manifest_verifier",
        ),
    ]
    wanted = [w for w in wanted if w[1] is not None]
    if not wanted:
        return []
    try:
        import edgefl.security as security_module  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("cryptography"):
            raise
        problem = f"an Ed25519 key needs the 'cryptography' package: {SECURITY_EXTRA_HINT}"
        return [ConfigError(key, problem) for key, _, _ in wanted]
    problems: list[ConfigError] = []
    for key, path, loader_name in wanted:
        loader: Callable[[Path], object] = getattr(security_module, loader_name)
        try:
            loader(path)  # type: ignore[arg-type]
        except ValueError as exc:  # KeyFileError
            problems.append(ConfigError(key, str(exc)))
    return problems
