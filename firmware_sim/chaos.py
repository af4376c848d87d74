"""Chaos harness: a live fleet under random SIGKILLs, then every update reconciled.

Real processes on one machine: a private Mosquitto (persistence on, the shipped ``dev.conf``),
the aggregator (``python -m edgefl.cli aggregator``) and ``agents`` device agents (``python -m
device_agent``, digits MLP, always eligible). While they run, a seeded fault schedule hits them:

* ``broker`` — SIGKILL Mosquitto, restart it on the same port;
* ``aggregator`` — SIGKILL the aggregator, restart it on the same state directory;
* ``agent`` — SIGKILL one agent, restart it on the same state directory;
* ``broker_backlog`` — SIGSTOP the aggregator until the broker holds a backlog of acknowledged
  updates for it, SIGKILL the broker, restart it, SIGCONT the aggregator (the loss the receipts
  of docs/PROTOCOL.md exist for).

Then every device is unplugged (its fake ``/sys`` says so: no new trainings) and every process
stays up until each agent's spool is empty (bounded), and the run is reconciled: an update
counts as **produced** once its agent logged ``update N spooled`` (written after the spool's
fsync), and as **accounted** when the aggregator's SQLite ``seen`` table holds
its ``(device, seq)``. ``lost`` = produced but not accounted; ``double_counted`` = accepted
updates the aggregator counted beyond the distinct ``seen`` rows. Updates accounted but never
logged (an agent killed between its fsync and its log line) are reported as ``unlogged``, not as
losses. Every wait is bounded in time; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from broker.launcher import MosquittoBroker

__all__ = ["ChaosConfig", "ChaosResult", "run_chaos"]

FLEET = "chaos"
MODEL = "digits-mlp"
FAULT_KINDS = ("broker", "aggregator", "agent", "broker_backlog")
_SPOOLED = re.compile(rb"update (\d+) spooled")


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run. ``faults`` are spread over ``duration_s``; ``recovery_s`` bounds the wait
    for the fleet to drain afterwards. ``receipts`` asks agents and aggregator to use
    end-to-end receipts (when the installed version supports them)."""

    agents: int = 4
    faults: int = 20
    duration_s: float = 120.0
    recovery_s: float = 120.0
    seed: int = 1
    buffer_size: int = 3
    backlog_s: float = 4.0
    receipts: bool = True
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.agents < 1 or self.faults < 0 or self.duration_s <= 0 or self.recovery_s <= 0:
            raise ValueError("agents >= 1, faults >= 0, duration_s > 0 and recovery_s > 0")


