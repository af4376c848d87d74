"""How the integration tests configure a device agent: the TOML file a real agent process
(``python -m device_agent``, ``edgefl agent run``) starts from, or the :class:`AgentConfig` of
an agent run in-process; both probe a fake sysfs tree at ``tmp/fs``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import AgentConfig, BrokerConfig, DataConfig, DataKind, ProbeConfig
from device_agent.eligibility import EligibilityPolicy, MeteredSource

MINIMAL_AGENT_TOML = """
fleet = "greenhouse"
device_id = "pi-07"

[broker]
url = "mqtt://broker.local:1883"

[data]
kind = "npz"
path = "data/train.npz"
"""
"""The smallest valid agent file: fleet, device id, broker URL and data; the data path is
relative to the file."""


def agent_config(
    tmp: Path, url: str, *, fleet: str, device: str, state_dir: Path, **fields: Any
) -> AgentConfig:
    """An in-process agent (the test hands it its dataset): probes read ``tmp/fs`` every second
    (unmetered), the default eligibility policy, reconnects within 2 s; ``fields`` replace any
    field."""
    config = AgentConfig(
        broker=BrokerConfig(url, reconnect_max_s=2.0),
        fleet=fleet,
        device_id=device,
        data=DataConfig(kind=DataKind.NPZ, path=tmp / "unused.npz"),
        probes=ProbeConfig(root=tmp / "fs", metered=MeteredSource.NO, interval_s=1.0),
        eligibility=EligibilityPolicy(),
        state_dir=state_dir,
    )
    return dataclasses.replace(config, **fields)


def write_agent_toml(
    tmp: Path, *, fleet: str, device: str, url: str, reconnect_max_s: float, sections: str = ""
) -> Path:
    """``tmp/agent.toml``: state in ``tmp/state``, data from ``tmp/train.npz``, probes reading
    the fake tree ``tmp/fs`` every second (unmetered, no throttling check); ``sections`` is more
    TOML appended as is. The caller writes the data and the tree."""
    path = tmp / "agent.toml"
    path.write_text(
        f"""
fleet = "{fleet}"
device_id = "{device}"
state_dir = "state"
log_level = "INFO"

[broker]
url = "{url}"
reconnect_max_s = {reconnect_max_s}

[data]
kind = "npz"
path = "train.npz"

[probes]
root = "fs"
interval_s = 1.0
metered = "no"
throttle = false
{sections}"""
    )
    return path


def run_edgefl(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> tuple[int, str, str]:
    """``edgefl <args>`` in-process through the one error path, with ``env`` set:
    (exit code, stdout, stderr)."""
    from edgefl.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        main(args)
    out = capsys.readouterr()
    return int(stop.value.code or 0), out.out, out.err
