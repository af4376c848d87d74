"""``edgefl sim`` (virtual and live) and ``edgefl demo`` stop cleanly on SIGTERM/SIGINT in every
phase, and print progress and a summary when their output is a pipe.

Each test starts the real command as a subprocess with pipes, reads its stderr until a phase
marker appears (no sleeps), sends the signal and measures how long the command takes to exit.
The contract is 2 s; the assertion is a generous 5 s so a loaded CI machine stays green, and the
measured value is printed (``pytest -s``). Live runs start their own private Mosquitto on a free
port (the command's default), never the system broker.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet_parts import start_edgefl

from broker.launcher import find_mosquitto

pytestmark = pytest.mark.integration

STOP_BOUND_S = 5.0  # contract: 2 s
MARKER_TIMEOUT_S = 180.0
SMALL_VIRTUAL = ["--dataset", "digits", "--devices", "20", "--profile", "lab", "--concurrency", "8"]
SMALL_LIVE = [
    "--mode",
    "live",
    "--dataset",
    "digits",
    "--devices",
    "6",
    "--profile",
    "lab",
    "--concurrency",
    "3",
    "--buffer-size",
    "3",
    "--target",
    "0.99",
    "--max-time",
    "120",
]


@dataclass
class Run:
    """A running ``edgefl`` subprocess whose stdout and stderr are read by two threads."""

    proc: subprocess.Popen[str]
    err_lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    err: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, args: Sequence[str], cwd: Path) -> Run:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        env.pop("EDGEFL_DEBUG", None)
        # its own process group: killpg is a terminal's Ctrl-C
        proc = start_edgefl(args, cwd, env, start_new_session=True)
        run = cls(proc)
        threading.Thread(target=run._read_err, daemon=True).start()
        threading.Thread(target=run._read_out, daemon=True).start()
        return run

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.err_lines.put(line)
        self.err_lines.put(None)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)

    def wait_for(self, marker: str) -> str:
        """Read stderr until a line contains ``marker``; returns that line."""
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                pytest.fail(f"no {marker!r} within {MARKER_TIMEOUT_S} s:\n{''.join(self.err)}")
            try:
                line = self.err_lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"exited before {marker!r}:\n{''.join(self.err)}")
            if marker in line:
                return line

    def stop(self, sig: signal.Signals, *, group: bool = False) -> float:
        """Send ``sig`` (to the whole process group with ``group``); seconds until it exited."""
        sent = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60.0)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return time.monotonic() - sent

    def finish(self) -> tuple[str, str]:
        """Wait for the readers to reach end of file; (stdout, stderr)."""
        deadline = time.monotonic() + 10.0
        while self.err_lines.get(timeout=max(0.1, deadline - time.monotonic())) is not None:
            pass
        return "".join(self.out), "".join(self.err)


def _assert_clean_stop(run: Run, elapsed: float, sig: signal.Signals, phase: str) -> str:
    out, err = run.finish()
    print(f"\n{phase}: exited {elapsed:.2f} s after {sig.name} (contract 2 s)")
    assert run.proc.returncode == 0, err
    assert "Traceback" not in err + out, err
    assert "Task exception was never retrieved" not in err, err
    assert "leaked" not in err, err  # multiprocessing's resource tracker: semaphores left behind
    assert elapsed < STOP_BOUND_S, (elapsed, err)
    assert f"stopped by {sig.name}" in err, err
    return err


# ------------------------------------------------------------------------- virtual mode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_virtual_sim_stops_while_training(sig: signal.Signals, tmp_path: Path) -> None:
    run = Run.start(
        ["sim", *SMALL_VIRTUAL, "--target", "0.999", "--max-updates", "1000000"], tmp_path
    )
    run.wait_for("acc ")  # the first progress line: training is under way
    elapsed = run.stop(sig)
    err = _assert_clean_stop(run, elapsed, sig, "virtual, training")
    assert "while training fedbuff" in err
    assert "no report written" in err


def test_virtual_sim_stops_while_building_the_scenario(tmp_path: Path) -> None:
    run = Run.start(["sim", "--devices", "5000", "--target", "0.999"], tmp_path)
    run.wait_for("building the scenario")
    elapsed = run.stop(signal.SIGTERM)
    _assert_clean_stop(run, elapsed, signal.SIGTERM, "virtual, building the scenario")


def test_virtual_sim_stops_while_writing_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    run = Run.start(["sim", *SMALL_VIRTUAL, "--target", "0.5", "--report", str(report)], tmp_path)
    run.wait_for("writing the report")
    elapsed = run.stop(signal.SIGTERM)
    err = _assert_clean_stop(run, elapsed, signal.SIGTERM, "virtual, writing the report")
    assert "while writing the report" in err
    assert "may be incomplete" in err


def test_virtual_sim_in_a_pipe_prints_progress_and_the_summary(tmp_path: Path) -> None:
    run = Run.start(["sim", *SMALL_VIRTUAL, "--target", "0.8", "--json"], tmp_path)
    run.proc.wait(timeout=300)
    out, err = run.finish()
    assert run.proc.returncode == 0, err
    assert "edgefl sim: building the scenario" in err
    progress = [line for line in err.splitlines() if line.startswith("edgefl sim: ")]
    assert any(" acc " in line and " eta " in line for line in progress), err
    assert "fedbuff: final accuracy" in err  # the summary, on stderr with --json
    summary = json.loads(out.strip().splitlines()[-1])  # stdout's last line: the JSON summary
    assert summary["reached_target"] is True
    assert "\x1b[" not in err  # no escape codes in a pipe


# ------------------------------------------------------------------------- live mode


@pytest.fixture
def _mosquitto_installed() -> None:
    """The live commands start their own private Mosquitto: skip without the binary, fail
    under CI (the convention of tests/conftest.py's ``mosquitto`` fixture)."""
    if find_mosquitto() is None:
        _unavailable("mosquitto is not installed (apt-get install mosquitto)")


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)")
    pytest.skip(message)


