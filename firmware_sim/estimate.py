"""The demo's yardstick: FedBuff against FedAvg in a virtual run of the same fleet.

``edgefl demo`` runs FedBuff live; it cannot also run synchronous FedAvg live without doubling
its time. :func:`estimate_speedup` runs both algorithms in virtual time (:func:`run_virtual`) on
the demo's own :class:`~firmware_sim.scenario.SimConfig` (same devices, profile mix, data split,
seed, local training; FedAvg as the production baseline: over-selection, deadline, equal
parallelism, see docs/SIMULATOR.md) and converts their virtual times to target into the demo's
clock: ``estimated_s = virtual_s · time_scale`` (the live demo runs the fleet ``1 / time_scale``
times faster than real time). It is an *estimate*: the virtual run models link bandwidth and
leases at the fleet's own time scale, the live run has a real broker and real scheduling, so
the live FedBuff time differs from the estimated one; the speed-up compares the two virtual
runs, like with like.

:class:`BackgroundEstimate` runs the two virtual runs side by side in two spawned processes
at the lowest CPU priority (Linux's ``SCHED_IDLE``, else nice 19), so that they take only CPU
time nobody else wants; the demo starts them once its live run is over (a concurrent start at
that priority could not be shown not to delay the live run on the shared 2-core machine) and
waits for them at most their budget plus a grace. Any failure (an exception, a target not
reached within the budget, a timeout) gives an :class:`Estimate` with ``error`` set: the demo
reports the estimate as unavailable instead of failing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from edgefl.aggregation import Algorithm
from firmware_sim.scenario import SimConfig

__all__ = [
    "ESTIMATE_MAX_UPDATES",
    "BackgroundEstimate",
    "Estimate",
    "VirtualTime",
    "estimate_speedup",
    "virtual_time_to_target",
]

ESTIMATE_MAX_UPDATES = 20_000
"""Each virtual run stops after this many updates (the target not reached: no estimate)."""

_ALGORITHMS = (Algorithm.FEDBUFF, Algorithm.FEDAVG)
_NICE = 19
_POLL_S = 0.2


@dataclass(frozen=True)
class VirtualTime:
    """One algorithm's virtual run: seconds and updates to the target (None: not reached
    within ``received`` updates), the wall seconds it took, and whether its wall budget
    ended it."""

    algorithm: Algorithm
    time_s: float | None
    updates: int | None
    received: int
    wall_s: float
    out_of_time: bool = False


@dataclass(frozen=True)
class Estimate:
    """FedBuff and FedAvg in a virtual run of one fleet. Times are virtual (fleet) seconds to
    the target; ``time_scale`` maps them to the demo's wall clock. ``error`` says why there is
    no estimate (then the times may be None)."""

    time_scale: float
    fedbuff_s: float | None = None
    fedavg_s: float | None = None
    fedbuff_updates: int | None = None
    fedavg_updates: int | None = None
    wall_s: float = 0.0
    error: str | None = None

    @classmethod
    def of(
        cls, time_scale: float, runs: dict[Algorithm, VirtualTime | str], target: float
    ) -> Estimate:
        """Combine the two runs (a run is a :class:`VirtualTime` or the text of its failure)."""
        wall = max((r.wall_s for r in runs.values() if isinstance(r, VirtualTime)), default=0.0)
        for algorithm in _ALGORITHMS:
            run = runs.get(algorithm, "not run")
            if isinstance(run, str):
                return cls(time_scale, wall_s=wall, error=f"{algorithm.value}: {run}")
            if run.time_s is None and run.out_of_time:
                why = f"{algorithm.value}: out of its wall budget after {run.received} updates"
                return cls(time_scale, wall_s=wall, error=why)
            if run.time_s is None:
                why = f"{algorithm.value} did not reach {100 * target:.0f}% in the virtual run"
                return cls(time_scale, wall_s=wall, error=f"{why} ({run.received} updates)")
        buff, avg = runs[Algorithm.FEDBUFF], runs[Algorithm.FEDAVG]
        assert isinstance(buff, VirtualTime)
        assert isinstance(avg, VirtualTime)
        return cls(
            time_scale,
            fedbuff_s=buff.time_s,
            fedavg_s=avg.time_s,
            fedbuff_updates=buff.updates,
            fedavg_updates=avg.updates,
            wall_s=wall,
        )

    @property
    def speedup(self) -> float | None:
        """FedAvg's virtual time to target over FedBuff's (None when unavailable)."""
        if self.error is not None or not self.fedbuff_s or self.fedavg_s is None:
            return None
        return self.fedavg_s / self.fedbuff_s

    def _scaled(self, seconds: float | None) -> float | None:
        return None if seconds is None or self.speedup is None else seconds * self.time_scale

    def fields(self) -> dict[str, Any]:
        """The demo summary's fields: ``estimated_fedavg_time_to_target_s`` and
        ``estimated_fedbuff_time_to_target_s`` (demo seconds), ``estimated_speedup_vs_fedavg``
        (all None when unavailable) and ``estimate`` (the virtual numbers, or the error)."""
        detail: dict[str, Any] = {
            "source": "virtual run of this fleet (same config and seed), both algorithms",
            "available": self.speedup is not None,
            "error": self.error,
            "time_scale": self.time_scale,
            "fedbuff_virtual_s": self.fedbuff_s,
            "fedavg_virtual_s": self.fedavg_s,
            "fedbuff_updates_to_target": self.fedbuff_updates,
            "fedavg_updates_to_target": self.fedavg_updates,
            "wall_s": round(self.wall_s, 1),
        }
        return {
            "estimated_fedavg_time_to_target_s": self._scaled(self.fedavg_s),
            "estimated_fedbuff_time_to_target_s": self._scaled(self.fedbuff_s),
            "estimated_speedup_vs_fedavg": self.speedup,
            "estimate": detail,
        }

    def line(self, target: float) -> str:
        """One console line, clearly labelled as an estimate."""
        fedavg, fedbuff = self._scaled(self.fedavg_s), self._scaled(self.fedbuff_s)
        if fedavg is None or fedbuff is None or self.speedup is None:
            return f"estimate against FedAvg unavailable: {self.error}"
        return (
            f"estimate from a virtual run of this fleet: FedAvg would need ~{fedavg:.0f} s to "
            f"{100 * target:.0f}%, FedBuff ~{fedbuff:.0f} s: {self.speedup:.1f}x"
        )


def _estimate_config(
    config: SimConfig, algorithm: Algorithm, max_wall_s: float | None
) -> SimConfig:
    return config.replace(
        algorithm=algorithm,
        stop_at_target=True,
        max_updates=ESTIMATE_MAX_UPDATES,
        max_time_s=None,
        max_wall_s=max_wall_s,
    )


def virtual_time_to_target(
    config: SimConfig, algorithm: Algorithm, *, max_wall_s: float | None = None
) -> VirtualTime:
    """Run ``config`` with ``algorithm`` in virtual time until the target, after
    :data:`ESTIMATE_MAX_UPDATES` updates or ``max_wall_s`` wall seconds."""
    from firmware_sim.virtual import run_virtual

    start = time.perf_counter()
    cfg = _estimate_config(config, algorithm, max_wall_s)
    summary = run_virtual(cfg).record.summary(cfg.stop.target)
    ttt, updates = summary["time_to_target_s"], summary["updates_to_target"]
    wall = time.perf_counter() - start
    received = int(summary["updates_received"])
    return VirtualTime(
        algorithm=algorithm,
        time_s=None if ttt is None else float(ttt),
        updates=None if updates is None else int(updates),
        received=received,
        wall_s=wall,
        out_of_time=max_wall_s is not None
        and wall >= max_wall_s
        and received < ESTIMATE_MAX_UPDATES,
    )


def estimate_speedup(
    config: SimConfig, *, time_scale: float, max_wall_s: float | None = None
) -> Estimate:
    """Both virtual runs in this process, one after the other (each with ``max_wall_s``)."""
    runs: dict[Algorithm, VirtualTime | str] = {
        a: virtual_time_to_target(config, a, max_wall_s=max_wall_s) for a in _ALGORITHMS
    }
    return Estimate.of(time_scale, runs, config.stop.target)


def _lowest_priority() -> None:
    """Run only on CPU time nobody else wants: Linux's ``SCHED_IDLE`` policy (below nice 19),
    and nice 19 for the other systems (and in case the policy is refused)."""
    os.nice(_NICE)
    set_policy = getattr(os, "sched_setscheduler", None)
    idle = getattr(os, "SCHED_IDLE", None)
    if set_policy is not None and idle is not None:
        with contextlib.suppress(OSError):
            set_policy(0, idle, os.sched_param(0))


def _child(config: SimConfig, algorithm: Algorithm, max_wall_s: float, conn: Connection) -> None:
    """One estimate process: lowest priority; a failure travels as one line of text. Ctrl-C
    is the parent's to handle (it ends this process with SIGTERM, :meth:`cancel`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    result: VirtualTime | str
    try:
        _lowest_priority()
        result = virtual_time_to_target(config, algorithm, max_wall_s=max_wall_s)
    except Exception as exc:  # reported as "unavailable" by the parent, never raised
        result = f"{type(exc).__name__}: {exc}"
    conn.send(result)
    conn.close()


