"""Chaos harness: a live fleet under random SIGKILLs, then every update reconciled.

Real processes on one machine: a private Mosquitto (persistence on, the shipped ``dev.conf``),
the aggregator (``python -m edgefl.cli aggregator``) and ``agents`` device agents (``python -m
device_agent``, digits MLP, always eligible). While they run, a seeded fault schedule hits them:

* ``broker`` — SIGKILL Mosquitto, restart it on the same port;
* ``aggregator`` — SIGKILL the aggregator, restart it on the same state directory;
* ``agent`` — SIGKILL one agent, restart it on the same state directory;
* ``broker_backlog`` — SIGSTOP the aggregator until the broker acknowledged at least one update
  it could not deliver (an agent logged ``update N delivered`` after the pause; bounded wait),
  SIGKILL the broker, restart it, SIGCONT the aggregator (the loss the receipts of
  docs/PROTOCOL.md section 4.6 exist for). The number of such updates is ``backlog_acked``.

Then every device is unplugged (its fake ``/sys`` says so: no new trainings) and every process
stays up until each agent's spool is empty (bounded), and the run is reconciled:

* **produced**: every ``(device, seq)`` an agent logged as ``update N spooled`` (logged after the
  spool's fsync) *or* that is still a spool file ``u-<seq>.upd``: an agent SIGKILLed between the
  fsync and the log line has spooled an update that its log never names, and it must count
  (earlier versions of this harness missed those, and reported them as ``unlogged`` when the
  aggregator had them, or not at all when it did not);
* **accounted**: the aggregator's SQLite ``seen`` table holds its ``(device, seq)`` (every
  accepted update, exactly once), or a receipt refused it (the agent logged ``update N refused
  by the aggregator``; counted as ``refused``; the harness's aggregator settings make
  refusals unexpected);
* ``lost`` = produced, not accounted, and in no spool any more: the device let go of an update
  the aggregator never recorded. Produced and not accounted but still spooled is ``pending``
  (the device still holds it and sends it again; with receipts that is what a fleet that has
  not drained shows, and it is not a loss); ``double_counted`` = updates the aggregator counted as
  accepted (its ``applied`` counter, committed in the same transaction as ``seen``) beyond the
  distinct ``seen`` rows; ``unlogged`` = accounted updates that no log line names (informative).

``broker_restarts``, ``backlog_acked`` and ``produced_at_broker_kills`` (updates produced so far
at each broker kill, to compare with ``updates_produced``) show that the faults hit a live
fleet. Every wait is bounded in time; every process is stopped on the way out,
also on errors; traffic stays on 127.0.0.1; logs (``aggregator.log``, ``agent-NN/agent.log``,
``mosquitto/mosquitto.log``) and state stay in ``workdir`` when one is given.
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

from broker.launcher import MosquittoBroker, free_port
from firmware_sim.fake_sysfs import write_fake_sysfs

__all__ = ["ChaosConfig", "ChaosResult", "run_chaos"]

FLEET = "chaos"
MODEL = "digits-mlp"
FAULT_KINDS = ("broker", "aggregator", "agent", "broker_backlog")
_SPOOLED = re.compile(rb"update (\d+) spooled")
_DELIVERED = re.compile(rb"update \d+ delivered")
_NEW_MODEL = re.compile(rb"now holding model v")
_REFUSED = re.compile(rb"update (\d+) refused by the aggregator")
_SPOOL_FILE = re.compile(r"u-(\d+)\.upd")


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run. ``faults`` are spread over ``duration_s``; ``recovery_s`` bounds the wait
    for the fleet to drain afterwards. ``receipts`` asks agents to wait
    for end-to-end receipts (``[spool] receipts = "on"``, else ``"off"``); without a receipt an
    agent resends after ``receipt_timeout_s`` (doubling up to 4x that) and on every reconnect.
    A ``broker_backlog`` fault waits up to ``backlog_max_s`` for an acknowledged, undelivered
    update (at least ``backlog_s``)."""

    agents: int = 4
    faults: int = 20
    duration_s: float = 120.0
    recovery_s: float = 120.0
    seed: int = 1
    buffer_size: int = 3
    backlog_s: float = 4.0
    backlog_max_s: float = 20.0
    receipts: bool = True
    receipt_timeout_s: float = 10.0
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
    pending: int = 0
    duplicates_dropped: int = 0
    refused: int = 0
    rejected_by_aggregator: int = 0
    broker_restarts: int = 0
    backlog_acked: int = 0
    produced_at_broker_kills: list[int] = field(default_factory=list)
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


