"""The simulated devices of a live run (see :mod:`firmware_sim.live`), and its child processes.

Every simulated device is a real :class:`device_agent.agent.DeviceAgent`; this module supplies
what its hardware would: eligibility (:class:`SimSnapshotSource`: power and availability, and
the absence after a dropout), and speed, dropouts and crashes around real SGD
(:class:`SimTrainer`). Who trains when is not simulated: the live aggregator grants training
leases (protocol 1.2, PROTOCOL.md §4.7) and the agents obey them, as a real fleet does.
:class:`DeviceGroup` runs the agents of one process; :func:`worker_main` runs a group in a
worker process and reports on a queue (:class:`WorkerReport`); :func:`embedded_broker_main`
runs the embedded broker in a child process. Children inherit
SIGINT blocked (:func:`sigint_blocked`) and ignore it (:func:`ignore_sigint`): the parent stops
them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from device_agent.agent import DeviceAgent
from device_agent.config import (
    AgentConfig,
    BrokerConfig,
    CodecPrefs,
    DataConfig,
    DataKind,
    PrivacyConfig,
    ProbeConfig,
    SpoolConfig,
    TrainingLimits,
)
from device_agent.dataset import LocalDataset
from device_agent.eligibility import DeviceSnapshot, EligibilityPolicy, MeteredSource
from device_agent.trainer import TrainJob, TrainResult
from edgefl.privacy.spec import dp_to_text
from edgefl.training import LocalTrainConfig
from firmware_sim.attacks import apply_attack
from firmware_sim.fleet import Fate
from firmware_sim.local_dp import histogram_totals
from firmware_sim.scenario import Scenario, SimConfig, build_scenario
from firmware_sim.seeding import MASK64
from firmware_sim.stacked_compute import StackedCompute, TrainingRequest

if TYPE_CHECKING:
    from multiprocessing.queues import Queue as MpQueue
    from multiprocessing.synchronize import Event as MpEvent

    from firmware_sim.live import LiveOptions

__all__ = [
    "DeviceGroup",
    "GroupView",
    "SimSnapshotSource",
    "SimTrainer",
    "WorkerReport",
    "device_id",
    "embedded_broker_main",
    "ignore_sigint",
    "quiet_logs",
    "rss_mb",
    "sigint_blocked",
    "worker_main",
]

log = logging.getLogger("firmware_sim.live")
_STREAM_LIVE = 0x11_FE_5EED
_WAKE_MARGIN_S = 0.002
"""Wall seconds past an availability change at which the agent is woken (then it has flipped)."""
_WAKE_HORIZON_S = 3600.0
"""Changes further away are left to the periodic probe."""


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
        self.compute = StackedCompute(threads=max(1, options.train_threads))

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
    """Eligibility conditions of simulated device ``device``: on mains power (and charging,
    cool, unmetered) exactly when its profile's availability model says it is available at the
    current simulated time and it is not away after a dropout; on battery otherwise.

    Event-driven, as a phone's power events are: each snapshot also schedules ``on_change``
    (the agent's :meth:`~device_agent.agent.DeviceAgent.check_now`, set by
    :class:`DeviceGroup`) for the moment the answer next changes
    (the availability window's end or the next window's start, :meth:`Fleet.available_until`
    / :meth:`Fleet.next_available`, or the end of an absence), so the agent sees every change
    on time whatever its probe interval; the periodic probe is only a safety net, and a long
    one (``LiveOptions.probe_interval_s``) spares thousands of agents a snapshot a second."""

    def __init__(self, shared: _Shared, device: int) -> None:
        self._shared = shared
        self._device = device
        self.on_change: Callable[[], None] | None = None
        self._wake: asyncio.TimerHandle | None = None

    async def snapshot(self) -> DeviceSnapshot:
        sh = self._shared
        now = time.monotonic()
        t = sh.virtual_now()
        away_until = sh.away_until.get(self._device, 0.0)
        available = sh.sc.fleet.is_available(self._device, t) and now >= away_until
        self._schedule_change(now, t, available, away_until)
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

    def _schedule_change(self, now: float, t: float, available: bool, away_until: float) -> None:
        """Wake the agent when the availability computed at ``t`` (simulated) next changes."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if self.on_change is None:
            return
        fleet, scale = self._shared.sc.fleet, self._shared.options.time_scale
        if available:
            flip = fleet.available_until(self._device, t)
        else:  # back when both the absence and the unavailable stretch are over
            t_back = max(t, t + (away_until - now) / scale)
            flip = fleet.next_available(self._device, t_back)
        if not t < flip < math.inf:
            return
        delay = (flip - t) * scale + _WAKE_MARGIN_S
        if delay <= _WAKE_HORIZON_S:
            self._wake = asyncio.get_running_loop().call_later(delay, self.on_change)


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
        sh = self._shared
        d = self._device
        agent = self.agent
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
        request = TrainingRequest(
            job.spec,
            job.base_weights,
            job.data.x_train,
            job.data.y_train,
            LocalTrainConfig(
                epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, seed=job.seed
            ),
            should_stop,
        )
        res = sh.compute.submit(request).result()
        if res is None or not self._sleep(duration - (time.monotonic() - started), should_stop):
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
        privacy=PrivacyConfig(dp_to_text(cfg.local_dp)),  # local DP: the agent's own
    )


