"""``edgefl sim --mode live --role ...`` split over processes: one aggregator process and two
``--role devices`` processes with disjoint ``--device-range``s on one Mosquitto, on loopback
and with the devices in two network namespaces. The model moves, and updates from both ranges
are committed by the aggregator (receipts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from cluster import _free_prefix, _Hosts, netns_available

from broker.launcher import MosquittoBroker

pytestmark = pytest.mark.integration

FLEET = [
    *("sim", "--mode", "live", "--devices", "12", "--dataset", "digits", "--profile", "lab"),
    *("--concurrency", "6", "--buffer-size", "3", "--fleet", "roles", "--seed", "3"),
]

AGGREGATOR_LIMITS = ["--max-updates", "24", "--target", "1.0", "--max-time", "150", "--json"]
DEVICE_LIMITS = ["--max-time", "200", "--json"]  # stopped by SIGTERM once the aggregator ends


def _start(args: list[str], out: Path, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    """``[prefix] python -m edgefl.cli <args>``, stdout and stderr into ``out``.out / .err."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "edgefl.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=out.with_suffix(".out").open("wb"),
        stderr=out.with_suffix(".err").open("wb"),
        env=env,
    )


def _last_json(out: Path) -> dict[str, object]:
    lines = out.with_suffix(".out").read_text().strip().splitlines()
    assert lines, out.with_suffix(".err").read_text()[-3000:]
    summary: dict[str, object] = json.loads(lines[-1])
    return summary


def _run_split(url: str, tmp_path: Path, host: list[list[str]]) -> None:
    """An aggregator process here and one devices process per ``host`` prefix (``[]``: here,
    else e.g. ``ip netns exec NS``) with ranges 0:6 and 6:12, all on the broker ``url``; the
    model moves and every range's updates are committed."""
    aggregator = _start(
        [*FLEET, "--role", "aggregator", "--broker", url, *AGGREGATOR_LIMITS],
        tmp_path / "aggregator",
    )
    ranges = ("0:6", "6:12")
    devices = [
        _start(
            [*FLEET, "--role", "devices", "--broker", url, "--device-range", r, *DEVICE_LIMITS],
            tmp_path / f"devices-{i}",
            prefix,
        )
        for i, (r, prefix) in enumerate(zip(ranges, host, strict=True))
    ]
    procs = [aggregator, *devices]
    try:
        assert aggregator.wait(timeout=200) == 0, (tmp_path / "aggregator.err").read_text()
        for proc in devices:  # a devices process runs until told to stop
            proc.send_signal(signal.SIGTERM)
        for i, proc in enumerate(devices):
            assert proc.wait(timeout=60) == 0, (tmp_path / f"devices-{i}.err").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    run = _last_json(tmp_path / "aggregator")
    assert run["mode"] == "live"
    assert isinstance(run["model_versions"], int)
    assert run["model_versions"] >= 2  # the model moved
    assert isinstance(run["updates_applied"], int)
    assert run["updates_applied"] >= 6
    for i, r in enumerate(ranges):
        got = _last_json(tmp_path / f"devices-{i}")
        assert got["role"] == "devices"
        assert got["device_range"] == [int(x) for x in r.split(":")]
        assert got["peak_connected"] == 6  # every device of the range had its own connection
        totals = got["agent_totals"]
        assert isinstance(totals, dict)
        assert totals["receipted"] > 0, totals  # the aggregator committed this range's updates
        assert got["interrupted"] is True  # ended by the SIGTERM above, and still reported


@pytest.mark.slow
def test_two_device_processes_train_against_one_aggregator(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    _run_split(mosquitto.url, tmp_path, [[], []])


@pytest.mark.slow
def test_device_processes_in_two_network_namespaces(tmp_path: Path) -> None:
    """The devices run on two "hosts" (network namespaces joined by a bridge, as the NATS
    cluster test's nodes); the broker listens on the bridge, the aggregator runs here. Skips
    without namespaces, except under CI (it fails there)."""
    needs.network_namespaces(netns_available())
    seed = os.getpid() % 10000
    hosts = _Hosts(f"lr{seed}", _free_prefix(seed), 2)
    try:
        hosts.create()
        broker = MosquittoBroker(bind=f"{hosts.prefix}.1", state_dir=tmp_path / "mosquitto")
        url = broker.start()
        try:
            _run_split(url, tmp_path, [["ip", "netns", "exec", hosts.namespace(i)] for i in (0, 1)])
        finally:
            broker.stop()
    finally:
        hosts.destroy()
