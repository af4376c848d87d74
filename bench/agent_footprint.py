"""Device agent footprint: memory, CPU and latency of a real agent process on a real broker.

Run: ``.venv/bin/python bench/agent_footprint.py [--json] [--quick]``

Set-up: a private Mosquitto (``broker.launcher.MosquittoBroker``, free port), a model published
retained by this script with the protocol functions (``device_agent.release``, exactly what the
aggregator publishes), and the agent started the way systemd starts it (``python -m
device_agent --config agent.toml``, wrapped only to answer SIGUSR1 with its list of loaded heavy
modules). Eligibility comes from a fake sysfs tree (``probes.root``), first on battery.

Measured, in order:

* ``import_seconds``: ``python -c "import device_agent.agent"`` minus a bare interpreter start
  (best of 3);
* ``idle_rss_mb``: VmRSS of the connected agent holding model v0, not eligible (on battery),
  after it settled; ``idle_heavy_modules``: which of torch, onnxruntime, onnx, sklearn, scipy,
  matplotlib, pandas, cryptography are imported at that point (torch must not be);
* ``idle_cpu_percent``: the agent's CPU time (utime + stime from ``/proc/<pid>/stat``) over a
  wall-clock window while idle (one probe round per second), in percent of one core;
* ``model_pickup_seconds``: from publishing v1 (chunks + manifest, retained) to the agent's
  retained state reporting ``model_version = 1`` (fetched, hashed, written, swapped);
* ``seconds_to_first_update``: from flipping the fake tree to mains to the first update of the
  mnist1d CNN (4,298 parameters; 800 local examples, 1 epoch, batch 32) arriving at a subscriber;
  includes up to one probe interval (1 s), the torch import and the training;
* ``training_rss_mb``: the agent's peak RSS (VmHWM) by then (``--isolation process``: the
  sampled peak of the agent plus its training child); ``after_training_rss_mb``: VmRSS after
  it (with ``thread`` torch stays loaded in the agent; with ``process`` it left with the child).

Target (issue #4): idle RSS <= 80 MB with no torch loaded. With ``--json`` the last line of
stdout is one JSON object with the keys above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker.launcher import MosquittoBroker  # noqa: E402
from device_agent.release import model_release  # noqa: E402
from edgefl.models.spec import ModelSpec, get_model_spec, init_weights_numpy  # noqa: E402
from edgefl.protocol.messages import DeviceState, decode_message  # noqa: E402
from edgefl.protocol.topics import device_state_topic, updates_filter  # noqa: E402
from edgefl.transport import MqttConfig, MqttTransport  # noqa: E402
from firmware_sim.fake_sysfs import write_fake_sysfs  # noqa: E402

FLEET, DEVICE, MODEL = "bench", "pi-bench", "mnist1d-cnn"
HEAVY = ("torch", "onnxruntime", "onnx", "sklearn", "scipy", "matplotlib", "pandas", "cryptography")

BOOT = """
import json, signal, sys
def dump(*_):
    heavy = [m for m in {heavy!r} if m in sys.modules]
    with open({out!r}, "w") as fh:
        json.dump({{"heavy": heavy, "modules": len(sys.modules)}}, fh)