def device_id(device: int) -> str:
    """MQTT client id and device id of simulated device ``device``."""
    return f"sim-{device:06d}"


class GroupView(NamedTuple):
    """What :meth:`DeviceGroup.observe` counts over its agents."""

    states: dict[str, int]  # device-state counts; ``offline``: not connected
    totals: dict[str, int]  # agent counters summed (``receipted``: committed by the aggregator)


class DeviceGroup:
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
        self._data: dict[int, LocalDataset] = {}  # slice index -> its dataset, shared read-only
        # The aggregator may grant every one of its C leases to devices of this process: one
        # agent thread per lease (the threads mostly sleep out the simulated training time).
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, scenario.config.aggregation.concurrency),
            thread_name_prefix="edgefl-sim-agent",
        )
        self.agents: dict[int, DeviceAgent] = {}
        self._view: GroupView | None = None
        self._view_at = 0.0
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stopping = False
        self.started = 0

    def _dataset(self, d: int) -> LocalDataset:
        """Device ``d``'s data: one read-only copy per data slice, shared by the agents of this
        process that own the slice (devices ``d`` and ``d + num_slices`` train on the same
        examples; an agent only reads its dataset)."""
        key = d % self.sc.num_slices
        data = self._data.get(key)
        if data is None:
            x, y = self.sc.device_data(d)
            shape = (0, *x.shape[1:])
            empty_x, empty_y = np.zeros(shape, dtype=np.float32), np.zeros(0, dtype=np.int64)
            for array in (x, y, empty_x, empty_y):
                array.setflags(write=False)
            data = self._data[key] = LocalDataset(x, y, empty_x, empty_y)
        return data

    def _make(self, d: int, loop: asyncio.AbstractEventLoop) -> DeviceAgent:
        data = self._dataset(d)
        trainer = SimTrainer(self.shared, d, loop, self._crash)
        snapshots = SimSnapshotSource(self.shared, d)
        agent = DeviceAgent(
            _agent_config(
                self.sc.config, self.opts, self.url, d, self.root, self.sc.fleet.profile_of(d).name
            ),
            trainer=trainer,
            snapshots=snapshots,
            dataset=data,
            executor=self.executor,
        )
        trainer.agent = agent
        snapshots.on_change = agent.check_now
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
        """Launch the agents at ``connect_per_s`` (0: all at once), paced by the clock: agent
        ``i`` starts at ``t0 + i / connect_per_s``, so a busy event loop (thousands of agents)
        starts every agent that is due at each wake-up instead of one per wake-up."""
        rate = self.opts.connect_per_s
        t0 = time.monotonic()
        for i, d in enumerate(self.devices):
            if self.stopping:
                return
            self._launch(d)
            if rate > 0:
                await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))

    def observe(self, max_age_s: float | None = None) -> GroupView:
        """Device-state counts (``offline``: not connected) and agent totals, from one
        ``statistics()`` per agent (about 0.2 ms each). A view younger than ``max_age_s`` is
        returned as it is (default :meth:`refresh_s`): thousands of agents polled twice a second
        would cost a core."""
        now = time.monotonic()
        limit = self.refresh_s() if max_age_s is None else max_age_s
        if self._view is not None and now - self._view_at < limit:
            return self._view
        states: Counter[str] = Counter()
        out: Counter[str] = Counter()
        for agent in self.agents.values():
            st = agent.statistics()
            states[st.status.value if st.connected else "offline"] += 1
            out["updates_sent"] += st.updates_sent
            out["receipted"] += st.delivery.receipted
            out["trainings_started"] += st.training.started
            out["trainings_completed"] += st.training.completed
            out["connected"] += int(st.connected)
            for k, v in st.training.aborted.items():
                out[f"aborted:{k}"] += v
            part = st.participation
            out["check_ins"] += part.check_ins
            out["withdrawals"] += part.withdrawals
            out["leases_received"] += part.leases_received
            out["leases_unused"] += part.leases_unused
            if st.local_privacy is not None:  # local DP: summable as counts (local_dp.py)
                out.update(histogram_totals([st.local_privacy.updates], st.local_privacy.refused))
        stacked = self.shared.compute.statistics()  # stacked_compute.py: the CPU-side batching
        out["training_stacks"], out["trainings_computed"] = stacked.stacks, stacked.trainings
        self._view, self._view_at = GroupView(dict(states), dict(out)), now
        return self._view

    def refresh_s(self) -> float:
        """How old :meth:`observe` may be: ``poll_s``, or 1 s per 250 agents when longer."""
        return max(self.opts.poll_s, len(self.agents) / 250)

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
        self.shared.compute.shutdown()


