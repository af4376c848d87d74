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
* **Concurrency** is not simulated: the aggregator runs with server-controlled participation
  (protocol 1.2, PROTOCOL.md §4.7), ``C = concurrency`` leases at once; available devices check
  in, the aggregator grants leases at random among them, and an agent trains only under a
  lease, as a real fleet does. Leases last ``DEFAULT_LEASE_S · time_scale`` wall seconds (at
  least 10), check-ins ``DEFAULT_CHECKIN_TTL_S · time_scale`` (see :func:`participation_for`).

``time_scale`` maps simulated seconds to wall seconds (0.05: 20x faster than real time).
With ``workers > 1`` the devices are spread over that many processes (``spawn``), each with one
event loop and its own pools; the aggregator stays in the main process. The run record is
filled by polling the aggregator: per-version accuracy from ``history()`` (``eval_dataset`` =
the simulation's dataset), updates, staleness, bytes and rejections from ``statistics()``.

The device side (snapshot source, trainer, device groups, the worker and broker processes) is
:mod:`firmware_sim.live_devices`; this module runs the whole: :func:`_run_live_async` enters the
broker, the running aggregator and the devices on one ``AsyncExitStack`` and polls until a
limit or a signal. ``LiveOptions.role`` splits a run over processes or hosts: ``aggregator``
runs it without devices, :func:`run_live_devices` only the devices of ``device_range``
(:mod:`firmware_sim.live_roles` is the command's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import shutil
import signal
import tempfile
import time
import typing
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from edgefl.aggregation import Algorithm
from firmware_sim.interrupt import SignalStop, StopRequested
from firmware_sim.live_devices import (
    DeviceGroup,
    SimSnapshotSource,
    SimTrainer,
    WorkerReport,
    device_id,
    embedded_broker_main,
    quiet_logs,
    rss_mb,
    sigint_blocked,
    worker_main,
)
from firmware_sim.local_dp import REFUSED_KEY, from_totals
from firmware_sim.progress import Sample
from firmware_sim.record import Mode, RunRecord
from firmware_sim.scenario import Scenario, SimConfig, build_scenario

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue as MpQueue
    from multiprocessing.synchronize import Event as MpEvent

    from edgefl.aggregator import Aggregator, AggregatorConfig
    from edgefl.participation import ParticipationConfig

# SimSnapshotSource, SimTrainer and device_id live in firmware_sim.live_devices; re-exported
__all__ = [
    "DevicesResult",
    "LiveOptions",
    "LiveResult",
    "LiveRole",
    "SimSnapshotSource",
    "SimTrainer",
    "device_id",
    "participation_for",
    "run_live",
    "run_live_devices",
]


class LiveRole(StrEnum):
    """What one ``edgefl sim --mode live`` process runs (``--role``)."""

    ALL = "all"  # broker (unless external), aggregator and every device
    AGGREGATOR = "aggregator"  # broker (unless external) and aggregator; devices run elsewhere
    DEVICES = "devices"  # only the devices of ``device_range``, against an external broker


@dataclass(frozen=True)
class LiveOptions:
    """How to run live. ``broker_url`` None starts a private broker of ``broker_kind``:
    ``embedded`` (amqtt, MQTT 3.1.1, in a child process), ``mosquitto`` (a private Mosquitto
    with the dev config) or ``auto`` (Mosquitto when the binary is installed, else embedded:
    amqtt manages only a few updates/s with 100 devices).

    ``role`` splits a run over processes or hosts (docs/SCALING.md): ``devices`` runs only the
    devices ``device_range`` = ``(A, B)``, i.e. ``A .. B-1`` of the fleet the config and seed
    define (``None``: all of them), against the aggregator of a ``role="aggregator"`` process
    (or any ``edgefl aggregator`` with the same settings) on ``broker_url``."""

    broker_url: str | None = None
    broker_kind: str = "auto"
    fleet: str = "sim"
    workers: int = 1
    time_scale: float = 0.05
    train_threads: int = 2
    probe_interval_s: float = 10.0  # a safety net: SimSnapshotSource wakes agents on changes
    poll_s: float = 0.5
    connect_per_s: float = 250.0  # agents started per second, for the fleet (workers share it)
    state_dir: Path | None = None
    quiet: bool = True
    round_deadline_s: float | None = None  # FedAvg, wall seconds; default from the fleet
    role: LiveRole = LiveRole.ALL
    device_range: tuple[int, int] | None = None  # role devices: devices A .. B-1

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", LiveRole(self.role))
        if self.role is LiveRole.DEVICES and self.broker_url is None:
            raise ValueError("role devices needs broker_url (the aggregator's broker)")
        if self.device_range is not None:
            a, b = self.device_range
            if not 0 <= a < b:
                raise ValueError(f"device_range must be A:B with 0 <= A < B, got {a}:{b}")


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
    # the fleet at scale (bench/fleet.py): when every device was first connected at once, the
    # update rate from then on, the devices connected at the last poll, and the memory the
    # agents added to their processes (RSS growth since the agents started)
    all_connected_s: float | None = None
    steady_updates_per_s: float | None = None
    connected_at_end: int = 0
    agents_rss_mb: float = 0.0


# ----------------------------------------------------------------------------- the aggregator

MIN_LEASE_S = 10.0
"""Shortest lease of a live run, in wall seconds (however small ``time_scale``)."""


def participation_for(cfg: SimConfig, opts: LiveOptions) -> ParticipationConfig:
    """The live aggregator's participation: ``C`` = the run's ``concurrency`` (the FedAvg
    cohort), leases and check-ins as long as the runtime's defaults in simulated time."""
    from edgefl.participation import DEFAULT_CHECKIN_TTL_S, DEFAULT_LEASE_S, ParticipationConfig

    fedavg = cfg.algorithm is Algorithm.FEDAVG
    return ParticipationConfig(
        concurrency=cfg.aggregation.effective_cohort if fedavg else cfg.aggregation.concurrency,
        lease_s=max(MIN_LEASE_S, DEFAULT_LEASE_S * opts.time_scale),
        checkin_ttl_s=max(2 * MIN_LEASE_S, DEFAULT_CHECKIN_TTL_S * opts.time_scale),
    )


def metrics_interval_for(devices: int) -> float:
    """The live aggregator's METRICS period: 1 s for a small fleet, up to the service's default
    5 s for thousands of agents. Each period also republishes the retained server state, which
    every agent receives and decodes: with 2,000 agents in the simulator's processes one
    publication is 2,000 deliveries there, so its rate is a per-agent cost."""
    return min(5.0, max(1.0, devices / 400))


def _aggregator_config(
    cfg: SimConfig, opts: LiveOptions, url: str, state_dir: Path
) -> AggregatorConfig:
    """The live aggregator's config: the run's :meth:`SimConfig.aggregation_settings` (the same
    the virtual simulator runs), as they are."""
    from edgefl.aggregator import AggregatorConfig
    from edgefl.aggregator.sections import DeviceTask, IngestTuning, Outputs

    deadline = opts.round_deadline_s
    if deadline is None:
        deadline = max(1.0, (cfg.aggregation.round_deadline_s or 60.0) * opts.time_scale)
    return AggregatorConfig(
        broker_url=url,
        fleet=opts.fleet,
        model=cfg.model_name,
        state_dir=state_dir,
        aggregation=cfg.aggregation_settings(),
        round_deadline_s=deadline,
        seed=cfg.seed,
        task=DeviceTask(
            local_epochs=cfg.local.epochs,
            batch_size=cfg.local.batch_size,
            lr=cfg.local.lr,
            codec=cfg.codec_config(),
        ),
        outputs=Outputs(
            eval_dataset=cfg.dataset,
            metrics_interval_s=metrics_interval_for(cfg.devices),
            # the aggregator's own stop rule ends the run: its final model is the version
            # measured at the target, not one that in-flight updates moved on after it
            until_accuracy=cfg.stop.target if cfg.stop.stop_at_target else None,
        ),
        ingest=IngestTuning(fsync=False),
        participation=participation_for(cfg, opts),
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
        self.dp_version = -1

    def poll(self, aggregator: Aggregator, t: float) -> None:
        st = aggregator.statistics()
        if st.privacy is not None and st.version != self.dp_version:  # central DP: ε per version
            self.dp_version = st.version
            self.record.dp_flush(t, st.version, st.privacy)
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

    def device_ids(self) -> list[int]:
        """The devices this process runs: ``device_range`` (clipped to the fleet), else all."""
        n = self.config.devices
        a, b = self.options.device_range or (0, n)
        return list(range(min(a, n), min(b, n)))


@dataclass
class _Ending:
    """What the stop measures, filled in while the exit stack unwinds."""

    wall_s: float = 0.0
    rss_mb: float = 0.0
    agents_rss_mb: float = 0.0  # RSS the agents added to their processes
    totals: dict[str, int] = field(default_factory=dict)

    def add_rss_of(self, pid: int) -> None:
        self.rss_mb += rss_mb(pid)


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
    proc = ctx.Process(target=embedded_broker_main, args=(port, ready, stop), daemon=True)
    with sigint_blocked():
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
        """Move dropouts and crashes into the record; device-state counts (``offline`` for
        agents not connected)."""
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
        devices = run.device_ids()
        self._run = run
        self._record = record
        self._rss_start = rss_mb()
        self._group = DeviceGroup(run.scenario, run.options, url, devices, run.root / "devices", t0)
        self._starter = asyncio.create_task(self._group.start())

    def poll(self) -> dict[str, int]:
        states = self._group.observe().states
        _record_events(self._record, self._group.shared.take_events())
        return states

    async def stop(self, ending: _Ending) -> None:
        ending.totals = self._group.observe(0.0).totals
        ending.agents_rss_mb = max(0.0, rss_mb() - self._rss_start)
        self._starter.cancel()
        await self._group.stop(self._run.bound(15.0, 0.5))


class _WorkerProcesses:
    """The agents spread over ``workers`` processes, which report on a queue."""

    def __init__(self, run: _Run, url: str, record: RunRecord) -> None:
        ctx = mp.get_context("spawn")
        workers = max(1, run.options.workers)
        devices = run.device_ids()
        self._run = run
        self._record = record
        self._stop = ctx.Event()
        self._reports: MpQueue[WorkerReport] = ctx.Queue()
        self._latest: dict[int, WorkerReport] = {}  # pid -> its last report
        self._procs: list[BaseProcess] = []
        # the fleet's connect rate, shared by the workers (a connect storm is fleet-wide)
        per_worker = replace(run.options, connect_per_s=run.options.connect_per_s / workers)
        for w in range(workers):
            args = (
                run.config,
                per_worker,
                url,
                devices[w::workers],
                str(run.root / f"devices-{w}"),
                self._stop,
                self._reports,
            )
            proc = ctx.Process(target=worker_main, args=args, daemon=True)
            with sigint_blocked():
                proc.start()
            self._procs.append(proc)

    def _drain(self) -> None:
        while True:
            try:
                report: WorkerReport = self._reports.get_nowait()
            except Exception:
                return
            self._latest[report.pid] = report
            _record_events(self._record, report.events)

    def _sum(self, counts: Callable[[WorkerReport], dict[str, int]]) -> dict[str, int]:
        return dict(sum((Counter(counts(r)) for r in self._latest.values()), Counter()))

    def poll(self) -> dict[str, int]:
        self._drain()
        return self._sum(lambda r: r.states)

    async def stop(self, ending: _Ending) -> None:
        self._drain()
        ending.rss_mb += sum(r.rss_mb for r in self._latest.values())
        ending.agents_rss_mb = sum(
            max(0.0, r.rss_mb - r.rss_start_mb) for r in self._latest.values()
        )
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
    if run.interrupted.is_set() or run.options.role is LiveRole.AGGREGATOR:
        devices = _NoDevices()
    else:
        n = len(run.device_ids())
        run.hooks.phase(f"starting {n} devices in {workers} process(es); training")
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
        self.connected = 0  # at the last poll
        self.all_connected: tuple[float, int] | None = None  # (t, updates received) when first

    async def until_done(self) -> None:
        """Poll every ``poll_s`` until a signal, a limit (``max_wall_s``, ``max_updates``) or
        the aggregator's end, which with ``stop_at_target`` is its stop at the target
        (``outputs.until_accuracy``: the newest version measured at or above it)."""
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
        self.connected = connected
        if self.all_connected is None and connected >= self._run.config.devices:
            self.all_connected = (t, self._poller.received)
        accuracy = record.evals().accuracy
        acc = float(accuracy[-1]) if len(accuracy) else None
        cfg = self._run.config
        self._report(t, acc, connected)
        return (
            self._aggregator.service.reached is not None
            or t >= (cfg.stop.max_wall_s if cfg.stop.max_wall_s is not None else math.inf)
            or (cfg.stop.max_updates is not None and self._poller.received >= cfg.stop.max_updates)
            or self._aggregator.task.done()
        )

    def _report(self, t: float, acc: float | None, connected: int) -> None:
        received = self._poller.received
        online = f"devices online {connected}"
        if self._run.options.role is LiveRole.AGGREGATOR:
            online = "devices elsewhere"
        if self._progress is not None:
            self._progress(
                f"live {self._run.config.algorithm.value}: {t:5.1f}s  "
                f"v{self._aggregator.service.statistics().version}  "
                f"acc {100 * (acc or 0.0):.1f}%  updates {received:,}  {online}"
            )
        if self._run.hooks.on_sample is not None:
            self._run.hooks.on_sample(
                Sample(
                    elapsed_s=t,
                    accuracy=acc,
                    updates=received,
                    version=self._aggregator.service.statistics().version,
                    detail=online.removeprefix("devices "),
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
            ending.rss_mb = rss_mb()

        watch = _PollLoop(run, aggregator, devices, poller, t0, progress)
        await watch.until_done()
    return _result(run, record, aggregator.service, poller, watch, ending)


def _result(
    run: _Run,
    record: RunRecord,
    aggregator: Aggregator,
    poller: _Poller,
    watch: _PollLoop,
    ending: _Ending,
) -> LiveResult:
    """Close the record and sum up the run."""
    _record_local_dp(run.config, record, ending.totals)
    ev = record.evals()
    wall = ending.wall_s
    record.finish(
        wall_time_s=wall,
        model_versions=aggregator.statistics().version,
        final_accuracy=float(ev.accuracy[-1]) if len(ev.accuracy) else None,
    )
    devices = run.config.devices
    steady = None
    if watch.all_connected is not None and wall > watch.all_connected[0]:
        t_all, received_then = watch.all_connected
        steady = (poller.received - received_then) / (wall - t_all)
    return LiveResult(
        record=record,
        wall_s=wall,
        devices_started=devices,
        peak_connected=watch.peak_connected,
        rss_mb=ending.rss_mb,
        rss_mb_per_device=ending.rss_mb / max(1, devices),
        updates_per_s=poller.received / wall if wall > 0 else 0.0,
        agent_totals=ending.totals,
        interrupted=run.interrupted.is_set(),
        all_connected_s=None if watch.all_connected is None else watch.all_connected[0],
        steady_updates_per_s=steady,
        connected_at_end=watch.connected,
        agents_rss_mb=ending.agents_rss_mb,
    )


def _record_local_dp(config: SimConfig, record: RunRecord, totals: dict[str, int]) -> None:
    """Local DP: the devices' ε from their agents' ledgers (none when no agent ran here)."""
    if config.local_dp is not None and REFUSED_KEY in totals:
        record.set_local_dp(from_totals(config.local_dp, totals, config.devices).to_json())


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
    if opts.role is LiveRole.DEVICES:
        raise ValueError("role devices runs with run_live_devices")
    hooks = _Hooks(on_phase=on_phase, on_sample=on_sample, stop=stop)
    return _in_state_dir(
        opts,
        stop,
        lambda root: _run_live_async(
            config, opts, scenario or build_scenario(config), root, progress, on_broker, hooks
        ),
    )


_T = TypeVar("_T")


def _in_state_dir(
    opts: LiveOptions, stop: SignalStop | None, main: Callable[[Path], Coroutine[None, None, _T]]
) -> _T:
    """Run ``main(state_dir)`` on a new event loop: ``opts.state_dir``, else a temporary
    directory removed afterwards; quiet logs, torch imported first, ``stop`` unrouted after."""
    if opts.quiet:
        quiet_logs()
    # The aggregator's evaluator thread needs torch; imported there, the import (seconds on a
    # loaded 2-core machine) would hold up a stop, which joins that thread. Import it here.
    import torch  # noqa: F401

    own_root = opts.state_dir is None
    root = Path(tempfile.mkdtemp(prefix="edgefl-live-")) if own_root else Path(opts.state_dir)  # type: ignore[arg-type]
    try:
        return asyncio.run(main(root))
    finally:
        if stop is not None:
            stop.route(None)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- role devices


@dataclass(frozen=True)
class DevicesResult:
    """A finished ``role="devices"`` process (:func:`run_live_devices`)."""

    device_range: tuple[int, int]  # devices A .. B-1 of the fleet
    wall_s: float
    peak_connected: int
    states: dict[str, int]  # device-state counts at the last poll (``offline``: not connected)
    agent_totals: dict[str, int]  # ``receipted``: updates the aggregator reported committed
    dropouts: int
    crashes: int
    rss_mb: float  # this process and its workers, at the end
    interrupted: bool = False  # stopped by SIGINT/SIGTERM (the usual end of such a process)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (``edgefl sim --role devices --json``)."""
        out = asdict(self)
        out["role"] = LiveRole.DEVICES.value
        out["device_range"] = list(self.device_range)
        return out


def run_live_devices(
    config: SimConfig,
    options: LiveOptions,
    *,
    scenario: Scenario | None = None,
    progress: Callable[[str], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    stop: SignalStop | None = None,
) -> DevicesResult:
    """Run only the devices ``options.device_range`` of the fleet ``config`` defines (same
    profiles, data slices and seeds as in a whole run) against the aggregator on
    ``options.broker_url``, until ``config.max_wall_s`` or SIGINT/SIGTERM (``stop``). Each
    such process keeps its own simulated clock (from its start): availability models are not
    aligned across processes (the ``lab`` profile is always available)."""
    if options.role is not LiveRole.DEVICES or options.broker_url is None:
        raise ValueError("run_live_devices needs role devices and a broker_url")
    hooks = _Hooks(on_phase=on_phase, stop=stop)
    sc = scenario or build_scenario(config)
    return _in_state_dir(
        options, stop, lambda root: _run_devices_async(config, options, sc, root, progress, hooks)
    )


async def _run_devices_async(
    config: SimConfig,
    options: LiveOptions,
    scenario: Scenario,
    root: Path,
    progress: Callable[[str], None] | None,
    hooks: _Hooks,
) -> DevicesResult:
    run = _Run(config, options, scenario, root, hooks, _interrupt_flag(hooks))
    ids = run.device_ids()
    ending, record = _Ending(), _new_record(config, options)
    t0 = time.monotonic()
    peak, states = 0, {}
    url = typing.cast(str, options.broker_url)
    async with _devices(run, url, record, t0, ending) as devices:
        limit = config.stop.max_wall_s if config.stop.max_wall_s is not None else math.inf
        while not run.interrupted.is_set():
            await _first_of(run.interrupted, wait_s=options.poll_s)
            t = time.monotonic() - t0
            states = devices.poll()
            connected = sum(v for k, v in states.items() if k != "offline")
            peak = max(peak, connected)
            if progress is not None:
                progress(f"live devices {ids[0]}:{ids[-1] + 1}: {t:5.1f}s  online {connected}")
            if t >= limit:
                break
        hooks.phase("stopping" + (f" ({hooks.signal_name()})" if run.interrupted.is_set() else ""))
        ending.wall_s = time.monotonic() - t0
        ending.rss_mb = rss_mb()
    summary = record.summary(config.stop.target)
    return DevicesResult(
        device_range=(ids[0], ids[-1] + 1) if ids else (0, 0),
        wall_s=ending.wall_s,
        peak_connected=peak,
        states=states,
        agent_totals=ending.totals,
        dropouts=summary["dropouts"],
        crashes=summary["crashes"],
        rss_mb=ending.rss_mb,
        interrupted=run.interrupted.is_set(),
    )