signal.signal(signal.SIGUSR1, dump)
from device_agent.cli import agent_app
from firmware_sim.fake_sysfs import write_fake_sysfs
agent_app(["--config", {config!r}], prog_name="edgefl agent")
"""


def proc_status(pid: int, key: str) -> float:
    """A ``kB`` field of ``/proc/<pid>/status`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(key)


_peaks: dict[int, float] = {}


def training_peak_mb(pid: int) -> float:
    """Peak RSS of the agent plus its training child, sampled while training (``process``)."""
    return _peaks.get(pid, 0.0)


def tree_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` plus its direct children (started by any of its threads)."""
    total = proc_status(pid, "VmRSS")
    children: set[str] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children.update((task / "children").read_text().split())
    for child in children:
        with contextlib.suppress(OSError, KeyError):
            total += proc_status(int(child), "VmRSS")
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def import_seconds() -> float:
    def best(code: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
            times.append(time.perf_counter() - t0)
        return min(times)

    return max(0.0, best("import device_agent.agent") - best("import sys"))


def write_setup(tmp: Path, url: str, isolation: str) -> Path:
    from edgefl.data import load_dataset

    data = load_dataset("mnist1d", num_samples=2000, seed=0)
    np.savez(tmp / "train.npz", x=data.x_train[:1000], y=data.y_train[:1000])
    write_fake_sysfs(tmp / "fs", mains=False)
    config = tmp / "agent.toml"
    config.write_text(
        f'fleet = "{FLEET}"\ndevice_id = "{DEVICE}"\nstate_dir = "state"\nlog_level = "WARNING"\n'
        f'[broker]\nurl = "{url}"\n[data]\nkind = "npz"\npath = "train.npz"\n'
        "[training]\nmax_epochs = 1\nbatch_size = 32\nholdout_fraction = 0.2\n"
        f'isolation = "{isolation}"\n'
        '[probes]\nroot = "fs"\ninterval_s = 1.0\nmetered = "no"\nthrottle = false\n'
    )
    return config


class _AgentRun:
    """One agent process under measurement, and the subscriber that watches its traffic."""

    def __init__(self, mq: MqttTransport, proc: subprocess.Popen[bytes], tmp: Path) -> None:
        self.mq, self.proc, self.pid, self.tmp = mq, proc, proc.pid, tmp
        self.states: list[DeviceState] = []
        self.arrivals: list[float] = []

    async def pump(self) -> None:
        """Record the agent's retained states and the arrival time of each update packet."""
        async for message in self.mq.messages():
            if "/update/" in message.topic:
                self.arrivals.append(time.monotonic())
            elif message.payload:
                self.states.append(decode_message(message.payload, DeviceState))

    async def until(self, predicate: Callable[[], bool], within: float) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the agent did not get there in time")
            await asyncio.sleep(0.01)

    def holds(self, version: int) -> bool:
        return bool(self.states) and self.states[-1].model_version == version

    async def idle(self, quick: bool, modules_file: Path) -> dict[str, object]:
        """Idle RSS, loaded heavy modules and CPU of the agent holding v0 on battery."""
        results: dict[str, object] = {}
        await self.until(lambda: self.holds(0), 30)
        await asyncio.sleep(2.0 if quick else 5.0)  # settle
        results["idle_rss_mb"] = round(proc_status(self.pid, "VmRSS"), 1)
        self.proc.send_signal(signal.SIGUSR1)
        await self.until(modules_file.exists, 5)
        await asyncio.sleep(0.1)
        dumped = json.loads(await asyncio.to_thread(modules_file.read_text))
        results["idle_heavy_modules"] = dumped["heavy"]
        results["idle_modules"] = dumped["modules"]
        window = 5.0 if quick else 15.0
        c0, t0 = cpu_seconds(self.pid), time.monotonic()
        await asyncio.sleep(window)
        results["idle_cpu_percent"] = round(
            100 * (cpu_seconds(self.pid) - c0) / (time.monotonic() - t0), 2
        )
        return results

    async def model_pickup(self, spec: ModelSpec) -> float:
        """Seconds from publishing v1 to the agent's state reporting it."""
        t_pub = time.monotonic()
        await publish_release(self.mq, 1, init_weights_numpy(spec, 1))
        await self.until(lambda: self.holds(1), 30)
        return round(time.monotonic() - t_pub, 3)

    async def training(self, isolation: str) -> dict[str, object]:
        """Flip to mains; time to the first update, peak and after-training RSS, exit code."""
        results: dict[str, object] = {}
        t_flip = time.monotonic()
        write_fake_sysfs(self.tmp / "fs", mains=True)
        sampler = asyncio.create_task(self._sample_peak())
        await self.until(lambda: bool(self.arrivals), 120)
        sampler.cancel()
        results["seconds_to_first_update"] = round(self.arrivals[0] - t_flip, 2)
        peak = (
            training_peak_mb(self.pid) if isolation == "process" else proc_status(self.pid, "VmHWM")
        )
        results["training_rss_mb"] = round(peak, 1)
        await asyncio.sleep(1.0)
        results["after_training_rss_mb"] = round(proc_status(self.pid, "VmRSS"), 1)
        self.proc.send_signal(signal.SIGTERM)
        results["exit_code"] = await asyncio.to_thread(self.proc.wait, 30)
        return results

    async def _sample_peak(self) -> None:
        while True:
            with contextlib.suppress(OSError, KeyError):
                _peaks[self.pid] = max(_peaks.get(self.pid, 0.0), tree_rss_mb(self.pid))
            await asyncio.sleep(0.05)


