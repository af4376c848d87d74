"""Ingest through the sharded tree with 1 and 2 shard processes (issue 21), on one Mosquitto.

A root (``python -m edgefl.sharding.service root``) and S shard processes (S = 1: one process
owns both partitions; S = 2: one partition each) ingest the same ``--updates`` pre-encoded
UPDATE envelopes (a ``--params`` int8 model, default 100k: about 90 kB each) published QoS 1 by
this process as fast as the broker takes them. The rate is updates / seconds from the first
publish to the root's step at K = all updates (every update applied exactly once). CPU seconds
per update of the shards, the root, Mosquitto and the publisher come from ``/proc``.

    python bench/scaleout.py --updates 1000 --json

The last line with ``--json`` holds ``updates_per_s_1_shard`` and ``updates_per_s_2_shards``
and, per run, the CPU split that bounds it: on 2 cores shared by broker, root, shards and the
publisher, two shards cannot double one shard's rate when the others already use a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from broker.launcher import MosquittoBroker  # noqa: E402
from edgefl.aggregator.updates import build_update_envelope  # noqa: E402
from edgefl.protocol.topics import ShardsLeaf, shards_topic, update_topic  # noqa: E402
from edgefl.sharding.partitions import partition_of  # noqa: E402

FLEET, PARTITIONS = "bench", 2


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_updates(n: int, params: int) -> list[tuple[str, bytes]]:
    """``n`` int8 UPDATE envelopes from 200 devices, on their partition topics."""
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.01, params).astype(np.float32)
    out = []
    for i in range(n):
        device = f"dev{i % 200}"
        envelope = build_update_envelope(
            fleet=FLEET,
            model="m",
            device=device,
            seq=i,
            base_version=0,
            delta=delta,
            num_examples=10,
            rng=rng,
            created_at=1.0,
        )
        topic = update_topic(FLEET, device, i, partition=partition_of(device, PARTITIONS))
        out.append((topic, envelope))
    return out


class Status:
    """The root's retained status, followed by a paho client."""

    def __init__(self, port: int) -> None:
        self.latest: dict[str, Any] = {}
        self.changed = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-status")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(shards_topic(FLEET, ShardsLeaf.ROOT_STATUS), qos=1)
        self.client.loop_start()

    def _on_message(self, *args: Any) -> None:
        with self.changed:
            self.latest = json.loads(args[-1].payload)
            self.changed.notify_all()

    def wait(self, predicate: Any, timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.latest), timeout):
                raise RuntimeError(f"root status never got there: {self.latest}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _spawn(url: str, n: int, params: int, state: Path, *args: str) -> subprocess.Popen[bytes]:
    common = ["--broker", url, "--fleet", FLEET, "--partitions", str(PARTITIONS)]
    common += ["--params", str(params), "--k", str(n), "--flush-every", "50"]
    common += ["--flush-after", "0.05"]  # the last, short partials wait at most 50 ms
    log = (state / f"{args[0]}-{os.urandom(3).hex()}.log").open("ab")
    cmd = [sys.executable, "-m", "edgefl.sharding.service", *args, *common]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)


def run(shards: int, updates: list[tuple[str, bytes]], params: int) -> dict[str, float]:
    """One run with ``shards`` shard processes on a fresh Mosquitto."""
    n = len(updates)
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(state_dir=Path(tmp)) as mosq:
        state = Path(tmp)
        status = Status(mosq.port)
        procs = [_spawn(mosq.url, n, params, state, "root", "--state", str(state / "root"))]
        try:
            status.wait(lambda s: "version" in s, 60)
            owns = ["0,1"] if shards == 1 else ["0", "1"]
            for i, own in enumerate(owns):
                procs.append(_spawn(mosq.url, n, params, state, "shard", "--shard", f"s{i}",
                                    "--own", own))  # fmt: skip
            status.wait(lambda s: len(s.get("epochs", {})) == PARTITIONS, 60)
            assert mosq.pid is not None
            pids = {"root": [procs[0].pid], "shards": [p.pid for p in procs[1:]]}
            pids["broker"], pids["publisher"] = [mosq.pid], [os.getpid()]
            before = {k: sum(_cpu(p) for p in v) for k, v in pids.items()}
            elapsed = _publish_and_wait(mosq.port, updates, status)
            after = {k: sum(_cpu(p) for p in v) for k, v in pids.items()}
        finally:
            status.close()
            for proc in procs:
                proc.kill()
                proc.wait()
    result = {"updates_per_s": n / elapsed, "seconds": elapsed}
    for k in pids:
        result[f"cpu_ms_per_update_{k}"] = (after[k] - before[k]) / n * 1e3
    return result


def _publish_and_wait(port: int, updates: list[tuple[str, bytes]], status: Status) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-devices")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.perf_counter()
    for topic, payload in updates:
        client.publish(topic, payload, qos=1)
    status.wait(lambda s: s.get("version") == 1, 600)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return elapsed


def ratio_bound(run: dict[str, float], cores: int | None = None) -> float:
    """The best 2-shard / 1-shard ratio this CPU split allows on ``cores`` idle cores: one shard
    is bound by its own core (``1 / shard``), two by theirs (``2 / shard``) or by all the work
    of an update on all cores (``cores / total``)."""
    cores = cores or os.cpu_count() or 1
    shard = run["cpu_ms_per_update_shards"]
    total = sum(v for k, v in run.items() if k.startswith("cpu_ms_per_update_"))
    return min(2 / shard, cores / total) / min(1 / shard, cores / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    updates = make_updates(args.updates, args.params)
    one, two = run(1, updates, args.params), run(2, updates, args.params)
    summary = {
        "ratio_bound_on_this_machine": round(ratio_bound(two), 2),
        "updates_per_s_1_shard": round(one["updates_per_s"], 1),
        "updates_per_s_2_shards": round(two["updates_per_s"], 1),
        "ratio": round(two["updates_per_s"] / one["updates_per_s"], 2),
        "run_1_shard": one,
        "run_2_shards": two,
        "load_average_1m": os.getloadavg()[0],
        "cores": os.cpu_count(),
    }
    if not args.json:
        for key, value in summary.items():
            print(key, value)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
