"""The files a real agent process (``python -m device_agent``, ``edgefl agent run``) starts
from in the integration tests: its TOML configuration next to its data and fake sysfs tree."""

from __future__ import annotations

from pathlib import Path


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