async def publish_release(mq: MqttTransport, version: int, weights: NDArray[np.float32]) -> None:
    """Publish model ``version`` (chunks + manifest, retained) as the aggregator would."""
    for topic, payload in model_release(FLEET, version, MODEL, weights).messages:
        await mq.publish(topic, payload, retain=True)


def start_agent(tmp: Path, config: Path, modules_file: Path) -> subprocess.Popen[bytes]:
    """The agent as systemd starts it, wrapped to dump its heavy modules on SIGUSR1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
    env.pop("NOTIFY_SOCKET", None)
    boot = BOOT.format(heavy=HEAVY, out=str(modules_file), config=str(config))
    return subprocess.Popen(
        [sys.executable, "-c", boot], cwd=tmp, env=env, stdin=subprocess.DEVNULL
    )


async def measure(quick: bool, isolation: str) -> dict[str, object]:
    results: dict[str, object] = {
        "isolation": isolation,
        "import_seconds": round(import_seconds(), 3),
    }
    spec = get_model_spec(MODEL)
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoBroker(state_dir=tmp / "mosquitto")
        broker.start()
        config = write_setup(tmp, broker.url, isolation)
        modules_file = tmp / "modules.json"
        proc: subprocess.Popen[bytes] | None = None
        try:
            async with MqttTransport(MqttConfig.from_url(broker.url, client_id="bench")) as mq:
                await publish_release(mq, 0, init_weights_numpy(spec, 0))
                await mq.subscribe(device_state_topic(FLEET, DEVICE))
                await mq.subscribe(updates_filter(FLEET))
                # Popen returns at once; the process is then only signalled and polled
                proc = start_agent(tmp, config, modules_file)
                run = _AgentRun(mq, proc, tmp)
                pump_task = asyncio.create_task(run.pump())
                results.update(await run.idle(quick, modules_file))
                results["model_pickup_seconds"] = await run.model_pickup(spec)
                results.update(await run.training(isolation))
                pump_task.cancel()
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            broker.stop()
    results["idle_rss_target_met"] = bool(
        isinstance(results.get("idle_rss_mb"), float)
        and float(results["idle_rss_mb"]) <= 80.0  # type: ignore[arg-type]
        and "torch" not in results.get("idle_heavy_modules", [])  # type: ignore[operator]
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--quick", action="store_true", help="shorter settle and CPU windows")
    parser.add_argument(
        "--isolation",
        choices=("thread", "process"),
        default="thread",
        help="training.isolation of the agent (process: training in a child process)",
    )
    args = parser.parse_args()
    results = asyncio.run(measure(args.quick, args.isolation))
    for key, value in results.items():
        print(f"{key:>26}: {value}")
    if args.json:
        print(json.dumps(results, sort_keys=True))
    return 0 if results.get("idle_rss_target_met") else 1


if __name__ == "__main__":
    raise SystemExit(main())