@dataclass
class ChaosResult:
    """What happened, and the reconciliation (the ``--json`` object of bench/chaos.py)."""

    faults: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    updates_produced: int = 0
    updates_accounted: int = 0
    lost: int = 0
    double_counted: int = 0
    unlogged: int = 0
    spooled_left: int = 0
    drained: bool = False
    applied: int = 0
    model_version: int = 0
    wall_s: float = 0.0
    lost_examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _digits_npz(path: Path, device: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(device)
    rows = rng.choice(len(digits.target), size=120, replace=False)
    x = (digits.data[rows] / 16.0).astype(np.float32)
    np.savez(path, x=x, y=digits.target[rows].astype(np.int64))


def _eligible_tree(root: Path, *, mains: bool = True) -> None:
    files = {
        "proc/loadavg": "0.00 0.00 0.00 1/100 1\n",
        "proc/cpuinfo": "processor : 0\nprocessor : 1\n",
        "sys/class/power_supply/AC/type": "Mains\n",
        "sys/class/power_supply/AC/online": "1\n" if mains else "0\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


class _Process:
    """A child process with its output appended to a log file, restartable."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGCONT (it may be stopped), SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class _Fleet:
    broker: MosquittoBroker
    aggregator: _Process
    agents: list[_Process]
    state_dir: Path
    agent_dirs: list[Path]


def _agent_config(directory: Path, index: int, url: str, receipts: bool) -> Path:
    _digits_npz(directory / "train.npz", index)
    _eligible_tree(directory / "fs")
    # device_agent/config.py SpoolConfig.receipts: "auto" | "on" | "off". The harness never
    # relies on "auto" (it would follow whatever the aggregator announces): on or off, explicitly.
    receipts_line = f'receipts = "{"on" if receipts else "off"}"\n'
    path = directory / "agent.toml"
    path.write_text(
        f'fleet = "{FLEET}"\ndevice_id = "dev-{index:02d}"\nstate_dir = "state"\n'
        f'log_level = "INFO"\n\n[broker]\nurl = "{url}"\nreconnect_max_s = 1.0\n\n'
        f'[data]\nkind = "npz"\npath = "train.npz"\n\n[training]\nmax_threads = 1\n\n'
        f'[probes]\nroot = "fs"\ninterval_s = 1.0\nmetered = "no"\nthrottle = false\n\n'
        f"[spool]\n{receipts_line}"
    )
    return path


@contextlib.contextmanager
def _fleet(config: ChaosConfig, root: Path) -> Iterator[_Fleet]:
    broker = MosquittoBroker(state_dir=root / "mosquitto")
    broker.start()
    state_dir = root / "aggregator"
    aggregator = _Process(
        "aggregator",
        [
            sys.executable, "-m", "edgefl.cli", "aggregator",
            "--broker", broker.url, "--fleet", FLEET, "--model", MODEL,
            "--state-dir", str(state_dir), "--buffer-size", str(config.buffer_size),
            "--norm-bound", "off", "--max-staleness", "100000", "--metrics-interval", "1",
        ],
        root / "aggregator.log",
    )  # fmt: skip
    agents, dirs = [], []
    for i in range(config.agents):
        directory = root / f"agent-{i:02d}"
        directory.mkdir()
        conf = _agent_config(directory, i, broker.url, config.receipts)
        dirs.append(directory)
        agents.append(
            _Process(
                f"agent-{i:02d}",
                [sys.executable, "-m", "device_agent", "--config", str(conf)],
                directory / "agent.log",
            )
        )
    fleet = _Fleet(broker, aggregator, agents, state_dir, dirs)
    try:
        aggregator.start()
        for agent in agents:
            agent.start()
        yield fleet
    finally:
        for agent in agents:
            agent.stop()
        aggregator.stop()
        broker.stop()


def _inject(fleet: _Fleet, kind: str, rng: random.Random, backlog_s: float) -> None:
    pause = rng.uniform(0.3, 1.5)
    if kind == "broker":
        fleet.broker.kill()
        time.sleep(pause)
        fleet.broker.start()
    elif kind == "aggregator":
        fleet.aggregator.kill()
        time.sleep(pause)
        fleet.aggregator.start()
    elif kind == "agent":
        agent = rng.choice(fleet.agents)
        agent.kill()
        time.sleep(pause)
        agent.start()
    elif kind == "broker_backlog":
        fleet.aggregator.signal(signal.SIGSTOP)
        time.sleep(backlog_s)  # agents keep publishing; the broker queues for the aggregator
        fleet.broker.kill()
        time.sleep(pause)
        fleet.broker.start()
        fleet.aggregator.signal(signal.SIGCONT)
    else:
        raise ValueError(f"unknown fault {kind!r}")


def _produced(agent_dirs: list[Path]) -> set[tuple[str, int]]:
    produced: set[tuple[str, int]] = set()
    for i, directory in enumerate(agent_dirs):
        log = (directory / "agent.log").read_bytes()
        produced |= {(f"dev-{i:02d}", int(m.group(1))) for m in _SPOOLED.finditer(log)}
    return produced


def _spooled_left(agent_dirs: list[Path]) -> int:
    return sum(len(list((d / "state" / "spool").glob("u-*.upd"))) for d in agent_dirs)


def _accounted(state_dir: Path) -> tuple[set[tuple[str, int]], dict[str, int], int]:
    db = state_dir / "state.sqlite"
    if not db.exists():
        return set(), {}, 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        seen = {(str(d), int(s)) for d, s in conn.execute("SELECT device, seq FROM seen")}
        counters = {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}
        (version,) = conn.execute("SELECT version FROM model").fetchone()
    return seen, counters, int(version)


def run_chaos(config: ChaosConfig) -> ChaosResult:
    """Run the fleet, inject ``config.faults`` faults, let it drain, reconcile (see module doc)."""
    rng = random.Random(config.seed)
    result = ChaosResult()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if config.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefl-chaos-")))
        else:
            root = config.workdir
            root.mkdir(parents=True, exist_ok=True)
        fleet = stack.enter_context(_fleet(config, root))
        gap = config.duration_s / max(1, config.faults)
        kinds = [FAULT_KINDS[i % len(FAULT_KINDS)] for i in range(config.faults)]
        rng.shuffle(kinds)
        for kind in kinds:
            time.sleep(rng.uniform(0.5 * gap, 1.0 * gap))
            _inject(fleet, kind, rng, config.backlog_s)
            result.faults += 1
            result.faults_by_kind[kind] = result.faults_by_kind.get(kind, 0) + 1
        # recovery: unplug every device (they stop training; a running training is aborted and
        # leaves nothing behind), so what they spooled can drain
        for directory in fleet.agent_dirs:
            _eligible_tree(directory / "fs", mains=False)
        deadline = time.monotonic() + config.recovery_s
        while time.monotonic() < deadline:
            produced = _produced(fleet.agent_dirs)
            seen, _, _ = _accounted(fleet.state_dir)
            if produced and produced <= seen and _spooled_left(fleet.agent_dirs) == 0:
                result.drained = True
                break
            time.sleep(1.0)
        # stop the agents first (no new updates), then read the final state
        for agent in fleet.agents:
            agent.stop()
        fleet.aggregator.stop()
        produced = _produced(fleet.agent_dirs)
        seen, counters, version = _accounted(fleet.state_dir)
        result.updates_produced = len(produced)
        result.updates_accounted = len(seen)
        missing = sorted(produced - seen)
        result.lost = len(missing)
        result.lost_examples = [f"{d}/{s}" for d, s in missing[:10]]
        result.unlogged = len(seen - produced)
        result.applied = counters.get("applied", 0)
        result.double_counted = max(0, result.applied - len(seen))
        result.spooled_left = _spooled_left(fleet.agent_dirs)
        result.model_version = version
    result.wall_s = round(time.monotonic() - started, 1)
    return result