@dataclass(eq=False)
class _Child:
    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Connection


class BackgroundEstimate:
    """:func:`estimate_speedup`'s two runs in two spawned processes at the lowest priority
    (:func:`_lowest_priority`), started at
    construction. :meth:`result` waits at most until ``max_wall_s`` after the start plus
    ``grace_s`` (each process also stops its run at ``max_wall_s``); :meth:`cancel` ends them
    at once. Use as a context manager so that the processes always end."""

    def __init__(
        self,
        config: SimConfig,
        *,
        time_scale: float,
        max_wall_s: float,
        grace_s: float = 30.0,
    ) -> None:
        self.time_scale = time_scale
        self.target = config.stop.target
        self._deadline = time.monotonic() + max_wall_s + grace_s
        ctx = multiprocessing.get_context("spawn")
        self._children: dict[Algorithm, _Child] = {}
        self._runs: dict[Algorithm, VirtualTime | str] = {}
        self._result: Estimate | None = None
        for algorithm in _ALGORITHMS:
            conn, child_conn = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child,
                args=(config, algorithm, max_wall_s, child_conn),
                name=f"edgefl-estimate-{algorithm.value}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self._children[algorithm] = _Child(proc, conn)

    def __enter__(self) -> BackgroundEstimate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def result(self, *, check: Callable[[], None] | None = None) -> Estimate:
        """The estimate; waits until both runs answered or the deadline (then: unavailable,
        timed out). ``check`` is called between polls, e.g. to raise on a signal."""
        while self._result is None:
            pending = [a for a in _ALGORITHMS if a not in self._runs]
            if not pending:
                self._result = Estimate.of(self.time_scale, self._runs, self.target)
                break
            for algorithm in pending:
                self._poll(algorithm)  # an answer already sent counts, even after the deadline
            if time.monotonic() >= self._deadline:
                for algorithm in pending:
                    self._runs.setdefault(algorithm, "timed out")
            elif check is not None:
                check()
        self.cancel()
        return self._result

    def _poll(self, algorithm: Algorithm) -> None:
        child = self._children[algorithm]
        if child.conn.poll(_POLL_S / len(_ALGORITHMS)):
            try:
                got = child.conn.recv()
            except (EOFError, OSError) as exc:
                got = f"no answer ({exc!r})"
            ok = isinstance(got, VirtualTime | str)
            self._runs[algorithm] = got if ok else "a malformed answer"
        elif not child.proc.is_alive() and not child.conn.poll(0):
            self._runs[algorithm] = f"the estimate process exited ({child.proc.exitcode})"

    def cancel(self) -> None:
        """End the processes still running and release the pipes (idempotent)."""
        for child in self._children.values():
            if child.proc.is_alive():
                child.proc.terminate()
                child.proc.join(timeout=5.0)
                if child.proc.is_alive():
                    child.proc.kill()
                    child.proc.join(timeout=5.0)
            child.conn.close()