needs_mosquitto = pytest.mark.usefixtures("_mosquitto_installed")


@needs_mosquitto
@pytest.mark.parametrize(
    ("marker", "phase"),
    [
        ("starting the broker", "live, starting the broker"),
        ("starting the aggregator", "live, starting the aggregator"),
        ("acc ", "live, training"),
    ],
)
def test_live_sim_stops_in_every_phase(marker: str, phase: str, tmp_path: Path) -> None:
    run = Run.start(["sim", *SMALL_LIVE], tmp_path)
    run.wait_for(marker)
    elapsed = run.stop(signal.SIGTERM)
    err = _assert_clean_stop(run, elapsed, signal.SIGTERM, phase)
    assert "no report written" in err


@needs_mosquitto
@pytest.mark.slow
def test_live_sim_with_worker_processes_stops_on_ctrl_c(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the worker processes must
    neither print tracebacks nor keep the command alive."""
    run = Run.start(["sim", *SMALL_LIVE, "--workers", "2"], tmp_path)
    run.wait_for("acc ")
    elapsed = run.stop(signal.SIGINT, group=True)
    _assert_clean_stop(run, elapsed, signal.SIGINT, "live with 2 workers, training, Ctrl-C")


# ------------------------------------------------------------------------- demo


@needs_mosquitto
@pytest.mark.slow
@pytest.mark.parametrize(
    ("marker", "sig"),
    [("starting the aggregator", signal.SIGTERM), ("acc ", signal.SIGINT)],
)
def test_demo_stops_cleanly(marker: str, sig: signal.Signals, tmp_path: Path) -> None:
    report = tmp_path / "report"
    run = Run.start(
        ["demo", "--devices", "6", "--max-time", "120", "--report", str(report)], tmp_path
    )
    run.wait_for(marker)
    elapsed = run.stop(sig, group=sig is signal.SIGINT)
    err = _assert_clean_stop(run, elapsed, sig, f"demo, {marker.strip()}")
    assert "no report written" in err
    assert not report.exists()


@needs_mosquitto
@pytest.mark.slow
@pytest.mark.heavy
def test_demo_in_a_pipe_prints_progress_and_the_summary(tmp_path: Path) -> None:
    report = tmp_path / "report"
    run = Run.start(
        ["demo", "--devices", "6", "--max-time", "12", "--report", str(report), "--json"],
        tmp_path,
    )
    run.proc.wait(timeout=300)
    out, err = run.finish()
    assert run.proc.returncode == 0, err
    assert "Traceback" not in err
    for phase in ("starting the broker", "starting the aggregator", "starting 6 devices"):
        assert f"edgefl demo: {phase}" in err, err
    progress = [line for line in err.splitlines() if line.startswith("edgefl demo: ")]
    assert any(" acc " in line and " eta " in line for line in progress), err
    assert f"report: {report}" in err  # the summary, on stderr with --json
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["mode"] == "live"
    assert summary["devices"] == 6
    assert (report / "summary.json").exists()
    assert "\x1b[" not in err


def test_demo_stops_while_the_embedded_broker_starts(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("amqtt") is None:
        _unavailable("amqtt (the embedded broker) is not installed")
    report = tmp_path / "report"
    run = Run.start(
        ["demo", "--devices", "4", "--broker-kind", "embedded", "--report", str(report)], tmp_path
    )
    run.wait_for("starting the broker (embedded)")
    elapsed = run.stop(signal.SIGTERM)
    err = _assert_clean_stop(run, elapsed, signal.SIGTERM, "demo, starting the embedded broker")
    assert "while starting the broker" in err
    assert not report.exists()