# ----------------------------------------------------------------------------- workers


class WorkerReport(NamedTuple):
    """What a worker process puts on the report queue after each poll (and once at the end)."""

    pid: int
    states: dict[str, int]  # device-state counts of its agents
    events: list[tuple[str, float, int]]  # dropouts and crashes since the last report
    totals: dict[str, int]  # agent counters (see :meth:`DeviceGroup.observe`)
    rss_mb: float
    rss_start_mb: float  # before the agents started


def rss_mb(pid: int | None = None) -> float:
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return 0.0
    return 0.0


def quiet_logs() -> None:
    for name in ("device_agent", "edgefl", "edgefl.aggregator", "amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _group_report(group: DeviceGroup, rss_start: float, *, final: bool = False) -> WorkerReport:
    view = group.observe(0.0 if final else None)
    return WorkerReport(
        os.getpid(), view.states, group.shared.take_events(), view.totals, rss_mb(), rss_start
    )


def worker_main(
    config: SimConfig,
    options: LiveOptions,
    url: str,
    devices: list[int],
    root: str,
    stop: MpEvent,
    reports: MpQueue[WorkerReport],
) -> None:
    """Entry point of a worker process: run ``devices`` until ``stop`` is set."""
    ignore_sigint()
    if options.quiet:
        quiet_logs()

    async def main() -> None:
        scenario = build_scenario(config)
        group = DeviceGroup(scenario, options, url, devices, Path(root), time.monotonic())
        import torch  # noqa: F401  (the training stack, loaded before the agents' baseline RSS)

        import edgefl.training  # noqa: F401

        rss_start = rss_mb()
        starter = asyncio.create_task(group.start())
        while not stop.is_set():
            await asyncio.sleep(group.refresh_s())
            reports.put(_group_report(group, rss_start))
        starter.cancel()
        await group.stop()
        reports.put(_group_report(group, rss_start, final=True))

    asyncio.run(main())


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Start child processes inside: they inherit SIGINT blocked, so a terminal's Ctrl-C (sent
    to the whole process group) cannot interrupt their start-up with a traceback; they ignore
    it for good in :func:`ignore_sigint` (the parent stops them). A SIGINT that reaches this
    process meanwhile stays pending and is handled when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_sigint() -> None:
    """In a child process: ignore SIGINT (then unblock it, see :func:`sigint_blocked`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def embedded_broker_main(port: int, ready: MpEvent, stop: MpEvent) -> None:
    from broker.launcher import ThreadedEmbeddedBroker

    ignore_sigint()
    broker = ThreadedEmbeddedBroker(port=port)
    broker.start()
    ready.set()
    stop.wait()
    broker.stop()
