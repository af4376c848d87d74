"""Live fleet simulation: real device agents and the real aggregator over a real MQTT broker.

Nothing is re-implemented. Every simulated device is a :class:`device_agent.agent.DeviceAgent`
with its own MQTT connection, spool, model store and presence session; the server is the
:class:`edgefl.aggregator.Aggregator` service (SQLite state, group commit, retained model
chunks). The simulator only supplies what a real device would get from its hardware:

* **Eligibility** (:class:`SimSnapshotSource`): a device is on mains power, cool and unmetered
  exactly when its profile's availability model (:meth:`Fleet.is_available`) says it is
  available at the current *simulated* time, and it is not "away" after a dropout.
* **Speed, dropouts and crashes** (:class:`SimTrainer`, wrapping real local SGD): a training
  takes ``fleet.training_duration(...) · time_scale`` seconds of wall time (the real SGD runs
  inside that time on a small shared compute pool, ``train_threads`` threads); with the profile's
  dropout probability the device vanishes part-way (it turns ineligible for ``rejoin_after``, the
  agent aborts the training and publishes nothing); with the crash probability the agent task is
  cancelled (its in-flight work is lost) and a new agent is started on the same state directory
  after ``crash_restart · time_scale`` seconds. Link bandwidth is *not* simulated in live mode:
  bytes move through the broker at whatever speed it manages.
* **Concurrency**: each process runs its agents' trainings in a thread pool of
  ``ceil(concurrency / workers)`` threads, so at most ``concurrency`` devices train at once,
  as in FedBuff; a device whose turn comes after a newer model arrived skips the stale base and
  trains on the newer one.

``time_scale`` maps simulated seconds to wall seconds (0.05: 20x faster than real time).
With ``workers > 1`` the devices are spread over that many processes (``spawn``), each with one
event loop and its own pools; the aggregator stays in the main process. The run record is
filled by polling the aggregator: per-version accuracy from ``history()`` (``eval_dataset`` =
the simulation's dataset), updates, staleness, bytes and rejections from ``statistics()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from device_agent.agent import DeviceAgent
from device_agent.config import (
    AgentConfig,
    BrokerConfig,
    CodecPrefs,
    DataConfig,
    DataKind,
    ProbeConfig,
    SpoolConfig,
    TrainingLimits,
)
from device_agent.dataset import LocalDataset
from device_agent.eligibility import DeviceSnapshot, EligibilityPolicy, MeteredSource
from device_agent.trainer import TrainJob, TrainResult
from firmware_sim.attacks import apply_attack
from firmware_sim.fleet import Fate
from firmware_sim.interrupt import SignalStop, StopRequested
from firmware_sim.progress import Sample
from firmware_sim.record import Mode, RunRecord
from firmware_sim.scenario import Scenario, SimConfig, build_scenario
from firmware_sim.seeding import MASK64

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue as MpQueue
    from multiprocessing.synchronize import Event as MpEvent

    from edgefl.aggregator import Aggregator, AggregatorConfig

__all__ = ["LiveOptions", "LiveResult", "SimSnapshotSource", "SimTrainer", "run_live"]

log = logging.getLogger("firmware_sim.live")
_STREAM_LIVE = 0x11_FE_5EED


@dataclass(frozen=True)
class LiveOptions:
    """How to run live. ``broker_url`` None starts a private broker of ``broker_kind``:
    ``embedded`` (amqtt, MQTT 3.1.1, in a child process), ``mosquitto`` (a private Mosquitto
    with the dev config) or ``auto`` (Mosquitto when the binary is installed, else embedded:
    amqtt manages only a few updates/s with 100 devices)."""

    broker_url: str | None = None
    broker_kind: str = "auto"
    fleet: str = "sim"
    workers: int = 1
    time_scale: float = 0.05
    train_threads: int = 2
    probe_interval_s: float = 1.0
    poll_s: float = 0.5
    connect_per_s: float = 250.0
    state_dir: Path | None = None
    quiet: bool = True
    round_deadline_s: float | None = None  # FedAvg, wall seconds; default from the fleet


@dataclass(frozen=True)
class LiveResult:
    """A finished live run."""

    record: RunRecord
    wall_s: float
    devices_started: int
    peak_connected: int
    rss_mb: float  # main process + worker processes (+ embedded broker process) at the end
    rss_mb_per_device: float
    updates_per_s: float
    agent_totals: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False  # stopped early by SIGINT/SIGTERM (see ``run_live(stop=...)``)


# ----------------------------------------------------------------------------- device side


class _Shared:
    """What the simulated devices of one process share (thread-safe where it must be)."""

    def __init__(self, scenario: Scenario, options: LiveOptions, t0: float) -> None:
        self.sc = scenario
        self.options = options
        self.t0 = t0
        self.lock = threading.Lock()
        self.away_until: dict[int, float] = {}
        self.events: list[tuple[str, float, int]] = []  # ("dropout"|"crash", t, device)
        self.compute = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, options.train_threads), thread_name_prefix="edgefl-sim-train"
        )
        self.slots: dict[int, float] = {}  # device -> when it was granted a training slot
        self.release: Callable[[int], None] = lambda d: None  # set by the device group

    def virtual_now(self) -> float:
        return (time.monotonic() - self.t0) / self.options.time_scale

    def note(self, kind: str, device: int) -> None:
        with self.lock:
            self.events.append((kind, time.monotonic() - self.t0, device))

    def take_events(self) -> list[tuple[str, float, int]]:
        with self.lock:
            out, self.events = self.events, []
        return out


class SimSnapshotSource:
    """Eligibility conditions of simulated device ``device`` (see module docstring)."""

    def __init__(self, shared: _Shared, device: int) -> None:
        self._shared = shared
        self._device = device

    async def snapshot(self) -> DeviceSnapshot:
        sh = self._shared
        now = time.monotonic()
        available = sh.sc.fleet.is_available(self._device, sh.virtual_now())
        available = (
            available and now >= sh.away_until.get(self._device, 0.0) and self._device in sh.slots
        )
        return DeviceSnapshot(
            monotonic=now,
            local_time=datetime.now(UTC),
            load1=0.0,
            load5=0.0,
            load15=0.0,
            cpu_count=4,
            on_mains=available,
            battery_percent=100.0 if available else 40.0,
            charging=available,
            max_temp_c=40.0,
            metered=False,
        )


class SimTrainer:
    """The agent's :class:`~device_agent.trainer.Trainer` for one simulated device: simulated
    duration and fate around real SGD (``edgefl.training.train_local``)."""

    def __init__(
        self,
        shared: _Shared,
        device: int,
        loop: asyncio.AbstractEventLoop,
        on_crash: Callable[[int, float], None],
    ) -> None:
        self._shared = shared
        self._device = device
        self._loop = loop
        self._on_crash = on_crash
        seed = shared.sc.config.seed & MASK64
        self._rng = np.random.default_rng([seed, _STREAM_LIVE, device])
        self.agent: DeviceAgent | None = None

    def _sleep(self, seconds: float, should_stop: Callable[[], bool]) -> bool:
        """Sleep ``seconds`` polling ``should_stop``; False when told to stop."""
        end = time.monotonic() + seconds
        while True:
            if should_stop():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))

    def _wait_abort(self, should_stop: Callable[[], bool], limit: float = 10.0) -> None:
        end = time.monotonic() + limit
        while not should_stop() and time.monotonic() < end:
            time.sleep(0.02)

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        try:
            return self._train(job, should_stop)
        finally:
            self._loop.call_soon_threadsafe(self._shared.release, self._device)

    def _train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        sh = self._shared
        d = self._device
        agent = self.agent
        if agent is not None and agent.model is not None and agent.model.version > job.base_version:
            return None  # a newer model arrived while this device waited for a training slot
        fleet = sh.sc.fleet
        scale = sh.options.time_scale
        fate = fleet.training_fate(d, self._rng)
        duration = fleet.training_duration(d, job.data.num_train, job.epochs, self._rng) * scale
        if fate.kind is Fate.DROPPED:
            if self._sleep(fate.at_fraction * duration, should_stop):
                away = max(fate.restart_after_s * scale, 0.3)
                sh.away_until[d] = time.monotonic() + away
                sh.note("dropout", d)
                if agent is not None:
                    self._loop.call_soon_threadsafe(agent.check_now)
                self._wait_abort(should_stop)
            return None
        if fate.kind is Fate.CRASHED:
            if self._sleep(fate.at_fraction * duration, should_stop):
                sh.note("crash", d)
                self._loop.call_soon_threadsafe(self._on_crash, d, fate.restart_after_s * scale)
                self._wait_abort(should_stop)
            return None
        started = time.monotonic()
        future = sh.compute.submit(self._compute, job, should_stop)
        result = future.result()
        if result is None or not self._sleep(duration - (time.monotonic() - started), should_stop):
            return None
        return result

    def _compute(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        from edgefl.training import LocalTrainConfig, train_local

        res = train_local(
            job.spec,
            job.base_weights,
            job.data.x_train,
            job.data.y_train,
            LocalTrainConfig(
                epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, seed=job.seed
            ),
            should_stop=should_stop,
            threads=1,
        )
        if res.stopped_early:
            return None
        delta = res.delta
        sc = self._shared.sc
        if sc.malicious[self._device]:
            delta = apply_attack(delta, sc.config.attack, self._rng)
        return TrainResult(delta=delta, num_examples=res.num_examples, metrics={"loss": res.loss})


def _agent_config(
    cfg: SimConfig, opts: LiveOptions, url: str, device: int, root: Path, profile: str
) -> AgentConfig:
    codec = cfg.codec_config()
    return AgentConfig(
        broker=BrokerConfig(url, keepalive=60, reconnect_max_s=5.0),
        fleet=opts.fleet,
        device_id=device_id(device),
        data=DataConfig(kind=DataKind.NPZ, path=root / "unused.npz"),
        training=TrainingLimits(
            max_threads=1,
            nice=0,
            max_epochs=cfg.local.epochs,
            batch_size=cfg.local.batch_size,
            lr=cfg.local.lr,
            max_train_seconds=3600.0,
            holdout_fraction=0.0,
        ),
        codec=CodecPrefs(quantization=codec.quantization.value, topk_fraction=codec.topk_fraction),
        eligibility=EligibilityPolicy(settle_seconds=0.0),
        probes=ProbeConfig(
            root=root, interval_s=opts.probe_interval_s, metered=MeteredSource.NO, throttle=False
        ),
        spool=SpoolConfig(durable=False),
        state_dir=root / device_id(device),
        profile=profile,
    )


def device_id(device: int) -> str:
    """MQTT client id and device id of simulated device ``device``."""
    return f"sim-{device:06d}"


class _DeviceGroup:
    """The agents of one process, on one event loop."""

    def __init__(
        self,
        scenario: Scenario,
        options: LiveOptions,
        url: str,
        devices: list[int],
        root: Path,
        t0: float,
    ) -> None:
        self.sc = scenario
        self.opts = options
        self.url = url
        self.devices = devices
        self.root = root
        self.shared = _Shared(scenario, options, t0)
        per_process = math.ceil(scenario.config.concurrency / max(1, options.workers))
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, per_process), thread_name_prefix="edgefl-sim-agent"
        )
        self.agents: dict[int, DeviceAgent] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stopping = False
        self.started = 0
        self.capacity = max(1, per_process)
        first = devices[0] if devices else 0
        self.rng = np.random.default_rng(
            [scenario.config.seed & MASK64, _STREAM_LIVE, 1 << 40, first]
        )
        self.shared.release = self._release

    # ------------------------------------------------------------------ training slots
    def _wants(self, d: int) -> bool:
        agent = self.agents.get(d)
        if agent is None or agent.model is None:
            return False
        st = agent.statistics()
        if not st.connected:
            return False
        return st.trained_version is None or st.trained_version < agent.model.version

    def _release(self, d: int) -> None:
        """Device ``d`` finished (or abandoned) a training: give its slot to another device."""
        if self.shared.slots.pop(d, None) is not None:
            agent = self.agents.get(d)
            if agent is not None:
                agent.check_now()  # it turns ineligible at once
        self.grant()

    def grant(self) -> None:
        """Fill free training slots with random devices that are available and want to train
        (rejection sampling: O(slots), whatever the number of devices)."""
        sh = self.shared
        if self.stopping or not self.devices:
            return
        now = time.monotonic()
        for d, since in list(sh.slots.items()):  # revoke slots nobody uses
            agent = self.agents.get(d)
            training = agent is not None and agent.statistics().status.value == "training"
            if not training and now - since > 3.0:
                del sh.slots[d]
        t_virtual = sh.virtual_now()
        tries = 0
        while len(sh.slots) < self.capacity and tries < 20 * self.capacity:
            tries += 1
            d = self.devices[int(self.rng.integers(0, len(self.devices)))]
            if d in sh.slots or now < sh.away_until.get(d, 0.0):
                continue
            if not sh.sc.fleet.is_available(d, t_virtual) or not self._wants(d):
                continue
            sh.slots[d] = now
            self.agents[d].check_now()

    def _make(self, d: int, loop: asyncio.AbstractEventLoop) -> DeviceAgent:
        x, y = self.sc.device_data(d)
        shape = (0, *x.shape[1:])
        data = LocalDataset(x, y, np.zeros(shape, dtype=np.float32), np.zeros(0, dtype=np.int64))
        trainer = SimTrainer(self.shared, d, loop, self._crash)
        agent = DeviceAgent(
            _agent_config(
                self.sc.config, self.opts, self.url, d, self.root, self.sc.fleet.profile_of(d).name
            ),
            trainer=trainer,
            snapshots=SimSnapshotSource(self.shared, d),
            dataset=data,
            executor=self.executor,
        )
        trainer.agent = agent
        return agent

    def _launch(self, d: int) -> None:
        loop = asyncio.get_running_loop()
        agent = self._make(d, loop)
        self.agents[d] = agent
        self.tasks[d] = loop.create_task(self._run_agent(agent), name=device_id(d))
        self.started += 1

    async def _run_agent(self, agent: DeviceAgent) -> None:
        try:
            await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s failed", agent.config.device_id)

    def _crash(self, d: int, restart_after: float) -> None:
        """Kill device ``d``'s agent (in-flight work is lost), restart it later."""
        task = self.tasks.get(d)
        if task is None or self.stopping:
            return
        task.cancel()
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.05, restart_after), self._restart, d)

    def _restart(self, d: int) -> None:
        if self.stopping:
            return
        old = self.tasks.get(d)
        if old is not None and not old.done():  # still releasing its state directory
            asyncio.get_running_loop().call_later(0.05, self._restart, d)
            return
        self._launch(d)

    async def start(self) -> None:
        interval = 1.0 / self.opts.connect_per_s if self.opts.connect_per_s > 0 else 0.0
        for d in self.devices:
            if self.stopping:
                return
            self._launch(d)
            if interval:
                await asyncio.sleep(interval)

    def states(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for agent in self.agents.values():
            st = agent.statistics()
            counts[st.status.value if st.connected else "offline"] += 1
        return dict(counts)

    def totals(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for agent in self.agents.values():
            st = agent.statistics()
            out["updates_sent"] += st.updates_sent
            out["trainings_started"] += st.trainings_started
            out["trainings_completed"] += st.trainings_completed
            out["connected"] += int(st.connected)
            for k, v in st.trainings_aborted.items():
                out[f"aborted:{k}"] += v
        return dict(out)

    async def stop(self, wait_s: float = 15.0) -> None:
        self.stopping = True
        for agent in self.agents.values():
            agent.stop()
        tasks = list(self.tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=wait_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.shared.compute.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- workers


class _WorkerReport(NamedTuple):
    """What a worker process puts on the report queue after each poll (and once at the end)."""

    pid: int
    states: dict[str, int]  # device-state counts of its agents
    events: list[tuple[str, float, int]]  # dropouts and crashes since the last report
    totals: dict[str, int]  # agent counters (see :meth:`_DeviceGroup.totals`)
    rss_mb: float


def _rss_mb(pid: int | None = None) -> float:
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return 0.0
    return 0.0


def _quiet_logs() -> None:
    for name in ("device_agent", "edgefl", "edgefl.aggregator", "amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _group_report(group: _DeviceGroup) -> _WorkerReport:
    return _WorkerReport(
        os.getpid(), group.states(), group.shared.take_events(), group.totals(), _rss_mb()
    )


def _worker_main(
    config: SimConfig,
    options: LiveOptions,
    url: str,
    devices: list[int],
    root: str,
    stop: MpEvent,
    reports: MpQueue[_WorkerReport],
) -> None:
    """Entry point of a worker process: run ``devices`` until ``stop`` is set."""
    _ignore_sigint()
    if options.quiet:
        _quiet_logs()

    async def main() -> None:
        scenario = build_scenario(config)
        group = _DeviceGroup(scenario, options, url, devices, Path(root), time.monotonic())
        starter = asyncio.create_task(group.start())
        while not stop.is_set():
            await asyncio.sleep(options.poll_s)
            group.grant()
            reports.put(_group_report(group))
        starter.cancel()
        await group.stop()
        reports.put(_group_report(group))

    asyncio.run(main())


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Start child processes inside: they inherit SIGINT blocked, so a terminal's Ctrl-C (sent
    to the whole process group) cannot interrupt their start-up with a traceback; they ignore
    it for good in :func:`_ignore_sigint` (the parent stops them). A SIGINT that reaches this
    process meanwhile stays pending and is handled when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _ignore_sigint() -> None:
    """In a child process: ignore SIGINT (then unblock it, see :func:`_sigint_blocked`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _embedded_broker_main(port: int, ready: MpEvent, stop: MpEvent) -> None:
    from broker.launcher import ThreadedEmbeddedBroker

    _ignore_sigint()
    broker = ThreadedEmbeddedBroker(port=port)
    broker.start()
    ready.set()
    stop.wait()
    broker.stop()


# ----------------------------------------------------------------------------- the aggregator


def _aggregator_config(
    cfg: SimConfig, opts: LiveOptions, url: str, state_dir: Path
) -> AggregatorConfig:
    """The live aggregator's config: the run's :meth:`SimConfig.aggregation_settings` (the same
    the virtual simulator runs) spelled as the service's flat knobs."""
    from edgefl.aggregator import AggregatorConfig, NormBoundSetting

    agg = cfg.aggregation_settings()
    bound = agg.norm_bound
    if not bound.enabled:
        setting, max_norm = NormBoundSetting.OFF, None
    elif bound.adaptive_multiplier is None:
        setting, max_norm = NormBoundSetting.STATIC_CLIP, bound.max_norm
    else:
        setting, max_norm = NormBoundSetting.ADAPTIVE_CLIP, None
    deadline = opts.round_deadline_s
    if deadline is None:
        deadline = max(1.0, (cfg.round_deadline_s or 60.0) * opts.time_scale)
    return AggregatorConfig(
        broker_url=url,
        fleet=opts.fleet,
        model=cfg.model_name,
        state_dir=state_dir,
        algorithm=agg.algorithm,
        buffer_size=agg.buffer_size,
        staleness=agg.staleness.kind,
        staleness_a=agg.staleness.a,
        staleness_b=agg.staleness.b,
        max_staleness=agg.max_staleness,
        example_weighting=agg.example_weighting,
        example_cap=agg.example_cap,
        normalisation=agg.normalisation,
        server_optimizer=agg.server_optimizer.kind,
        server_lr=agg.server_optimizer.lr,
        server_momentum=agg.server_optimizer.momentum,
        norm_bound=setting,
        max_norm=max_norm,
        robust=agg.robust,
        trim_beta=agg.trim_beta,
        round_deadline_s=deadline,
        min_fraction=agg.min_fraction,
        local_epochs=cfg.local.epochs,
        batch_size=cfg.local.batch_size,
        lr=cfg.local.lr,
        codec=cfg.codec_config(),
        eval_dataset=cfg.dataset,
        metrics_interval_s=1.0,
        fsync=False,
        seed=cfg.seed,
    )


class _Poller:
    """Turns aggregator statistics deltas into run-record entries."""

    def __init__(self, record: RunRecord, fp32_bytes: int, t0_wall: float) -> None:
        self.record = record
        self.fp32 = fp32_bytes
        self.t0_wall = t0_wall
        self.staleness: dict[int, int] = {}
        self.rejected: dict[str, int] = {}
        self.received = 0
        self.bytes = 0
        self.evaluated: set[int] = set()

    def poll(self, aggregator: Aggregator, t: float) -> None:
        st = aggregator.statistics()
        new_received = st.received - self.received
        per_update = (st.bytes_ingested - self.bytes) // new_received if new_received > 0 else 0
        for s, n in st.staleness.items():
            for _ in range(n - self.staleness.get(s, 0)):
                self.record.update(t, -1, "applied", s, per_update, self.fp32)
        for reason, n in st.rejected.items():
            for _ in range(n - self.rejected.get(reason, 0)):
                self.record.update(t, -1, reason, None, per_update, self.fp32)
        self.staleness = dict(st.staleness)
        self.rejected = dict(st.rejected)
        self.received = st.received
        self.bytes = st.bytes_ingested
        for rec in aggregator.history():
            if rec.accuracy is not None and rec.version not in self.evaluated:
                self.evaluated.add(rec.version)
                self.record.eval(
                    max(0.0, rec.created_at - self.t0_wall),
                    rec.version,
                    rec.accuracy,
                    None,
                    rec.applied,
                )


# ----------------------------------------------------------------------------- the run
#
# _run_live_async enters, in order, on one AsyncExitStack: the broker, the running aggregator,
# the evaluator's catch-up, the embedded broker's RSS reading, the devices and the "stopping"
# announcement; then it polls until a limit. Leaving the stack undoes them in reverse: announce,
# stop the devices, read the broker's RSS, let the evaluator catch up, stop the aggregator, stop
# the broker. After SIGINT/SIGTERM every step gets a short bound (the whole stop within ~2 s);
# the flag is read at each step, so a signal during a normal stop shortens the rest.


@dataclass(frozen=True)
class _Hooks:
    """Optional callbacks and the stop signal of :func:`run_live` (see its docstring)."""

    on_phase: Callable[[str], None] | None = None
    on_sample: Callable[[Sample], None] | None = None
    stop: SignalStop | None = None

    def signum(self) -> int:
        return self.stop.signum if self.stop is not None and self.stop.signum else signal.SIGTERM

    def signal_name(self) -> str:
        return self.stop.name if self.stop is not None else ""

    def phase(self, text: str) -> None:
        if self.on_phase is not None:
            self.on_phase(text)


@dataclass(frozen=True)
class _Run:
    """The fixed inputs of one live run, and its stop flag."""

    config: SimConfig
    options: LiveOptions
    scenario: Scenario
    root: Path
    hooks: _Hooks
    interrupted: asyncio.Event  # set (thread-safely) by SIGINT/SIGTERM through hooks.stop

    def bound(self, normal: float, fast: float) -> float:
        """A shutdown step's time limit: ``fast`` once a signal asked to stop."""
        return fast if self.interrupted.is_set() else normal


@dataclass
class _Ending:
    """What the stop measures, filled in while the exit stack unwinds."""

    wall_s: float = 0.0
    rss_mb: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)

    def add_rss_of(self, pid: int) -> None:
        self.rss_mb += _rss_mb(pid)


@dataclass(frozen=True)
class _Broker:
    """The broker of the run: ``kind`` ``mosquitto`` | ``embedded`` (private) | ``external``;
    ``pid`` the embedded broker's process (its RSS counts toward the run's)."""

    url: str
    kind: str
    pid: int | None = None


def _private_broker_kind(requested: str) -> str:
    """``auto``: Mosquitto when the binary is installed, else the embedded broker."""
    if requested != "auto":
        return requested
    from broker.launcher import find_mosquitto

    return "mosquitto" if find_mosquitto() is not None else "embedded"


@contextlib.asynccontextmanager
async def _broker(run: _Run) -> AsyncIterator[_Broker]:
    """The external broker of ``options.broker_url``, else a private one (stopped on exit)."""
    if run.options.broker_url is not None:
        yield _Broker(run.options.broker_url, "external")
        return
    kind = _private_broker_kind(run.options.broker_kind)
    run.hooks.phase(f"starting the broker ({kind})")
    private = _private_mosquitto(run) if kind == "mosquitto" else _embedded_broker(run)
    async with private as broker:
        yield broker


@contextlib.asynccontextmanager
async def _private_mosquitto(run: _Run) -> AsyncIterator[_Broker]:
    from broker.launcher import MosquittoBroker

    mosquitto = MosquittoBroker(state_dir=run.root / "mosquitto")
    url = mosquitto.start()
    try:
        yield _Broker(url, "mosquitto")
    finally:
        mosquitto.stop(timeout=run.bound(10.0, 0.3))


@contextlib.asynccontextmanager
async def _embedded_broker(run: _Run) -> AsyncIterator[_Broker]:
    """The embedded (amqtt) broker in a child process."""
    from broker.launcher import free_port

    port = free_port()
    proc, stop = await _start_embedded_broker(run, port)
    try:
        yield _Broker(f"mqtt://127.0.0.1:{port}", "embedded", proc.pid)
    finally:
        stop.set()
        await _join_or_kill(proc, run.bound(10.0, 0.3), run.interrupted)


async def _start_embedded_broker(run: _Run, port: int) -> tuple[BaseProcess, MpEvent]:
    """Start the broker process and wait (in short, interruptible steps, at most 30 s) until it
    listens. A signal meanwhile stops it and raises :class:`StopRequested`."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_embedded_broker_main, args=(port, ready, stop), daemon=True)
    with _sigint_blocked():
        proc.start()
    deadline = time.monotonic() + 30.0
    while not await asyncio.to_thread(ready.wait, 0.1):
        if run.interrupted.is_set() or time.monotonic() > deadline:
            stop.set()
            await _join_or_kill(proc, 0.5)
            if run.interrupted.is_set():
                # release the semaphores now (the command exits without teardown, and
                # multiprocessing's resource tracker would warn about leaked ones): the
                # traceback keeps this frame, and its locals, alive
                del ready, stop, proc
                raise StopRequested(run.hooks.signum())
            raise RuntimeError("embedded broker did not start")
    return proc, stop


@dataclass(frozen=True)
class _RunningAggregator:
    service: Aggregator
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def _running_aggregator(run: _Run, url: str) -> AsyncIterator[_RunningAggregator]:
    """The aggregator service, running (or stopped by a signal while it started: it still gets
    stopped on exit). Raises RuntimeError when it is not ready within 60 s."""
    from edgefl.aggregator import Aggregator

    run.hooks.phase("starting the aggregator")
    aggregator = Aggregator(
        _aggregator_config(run.config, run.options, url, run.root / "aggregator")
    )
    ready = asyncio.Event()
    task = asyncio.create_task(aggregator.run(ready=ready), name="aggregator")
    await _first_of(ready, run.interrupted, task, wait_s=60.0)
    if not ready.is_set() and not run.interrupted.is_set():
        aggregator.stop()
        await _first_of(run.interrupted, task, wait_s=5.0)
        if task.done():
            task.result()  # its error, if it failed
        raise RuntimeError("the aggregator did not start within 60 s")
    try:
        yield _RunningAggregator(aggregator, task)
    finally:
        aggregator.stop()
        done, _ = await asyncio.wait([task], timeout=run.bound(30.0, 0.5))
        if done and not task.cancelled():
            task.exception()  # retrieved (and ignored) as before: the run is over
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 0.3)


async def _catch_up(run: _Run, aggregator: Aggregator, poller: _Poller, t0: float) -> None:
    """Let the evaluator catch up with the last version, and record it."""
    await _first_of(run.interrupted, wait_s=min(2.0, run.options.poll_s * 2))
    poller.poll(aggregator, time.monotonic() - t0)


class _Devices(Protocol):
    """The run's devices, wherever they live."""

    def poll(self) -> dict[str, int]:
        """Hand out training slots, move dropouts and crashes into the record; device-state
        counts (``offline`` for agents not connected)."""
        ...

    async def stop(self, ending: _Ending) -> None:
        """Stop every agent (within the run's bounds); add totals and RSS to ``ending``."""
        ...


def _record_events(record: RunRecord, events: list[tuple[str, float, int]]) -> None:
    for kind, t, d in events:
        (record.dropout if kind == "dropout" else record.crash)(t, d)


class _NoDevices:
    """Stopped before the devices started."""

    def poll(self) -> dict[str, int]:
        return {}

    async def stop(self, ending: _Ending) -> None:
        return None


class _InProcessDevices:
    """All agents on this process's event loop (``workers`` 1)."""

    def __init__(self, run: _Run, url: str, record: RunRecord, t0: float) -> None:
        devices = list(range(run.config.devices))
        self._run = run
        self._record = record
        self._group = _DeviceGroup(
            run.scenario, run.options, url, devices, run.root / "devices", t0
        )
        self._starter = asyncio.create_task(self._group.start())

    def poll(self) -> dict[str, int]:
        self._group.grant()
        states = self._group.states()
        _record_events(self._record, self._group.shared.take_events())
        return states

    async def stop(self, ending: _Ending) -> None:
        ending.totals = self._group.totals()
        self._starter.cancel()
        await self._group.stop(self._run.bound(15.0, 0.5))


class _WorkerProcesses:
    """The agents spread over ``workers`` processes, which report on a queue."""

    def __init__(self, run: _Run, url: str, record: RunRecord) -> None:
        ctx = mp.get_context("spawn")
        workers = max(1, run.options.workers)
        devices = list(range(run.config.devices))
        self._run = run
        self._record = record
        self._stop = ctx.Event()
        self._reports: MpQueue[_WorkerReport] = ctx.Queue()
        self._latest: dict[int, _WorkerReport] = {}  # pid -> its last report
        self._procs: list[BaseProcess] = []
        for w in range(workers):
            args = (
                run.config,
                run.options,
                url,
                devices[w::workers],
                str(run.root / f"devices-{w}"),
                self._stop,
                self._reports,
            )
            proc = ctx.Process(target=_worker_main, args=args, daemon=True)
            with _sigint_blocked():
                proc.start()
            self._procs.append(proc)

    def _drain(self) -> None:
        while True:
            try:
                report: _WorkerReport = self._reports.get_nowait()
            except Exception:
                return
            self._latest[report.pid] = report
            _record_events(self._record, report.events)

    def _sum(self, counts: Callable[[_WorkerReport], dict[str, int]]) -> dict[str, int]:
        return dict(sum((Counter(counts(r)) for r in self._latest.values()), Counter()))

    def poll(self) -> dict[str, int]:
        self._drain()
        return self._sum(lambda r: r.states)

    async def stop(self, ending: _Ending) -> None:
        self._drain()
        ending.rss_mb += sum(r.rss_mb for r in self._latest.values())
        ending.totals = self._sum(lambda r: r.totals)
        self._stop.set()
        deadline = time.monotonic() + self._run.bound(20.0, 0.7)
        for p in self._procs:
            await _join_or_kill(p, max(0.0, deadline - time.monotonic()), self._run.interrupted)
        self._drain()


@contextlib.asynccontextmanager
async def _devices(
    run: _Run, url: str, record: RunRecord, t0: float, ending: _Ending
) -> AsyncIterator[_Devices]:
    """Start the devices (none when a signal already arrived); stop them on exit."""
    devices: _Devices
    workers = max(1, run.options.workers)
    if run.interrupted.is_set():
        devices = _NoDevices()
    else:
        run.hooks.phase(f"starting {run.config.devices} devices in {workers} process(es); training")
        if workers == 1:
            devices = _InProcessDevices(run, url, record, t0)
        else:
            devices = _WorkerProcesses(run, url, record)
    try:
        yield devices
    finally:
        await devices.stop(ending)


class _PollLoop:
    """The poll loop: samples the aggregator and the devices into the record, reports progress
    and decides when the run is over."""

    def __init__(
        self,
        run: _Run,
        aggregator: _RunningAggregator,
        devices: _Devices,
        poller: _Poller,
        t0: float,
        progress: Callable[[str], None] | None,
    ) -> None:
        self._run = run
        self._aggregator = aggregator
        self._devices = devices
        self._poller = poller
        self._t0 = t0
        self._progress = progress
        self.peak_connected = 0
        self._reached = False

    async def until_done(self) -> None:
        """Poll every ``poll_s`` until a signal, the target (with ``stop_at_target``), a limit
        (``max_wall_s``, ``max_updates``) or the aggregator's end."""
        while True:
            await _first_of(self._run.interrupted, wait_s=self._run.options.poll_s)
            if self._run.interrupted.is_set() or self._tick(time.monotonic() - self._t0):
                return

    def _tick(self, t: float) -> bool:
        """One poll at ``t`` seconds into the run; True when the run is over."""
        record = self._poller.record
        self._poller.poll(self._aggregator.service, t)
        states = self._devices.poll()
        record.device_states(t, states)
        connected = sum(v for k, v in states.items() if k != "offline")
        self.peak_connected = max(self.peak_connected, connected)
        accuracy = record.evals().accuracy
        acc = float(accuracy[-1]) if len(accuracy) else None
        cfg = self._run.config
        self._reached = self._reached or bool(len(accuracy) and accuracy.max() >= cfg.target)
        self._report(t, acc, connected)
        return (
            (self._reached and cfg.stop_at_target)
            or t >= (cfg.max_wall_s if cfg.max_wall_s is not None else math.inf)
            or (cfg.max_updates is not None and self._poller.received >= cfg.max_updates)
            or self._aggregator.task.done()
        )

    def _report(self, t: float, acc: float | None, connected: int) -> None:
        received = self._poller.received
        if self._progress is not None:
            self._progress(
                f"live {self._run.config.algorithm.value}: {t:5.1f}s  "
                f"v{self._aggregator.service.statistics().version}  "
                f"acc {100 * (acc or 0.0):.1f}%  updates {received:,}  devices online {connected}"
            )
        if self._run.hooks.on_sample is not None:
            self._run.hooks.on_sample(
                Sample(
                    elapsed_s=t,
                    accuracy=acc,
                    updates=received,
                    version=self._aggregator.service.statistics().version,
                    detail=f"online {connected}",
                )
            )


def _new_record(config: SimConfig, options: LiveOptions) -> RunRecord:
    return RunRecord(
        config={
            **config.to_dict(),
            "live": {"workers": options.workers, "time_scale": options.time_scale},
        },
        mode=Mode.LIVE,
        algorithm=config.algorithm,
        devices=config.devices,
    )


def _interrupt_flag(hooks: _Hooks) -> asyncio.Event:
    """An event that SIGINT/SIGTERM (routed through ``hooks.stop``) set from any thread."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    if hooks.stop is not None:
        hooks.stop.route(lambda: _call_soon(loop, interrupted.set))
    return interrupted


async def _run_live_async(
    config: SimConfig,
    options: LiveOptions,
    scenario: Scenario,
    root: Path,
    progress: Callable[[str], None] | None,
    on_broker: Callable[[str, str], None] | None = None,
    hooks: _Hooks | None = None,
) -> LiveResult:
    hooks = hooks or _Hooks()
    run = _Run(config, options, scenario, root, hooks, _interrupt_flag(hooks))
    ending = _Ending()
    record = _new_record(config, options)
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(_broker(run))
        if on_broker is not None:
            on_broker(broker.url, broker.kind)
        t0_wall, t0 = time.time(), time.monotonic()
        record.started_at = time.perf_counter()
        aggregator = await stack.enter_async_context(_running_aggregator(run, broker.url))
        poller = _Poller(record, 4 * scenario.spec.num_params, t0_wall)
        stack.push_async_callback(_catch_up, run, aggregator.service, poller, t0)
        if broker.pid is not None:
            stack.callback(ending.add_rss_of, broker.pid)
        devices = await stack.enter_async_context(_devices(run, broker.url, record, t0, ending))

        @stack.callback
        def announce_stop() -> None:
            signal_name = f" ({hooks.signal_name()})" if run.interrupted.is_set() else ""
            hooks.phase("stopping" + signal_name)
            ending.wall_s = time.monotonic() - t0
            ending.rss_mb = _rss_mb()

        watch = _PollLoop(run, aggregator, devices, poller, t0, progress)
        await watch.until_done()
    return _result(run, record, aggregator.service, poller, watch.peak_connected, ending)


def _result(
    run: _Run,
    record: RunRecord,
    aggregator: Aggregator,
    poller: _Poller,
    peak_connected: int,
    ending: _Ending,
) -> LiveResult:
    """Close the record and sum up the run."""
    ev = record.evals()
    wall = ending.wall_s
    record.finish(
        wall_time_s=wall,
        model_versions=aggregator.statistics().version,
        final_accuracy=float(ev.accuracy[-1]) if len(ev.accuracy) else None,
    )
    devices = run.config.devices
    return LiveResult(
        record=record,
        wall_s=wall,
        devices_started=devices,
        peak_connected=peak_connected,
        rss_mb=ending.rss_mb,
        rss_mb_per_device=ending.rss_mb / max(1, devices),
        updates_per_s=poller.received / wall if wall > 0 else 0.0,
        agent_totals=ending.totals,
        interrupted=run.interrupted.is_set(),
    )


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over anyway
        loop.call_soon_threadsafe(callback)


async def _first_of(*waitables: asyncio.Event | asyncio.Task[object], wait_s: float) -> None:
    """Wait until one of the events is set or one of the tasks is done, or ``wait_s`` passed."""
    waiters = [
        asyncio.ensure_future(w.wait()) if isinstance(w, asyncio.Event) else w for w in waitables
    ]
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w, original in zip(waiters, waitables, strict=True):
            if w is not original:
                w.cancel()


async def _join_or_kill(
    proc: BaseProcess, wait_s: float, interrupted: asyncio.Event | None = None
) -> None:
    """Join a child process in short steps (so the event loop stays responsive, and nothing is
    left in the default executor), for at most ``wait_s`` seconds (less once ``interrupted``
    is set); then kill it."""
    deadline = time.monotonic() + wait_s
    while proc.is_alive() and time.monotonic() < deadline:
        if interrupted is not None and interrupted.is_set():
            deadline = min(deadline, time.monotonic() + 0.5)
        await asyncio.to_thread(proc.join, 0.05)
    if proc.is_alive():
        proc.kill()
        await asyncio.to_thread(proc.join, 1.0)


def run_live(
    config: SimConfig,
    options: LiveOptions | None = None,
    *,
    scenario: Scenario | None = None,
    progress: Callable[[str], None] | None = None,
    on_broker: Callable[[str, str], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    stop: SignalStop | None = None,
) -> LiveResult:
    """Run the live simulation to the target or the limits (``max_wall_s``, ``max_updates``).

    ``on_broker(url, kind)`` is called once the broker is known (``kind``: ``mosquitto`` or
    ``embedded`` for a private one, ``external`` for ``broker_url``), e.g. to tell the user where
    ``edgefl monitor`` can connect. ``on_phase(text)`` announces each phase (starting the
    broker, the aggregator, the devices; stopping), ``on_sample`` gets a
    :class:`~firmware_sim.progress.Sample` per poll.

    ``stop`` (an entered :class:`~firmware_sim.interrupt.SignalStop`): SIGINT/SIGTERM during the
    run stops it with short timeouts (about a second in all) and returns the partial result with
    ``interrupted`` set; a signal while the private broker starts raises
    :class:`~firmware_sim.interrupt.StopRequested` once it is stopped again."""
    opts = options or LiveOptions()
    if opts.quiet:
        _quiet_logs()
    sc = scenario or build_scenario(config)
    # The aggregator's evaluator thread needs torch; imported there, the import (seconds on a
    # loaded 2-core machine) would hold up a stop, which joins that thread. Import it here.
    import torch  # noqa: F401

    own_root = opts.state_dir is None
    root = Path(tempfile.mkdtemp(prefix="edgefl-live-")) if own_root else Path(opts.state_dir)  # type: ignore[arg-type]
    try:
        hooks = _Hooks(on_phase=on_phase, on_sample=on_sample, stop=stop)
        return asyncio.run(_run_live_async(config, opts, sc, root, progress, on_broker, hooks))
    finally:
        if stop is not None:
            stop.route(None)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
