"""Real parts of a fleet the integration tests start: the aggregator in-process or as a process
(``python -m edgefl.aggregator.cli``, for tests that crash, freeze or signal it), a running
aggregator with its device agents, and where a broker process says it listens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.aggregator import Aggregator, AggregatorConfig

if TYPE_CHECKING:
    from device_agent.agent import DeviceAgent

REPO = Path(__file__).resolve().parents[1]


def aggregator(tmp: Path, url: str, *, fleet: str, model: str, **settings: Any) -> Aggregator:
    """The real aggregator in-process, its state in ``tmp/aggregator`` (no fsync: a test's
    machine does not crash); ``settings`` are more :class:`AggregatorConfig` fields."""
    return Aggregator(
        AggregatorConfig.build(
            broker_url=url,
            fleet=fleet,
            model=model,
            state_dir=tmp / "aggregator",
            fsync=False,
            **settings,
        )
    )


@contextlib.asynccontextmanager
async def running_fleet(
    aggregator: Aggregator, agents: Sequence[DeviceAgent]
) -> AsyncIterator[None]:
    """Run ``aggregator`` (until it is ready, 30 s at most) and then ``agents``; on exit stop the
    agents, then the aggregator, and wait for all of them."""
    ready = asyncio.Event()
    agg_task = asyncio.create_task(aggregator.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            yield
        finally:
            for a in agents:
                a.stop()
            await asyncio.gather(*tasks)
    finally:
        aggregator.stop()
        await agg_task


def start_aggregator_process(
    args: Sequence[str], state_dir: Path, *, python: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """Start the aggregator CLI with ``args`` (``python``: interpreter options first) and return
    once it printed "aggregator ready" (30 s at most). Its stderr goes to a new file next to
    ``state_dir``, named by the process's ``stderr_path`` attribute."""
    stderr_path = state_dir.parent / f"aggregator-{time.monotonic_ns()}.err"
    proc = subprocess.Popen(
        [sys.executable, *python, "-m", "edgefl.aggregator.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.stderr_path = stderr_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if "aggregator ready" in line:
                return proc
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"aggregator did not start: {stderr_path.read_text()[-2000:]}")


def kill_survivors(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """SIGKILL and reap each of ``procs`` still running (a test's ``finally``: whatever failed,
    no aggregator outlives its test)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def killed_at_exit() -> Iterator[list[subprocess.Popen[str]]]:
    """A list for the processes a test starts; any still running when the block exits (a failed
    assertion, a timeout) is killed and reaped (:func:`kill_survivors`)."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        kill_survivors(procs)


def stop_cleanly(*procs: subprocess.Popen[str]) -> None:
    """SIGTERM each process and check it exits 0 within 30 s."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def start_edgefl(
    args: Sequence[str], cwd: Path, env: dict[str, str], **popen: Any
) -> subprocess.Popen[str]:
    """``python -m edgefl.cli <args>`` (the console script's code path) in ``cwd``: no stdin,
    stdout and stderr on text pipes; ``popen`` are more :class:`subprocess.Popen` options."""
    return subprocess.Popen(
        [sys.executable, "-m", "edgefl.cli", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def listening_url(stdout: Iterable[str]) -> str | None:
    """The URL from the first "listening on mqtt://..." line of a broker's output (``None`` if
    the output ends without one)."""
    for line in stdout:
        found = re.search(r"listening on (mqtt://\S+)", line)
        if found:
            return found.group(1)
    return None


async def stop_agents(agents: Iterable[Any], tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Stop each agent and wait for its task to end (a test's ``finally``: whatever failed, no
    agent outlives its test)."""
    for agent in agents:
        agent.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