class _Process:
    """A child process with its output appended to a log file, restartable."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
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
            self.proc.wait(10)  # SIGKILL cannot be ignored; 10 s only bounds a wedged kernel

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


def _agent_config(
    directory: Path, index: int, url: str, receipts: bool, receipt_timeout_s: float
) -> Path:
    _digits_npz(directory / "train.npz", index)
    write_fake_sysfs(directory / "fs")
    # device_agent/config.py SpoolConfig.receipts: "auto" | "on" | "off". The harness never
    # relies on "auto" (it would follow whatever the aggregator announces): on or off, explicitly.
    receipts_line = f'receipts = "{"on" if receipts else "off"}"\n'
    path = directory / "agent.toml"
    path.write_text(
        f'fleet = "{FLEET}"\ndevice_id = "dev-{index:02d}"\nstate_dir = "state"\n'
        f'log_level = "INFO"\n\n[broker]\nurl = "{url}"\nreconnect_max_s = 1.0\n\n'
        f'[data]\nkind = "npz"\npath = "train.npz"\n\n[training]\nmax_threads = 1\n\n'
        f'[probes]\nroot = "fs"\ninterval_s = 1.0\nmetered = "no"\nthrottle = false\n\n'
        f"[spool]\n{receipts_line}receipt_timeout_s = {receipt_timeout_s}\n"
        f"resend_max_s = {4 * receipt_timeout_s}\n"
    )
    return path


@contextlib.contextmanager
def _fleet(config: ChaosConfig, root: Path) -> Iterator[_Fleet]:
    # binds 127.0.0.1 only; a fixed port: with an automatic one, a restart that found it taken
    # would move to another port and strand every client on the old URL
    broker = MosquittoBroker(port=free_port(), state_dir=root / "mosquitto")
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
        conf = _agent_config(directory, i, broker.url, config.receipts, config.receipt_timeout_s)
        dirs.append(directory)
        agents.append(
            _Process(
                f"agent-{i:02d}",
                [sys.executable, "-m", "device_agent", "--config", str(conf)],
                directory / "agent.log",
            )
        )
    fleet = _Fleet(broker, aggregator, agents, state_dir, dirs)
    with contextlib.ExitStack() as cleanup:
        # registered before each start, run in reverse order (agents, aggregator, broker) even
        # when a start or a stop fails: no process outlives the run
        cleanup.callback(broker.stop)
        cleanup.callback(aggregator.stop)
        aggregator.start()
        for agent in agents:
            cleanup.callback(agent.stop)
            agent.start()
        yield fleet


def _count(agent_dirs: list[Path], pattern: re.Pattern[bytes]) -> int:
    """Log lines matching ``pattern``, summed over the agents."""
    return sum(len(pattern.findall(_log(d))) for d in agent_dirs)


def _inject(fleet: _Fleet, kind: str, rng: random.Random, config: ChaosConfig) -> int:
    """Inject one fault; returns the backlog of acknowledged, undelivered updates (backlog
    faults), else 0."""
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
        # Pause the aggregator just after it published a model version, while the agents fetch
        # it from the broker and train: their updates then reach the broker, not the
        # aggregator. (Paused at a random moment it mostly finds every agent idle, waiting
        # for the next version: one update per version.)
        models = _count(fleet.agent_dirs, _NEW_MODEL)
        deadline = time.monotonic() + config.backlog_max_s
        while _count(fleet.agent_dirs, _NEW_MODEL) == models and time.monotonic() < deadline:
            time.sleep(0.05)
        fleet.aggregator.signal(signal.SIGSTOP)
        try:
            before = _count(fleet.agent_dirs, _DELIVERED)
            started = time.monotonic()
            # agents keep publishing; the broker acknowledges and queues for the aggregator
            while True:
                time.sleep(0.2)
                waited = time.monotonic() - started
                backlog = _count(fleet.agent_dirs, _DELIVERED) - before
                if waited >= config.backlog_s and (backlog > 0 or waited >= config.backlog_max_s):
                    break
            fleet.broker.kill()
            time.sleep(pause)
            fleet.broker.start()
        finally:
            fleet.aggregator.signal(signal.SIGCONT)
        return backlog
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return 0


def _log(directory: Path) -> bytes:
    path = directory / "agent.log"
    return path.read_bytes() if path.exists() else b""


def _spool_files(directory: Path) -> set[int]:
    spool = directory / "state" / "spool"
    if not spool.is_dir():
        return set()
    return {int(m.group(1)) for p in spool.iterdir() if (m := _SPOOL_FILE.fullmatch(p.name))}


def _logged(agent_dirs: list[Path], pattern: re.Pattern[bytes]) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for i, directory in enumerate(agent_dirs):
        found |= {(f"dev-{i:02d}", int(m.group(1))) for m in pattern.finditer(_log(directory))}
    return found


def _produced(agent_dirs: list[Path]) -> set[tuple[str, int]]:
    """Logged as spooled, or still in a spool (see the module docstring)."""
    produced = _logged(agent_dirs, _SPOOLED)
    for i, directory in enumerate(agent_dirs):
        produced |= {(f"dev-{i:02d}", seq) for seq in _spool_files(directory)}
    return produced


def _spooled_left(agent_dirs: list[Path]) -> int:
    return sum(len(_spool_files(d)) for d in agent_dirs)


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
        _inject_faults(fleet, config, rng, result)
        result.drained = _drain(fleet, config)
        # stop the agents first (no new updates), then read the final state
        for agent in fleet.agents:
            agent.stop()
        fleet.aggregator.stop()
        _reconcile(fleet, result)
    result.wall_s = round(time.monotonic() - started, 1)
    return result


def _inject_faults(
    fleet: _Fleet, config: ChaosConfig, rng: random.Random, result: ChaosResult
) -> None:
    """The seeded schedule: every kind in turn, shuffled, spread over ``duration_s``."""
    gap = config.duration_s / max(1, config.faults)
    kinds = [FAULT_KINDS[i % len(FAULT_KINDS)] for i in range(config.faults)]
    rng.shuffle(kinds)
    for kind in kinds:
        time.sleep(rng.uniform(0.5 * gap, 1.0 * gap))
        if kind.startswith("broker"):
            result.produced_at_broker_kills.append(len(_produced(fleet.agent_dirs)))
        result.backlog_acked += _inject(fleet, kind, rng, config)
        result.faults += 1
        result.faults_by_kind[kind] = result.faults_by_kind.get(kind, 0) + 1
        result.broker_restarts += kind.startswith("broker")


def _drain(fleet: _Fleet, config: ChaosConfig) -> bool:
    """Unplug every device (they stop training; a running training is aborted and leaves nothing
    behind) and wait, at most ``recovery_s``, until everything spooled is accounted for."""
    for directory in fleet.agent_dirs:
        write_fake_sysfs(directory / "fs", mains=False)
    deadline = time.monotonic() + config.recovery_s
    while time.monotonic() < deadline:
        produced = _produced(fleet.agent_dirs)
        try:
            seen, _, _ = _accounted(fleet.state_dir)
        except sqlite3.Error:  # the aggregator is creating or migrating it: look again
            seen = set()
        accounted = seen | _logged(fleet.agent_dirs, _REFUSED)
        if produced and produced <= accounted and _spooled_left(fleet.agent_dirs) == 0:
            return True
        time.sleep(1.0)
    return False


def _reconcile(fleet: _Fleet, result: ChaosResult) -> None:
    """Every produced update against the aggregator's durable state (see the module doc)."""
    produced = _produced(fleet.agent_dirs)
    logged = _logged(fleet.agent_dirs, _SPOOLED)
    refused = _logged(fleet.agent_dirs, _REFUSED)
    seen, counters, version = _accounted(fleet.state_dir)
    accounted = seen | refused
    result.updates_produced = len(produced)
    result.updates_accounted = len(accounted)
    result.refused = len(refused)
    result.rejected_by_aggregator = sum(
        v for k, v in counters.items() if k.startswith("rejected:") and k != "rejected:duplicate"
    )
    # a resend of an update the aggregator already has: expected after every lost PUBACK,
    # reconnect or receipt timeout, and harmless
    result.duplicates_dropped = counters.get("rejected:duplicate", 0)
    still_spooled = {
        (f"dev-{i:02d}", seq)
        for i, directory in enumerate(fleet.agent_dirs)
        for seq in _spool_files(directory)
    }
    result.pending = len((produced - accounted) & still_spooled)
    missing = sorted(produced - accounted - still_spooled)
    result.lost = len(missing)
    result.lost_examples = [f"{d}/{s}" for d, s in missing[:10]]
    result.unlogged = len(accounted - logged)
    result.applied = counters.get("applied", 0)
    result.double_counted = max(0, result.applied - len(seen))
    result.spooled_left = _spooled_left(fleet.agent_dirs)
    result.model_version = version
