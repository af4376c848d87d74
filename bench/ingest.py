"""End-to-end ingest benchmark of the aggregator through Mosquitto, beside the raw broker ceiling.

Run: ``.venv/bin/python bench/ingest.py [--quick] [--json]``

For each model (``mlp-100k``: 99,823 parameters; ``mlp-1m``: 999,334) the benchmark

1. pre-encodes a few real int8 updates (``edgefl.codec.encode_update`` of Gaussian deltas) in
   the parent; publishers replay their bodies under distinct (device, seq) headers, so encoding
   is not what is measured;
2. **ceiling**: publisher processes (plain paho-mqtt, QoS 1, 1,000 in flight) send the very same
   update envelopes to a plain paho subscriber process (QoS 1, auto ack) through the same
   Mosquitto; updates/s from the first publish to the last message received. By default each
   publisher is one thread that writes its own socket (``--publisher direct``);
   ``--publisher threaded`` uses paho's ``loop_start()`` thread, which costs ~1.7x the CPU
   (0.35 vs 0.20 ms per 100k update) that the aggregator and broker then do not get;
   ``--publisher-nice N`` runs them at a lower priority in both runs;
3. **aggregator**: the same publishers and payloads into a running
   :class:`edgefl.aggregator.Aggregator` (its own process: persistent session, manual acks, full
   validation and bounded decode into the FedBuff accumulator, group commit to SQLite with
   ``synchronous=FULL``, then acks; new versions published as retained chunks); updates/s from
   the first publish until the aggregator acknowledged the last packet (which it does after
   the commit holding its update); its peak RSS (``VmHWM``).

Mosquitto runs with ``broker/conf/dev.conf`` on a free port, state in a temp dir. Everything
shares the machine's cores, so the ceiling and the aggregator see the same contention. Both
runs also report the CPU each part used per update (publishers, broker, subscriber or the
aggregator's threads, from ``/proc``) and the aggregator's page faults per update: on a
2-core machine the sum, not one process, is what bounds the rate.

**Receipts** (``--receipts both``, the default): the aggregator run is made twice on fresh
brokers, with receipts on (the default service: one retained QoS 1 receipt per device per
commit batch, published by its own task) and off, same publishers and payloads; the line shows
both rates and their ratio, and the receipts published and dropped. ``--receipts on|off`` runs
one of them. ``--rounds N`` repeats each setting N times, alternating which goes first, and
reports the median run of each. The ``updates_per_s_*`` keys are the receipts-on run when it
ran.

With ``--json`` the last line of stdout is one JSON object with ``updates_per_s_100k``,
``updates_per_s_1m``, ``ceiling_per_s_100k``, ``ceiling_per_s_1m``, ``fraction_of_ceiling_100k``,
``fraction_of_ceiling_1m``, ``mb_per_s_*``, ``peak_rss_mb_100k``, ``peak_rss_mb_1m`` and the
RSS budget ``rss_budget_mb_* = 4 x model + 150``; with ``--receipts both``,
``updates_per_s_receipts``, ``updates_per_s_no_receipts``, ``receipts_ratio`` and the
aggregator's event-loop CPU per update of both, ``event_loop_cpu_ms_(no_)receipts`` (of the
first model run; per model: ``..._100k``, ``..._1m``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FLEET = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DISTINCT = 4  # distinct pre-encoded bodies per model


@dataclass(frozen=True)
class Case:
    model: str
    updates: int
    buffer_size: int


def encode_bodies(model: str) -> tuple[dict[str, Any], list[bytes], int]:
    from edgefl.codec import CodecConfig, encode_update
    from edgefl.models import get_model_spec

    spec = get_model_spec(model)
    rng = np.random.default_rng(0)
    bodies, codec = [], {}
    for _ in range(DISTINCT):
        d = (rng.standard_normal(spec.num_params) * 0.01).astype(np.float32)
        encoded, _ = encode_update(d, CodecConfig(), rng=rng)
        bodies.append(encoded.body)
        codec = encoded.descriptor.to_dict()
    return codec, bodies, spec.num_params


def envelope(model: str, codec: dict[str, Any], body: bytes, n: int, dev: str, seq: int) -> bytes:
    from edgefl.protocol import UpdateHeader, encode_message

    header = UpdateHeader(
        fleet=FLEET, device_id=dev, seq=seq, base_version=0, num_examples=32, model=model,
        codec=codec, num_params=n, created_at=time.time(),
    )  # fmt: skip
    return encode_message(header, body)


# ---------------------------------------------------------------------------------------------
# processes


def publisher_proc(
    port: int, model: str, codec: dict[str, Any], bodies: list[bytes], n: int,
    index: int, count: int, built: Any, go: MpEvent, done: Any, mode: str, nice: int,
) -> None:  # fmt: skip
    if nice:
        os.nice(nice)
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefl.protocol import packetize, update_topic

    # build the payloads before the start signal: the header differs per (device, seq); updates
    # above 256 KiB are chunked exactly as devices do (UPDATE_CHUNK packets on the same topic)
    items = []
    for k in range(count):
        dev, seq = f"p{index}-d{k % 50}", k // 50 + 1
        whole = envelope(model, codec, bodies[k % len(bodies)], n, dev, seq)
        items += [(update_topic(FLEET, dev, seq), p) for p in packetize(whole)]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    if mode == "threaded":  # paho's network thread; publish() wakes it through a socketpair
        client.loop_start()
        built.put(index)
        go.wait()
        cpu0 = proc_cpu_s()
        for topic, payload in items:
            client.publish(topic, payload, qos=1)
        while acked < len(items):
            time.sleep(0.005)
        client.loop_stop()
    else:  # one thread: publish() writes to the socket itself, loop() reads the PUBACKs
        while not client.is_connected():
            client.loop(0.1)
        built.put(index)
        go.wait()
        cpu0 = proc_cpu_s()
        for i, (topic, payload) in enumerate(items):
            client.publish(topic, payload, qos=1)
            if i % 8 == 7:
                client.loop(timeout=0)
        while acked < len(items):
            client.loop(timeout=0.01)
    client.disconnect()
    done.put(proc_cpu_s() - cpu0)


def subscriber_proc(port: int, total: int, ready: Any, result: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received = 0
    nbytes = 0
    finished = time.time()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        nonlocal received, nbytes, finished
        received += 1
        nbytes += len(msg.payload)
        if received == total:
            finished = time.time()

    cpu0 = 0.0

    def on_subscribe(*_: Any) -> None:
        nonlocal cpu0
        cpu0 = proc_cpu_s()
        ready.put(True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub")
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port)
    client.subscribe(f"edgefl/v1/{FLEET}/device/+/update/+", qos=1)
    while received < total:
        client.loop(0.1)
    client.disconnect()
    result.put((finished, nbytes, proc_cpu_s() - cpu0))


def aggregator_proc(
    port: int, model: str, state_dir: str, total_packets: int, k: int, ready: Any, result: Any,
    tuning: dict[str, Any],
) -> None:  # fmt: skip
    import asyncio

    from edgefl.aggregator import Aggregator, AggregatorConfig, NormBoundSetting
    from edgefl.aggregator.memory import tune_process

    tune_process()  # as run_aggregator (the CLI) does: one BLAS thread, malloc thresholds

    config = AggregatorConfig.build(
        broker_url=f"mqtt://127.0.0.1:{port}", fleet=FLEET, model=model,
        state_dir=Path(state_dir), buffer_size=k, norm_bound=NormBoundSetting.ADAPTIVE_CLIP,
        metrics_interval_s=1.0, max_staleness=None, **tuning,
    )  # fmt: skip

    async def main() -> None:
        agg = Aggregator(config)
        up = asyncio.Event()
        task = asyncio.create_task(agg.run(up))
        await up.wait()
        rss_ready = vm_rss_mb()
        cpu0 = thread_cpu_s()
        faults0 = minor_faults()
        ready.put(True)
        # done when every packet is acknowledged: its update is committed (durable)
        while agg.statistics().commits.acked < total_packets:  # noqa: ASYNC110  (polling the counters)
            await asyncio.sleep(0.01)  # statistics() is not free: poll gently
        finished = time.time()
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in thread_cpu_s().items()}
        faults = minor_faults() - faults0
        s = agg.statistics()
        agg.stop()
        await task
        receipts = (agg.statistics().receipts.sent, agg.statistics().receipts.dropped)
        result.put(
            (finished, s.applied, dict(s.rejected), s.version, s.commits.batches, vm_hwm_mb(),
             rss_ready, cpu, faults, receipts)
        )  # fmt: skip

    asyncio.run(main())


def proc_cpu_s(pid: int | str = "self", task: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads) from /proc."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def minor_faults() -> int:
    """Minor page faults of this process so far (each costs ~0.5-1 us of kernel time)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds per live thread of this process, by thread-name prefix."""
    import threading

    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.native_id is None:
            continue
        name = t.name.rsplit("_", 1)[0] if t.name != "MainThread" else "event-loop"
        out[name] = out.get(name, 0.0) + proc_cpu_s(task=t.native_id)
    return out


def vm_hwm_mb(key: str = "VmHWM:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_rss_mb() -> float:
    return vm_hwm_mb("VmRSS:")


# ---------------------------------------------------------------------------------------------
# runs


@dataclass
class Publishers:
    start: float
    procs: list[Any]
    done: Any

    def join(self) -> float:
        """Wait for every publisher; their total CPU seconds while sending."""
        cpu = sum(self.done.get(timeout=300) for _ in self.procs)
        for p in self.procs:
            p.join(30)
        return float(cpu)


PUBLISHER_MODE = "direct"  # set from --publisher in main()
PUBLISHER_NICE = 0  # set from --publisher-nice in main()


def run_publishers(
    ctx: Any, port: int, case: Case, payload: tuple[dict[str, Any], list[bytes], int], n_pub: int
) -> Publishers:
    codec, bodies, n = payload
    go = ctx.Event()
    built, done = ctx.Queue(), ctx.Queue()
    per = case.updates // n_pub
    procs = [
        ctx.Process(
            target=publisher_proc,
            args=(
                port,
                case.model,
                codec,
                bodies,
                n,
                i,
                per,
                built,
                go,
                done,
                PUBLISHER_MODE,
                PUBLISHER_NICE,
            ),
        )
        for i in range(n_pub)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every publisher has built its payloads and connected: time only sending
        built.get(timeout=300)
    time.sleep(0.2)
    start = time.time()
    go.set()
    return Publishers(start, procs, done)


def packets_per_update(case: Case, payload: Any) -> int:
    from edgefl.protocol import packetize

    codec, bodies, n = payload
    return len(packetize(envelope(case.model, codec, bodies[0], n, "x", 1)))


def measure_ceiling(
    ctx: Any, port: int, case: Case, payload: Any, n_pub: int, broker_pid: int
) -> dict[str, Any]:

    ready, result = ctx.Queue(), ctx.Queue()
    total = (case.updates // n_pub) * n_pub
    per_update = packets_per_update(case, payload)
    sub = ctx.Process(target=subscriber_proc, args=(port, total * per_update, ready, result))
    sub.start()
    ready.get(timeout=30)
    broker0 = proc_cpu_s(broker_pid)
    pubs = run_publishers(ctx, port, case, payload, n_pub)
    finished, nbytes, sub_cpu = result.get(timeout=300)
    broker_cpu = proc_cpu_s(broker_pid) - broker0
    pub_cpu = pubs.join()
    sub.join(30)
    elapsed = finished - pubs.start
    cpu = {"subscriber": sub_cpu, "broker": broker_cpu, "publishers": pub_cpu}
    return {
        "per_s": total / elapsed,
        "mb_per_s": nbytes / elapsed / 1e6,
        "seconds": elapsed,
        "cpu_ms_per_update": {k: round(1000 * v / total, 3) for k, v in cpu.items()},
    }


def measure_aggregator(
    ctx: Any,
    port: int,
    case: Case,
    payload: Any,
    n_pub: int,
    tmp: Path,
    tuning: dict[str, Any],
    broker_pid: int,
    label: str = "",
) -> dict[str, Any]:
    ready, result = ctx.Queue(), ctx.Queue()
    total = (case.updates // n_pub) * n_pub
    state_dir = tmp / f"state-{case.model}{label}"
    agg = ctx.Process(
        target=aggregator_proc,
        args=(
            port,
            case.model,
            str(state_dir),
            total * packets_per_update(case, payload),
            case.buffer_size,
            ready,
            result,
            tuning,
        ),
    )
    agg.start()
    ready.get(timeout=60)
    broker0 = proc_cpu_s(broker_pid)
    pubs = run_publishers(ctx, port, case, payload, n_pub)
    finished, applied, rejected, version, batches, rss, rss_ready, cpu, faults, receipts = (
        result.get(timeout=600)
    )
    broker_cpu = proc_cpu_s(broker_pid) - broker0
    pub_cpu = pubs.join()
    agg.join(30)
    elapsed = finished - pubs.start
    cpu = {f"aggregator/{k}": v for k, v in cpu.items()}
    cpu |= {"broker": broker_cpu, "publishers": pub_cpu}
    size = total * (len(payload[1][0]) + 1000)
    return {
        "per_s": total / elapsed,
        "mb_per_s": size / elapsed / 1e6,
        "seconds": elapsed,
        "applied": applied,
        "rejected": rejected,
        "version": version,
        "batches": batches,
        "peak_rss_mb": rss,
        "ready_rss_mb": rss_ready,
        "cpu_ms_per_update": {k: round(1000 * v / total, 3) for k, v in cpu.items()},
        "page_faults_per_update": round(faults / total, 1),
        "receipts_sent": receipts[0],
        "receipts_dropped": receipts[1],
    }


def median_run(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one of an even count)."""
    return sorted(found, key=lambda run: run["per_s"])[(len(found) - 1) // 2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates (CI smoke run)")
    parser.add_argument("--json", action="store_true", help="print a JSON line at the end")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument(
        "--inflight-mib", type=int, default=None, help="aggregator max_inflight_bytes (MiB)"
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="SQLite synchronous=NORMAL (crash-safe, not power-loss-safe)",
    )
    parser.add_argument("--only", choices=["100k", "1m"], default=None, help="run one case")
    parser.add_argument(
        "--publisher",
        choices=["direct", "threaded"],
        default="direct",
        help="paho publisher: one thread writing its own socket (default, the least CPU taken "
        "from the aggregator and broker on a shared machine) or paho's loop_start() thread",
    )
    parser.add_argument(
        "--publisher-nice",
        type=int,
        default=0,
        help="run the publishers at this nice level (both runs): devices are other machines, "
        "so their CPU should not be taken from the broker and the consumer",
    )
    parser.add_argument(
        "--receipts",
        choices=["both", "on", "off"],
        default="both",
        help="run the aggregator with receipts on and off (both, side by side), or one",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="aggregator runs per receipts setting, alternating which goes first; the median "
        "run is reported (the host's noise is larger than the receipts' cost)",
    )
    return parser


def _bench_case(
    key: str, case: Case, args: argparse.Namespace, ctx: Any, tmp: Path,
    tuning: dict[str, Any], out: dict[str, Any],
) -> None:  # fmt: skip
    """One model: the raw broker ceiling, then the aggregator (receipts on / off), printed
    side by side; adds the figures to ``out``."""
    from broker.launcher import MosquittoBroker

    payload = encode_bodies(case.model)
    model_mb = payload[2] * 4 / 1e6
    with MosquittoBroker(state_dir=tmp / f"mosquitto-{key}") as broker:
        assert broker.pid is not None
        ceiling = measure_ceiling(ctx, broker.port, case, payload, args.publishers, broker.pid)
    samples: dict[bool, list[dict[str, Any]]] = {}
    order = {"both": [True, False], "on": [True], "off": [False]}[args.receipts]
    for r in range(args.rounds):
        for receipts in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            label = f"-{'receipts' if receipts else 'no-receipts'}-{r}"
            with MosquittoBroker(state_dir=tmp / f"mosquitto-agg-{key}{label}") as broker:
                assert broker.pid is not None
                samples.setdefault(receipts, []).append(
                    measure_aggregator(
                        ctx, broker.port, case, payload, args.publishers, tmp,
                        {**tuning, "receipts": receipts}, broker.pid, label,
                    )
                )  # fmt: skip
    runs = {on: median_run(found) for on, found in samples.items()}
    agg = runs.get(True) or runs[False]
    _report_receipts(key, case, samples, runs, args.rounds, out)
    fraction = agg["per_s"] / ceiling["per_s"]
    budget = 4 * model_mb + 150
    kb = len(payload[1][0]) / 1e3
    print(
        f"{case.model:9s} {case.updates:5d} int8 updates of {kb:.0f} kB"
        f" (K={case.buffer_size}): aggregator {agg['per_s']:7.0f} upd/s "
        f"{agg['mb_per_s']:6.1f} MB/s | ceiling {ceiling['per_s']:7.0f} upd/s "
        f"{ceiling['mb_per_s']:6.1f} MB/s | {100 * fraction:5.1f}% of ceiling | "
        f"peak RSS {agg['peak_rss_mb']:.0f} MB (idle {agg['ready_rss_mb']:.0f}, "
        f"budget {budget:.0f}, model {model_mb:.1f} MB) | applied {agg['applied']} in "
        f"{agg['batches']} commits, version {agg['version']}, "
        f"rejected {agg['rejected'] or 0}",
        flush=True,
    )
    for name, run in (("ceiling", ceiling), ("aggregator", agg)):
        shares = ", ".join(f"{k} {v:.3f}" for k, v in run["cpu_ms_per_update"].items())
        print(f"    CPU ms per update, {name} run: {shares}", flush=True)
    print(f"    aggregator page faults per update: {agg['page_faults_per_update']}")
    print(f"    receipts: {'on' if True in runs else 'off'} in the figures above")
    out |= {
        f"cpu_ms_per_update_{key}": agg["cpu_ms_per_update"],
        f"page_faults_per_update_{key}": agg["page_faults_per_update"],
        f"ceiling_cpu_ms_per_update_{key}": ceiling["cpu_ms_per_update"],
        f"updates_per_s_{key}": round(agg["per_s"], 1),
        f"ceiling_per_s_{key}": round(ceiling["per_s"], 1),
        f"fraction_of_ceiling_{key}": round(fraction, 3),
        f"mb_per_s_{key}": round(agg["mb_per_s"], 1),
        f"ceiling_mb_per_s_{key}": round(ceiling["mb_per_s"], 1),
        f"peak_rss_mb_{key}": round(agg["peak_rss_mb"], 1),
        f"rss_budget_mb_{key}": round(budget, 1),
        f"idle_rss_mb_{key}": round(agg["ready_rss_mb"], 1),
        f"seconds_{key}": round(agg["seconds"], 2),
        f"applied_{key}": agg["applied"],
    }


def _report_receipts(
    key: str, case: Case, samples: dict[bool, list[dict[str, Any]]],
    runs: dict[bool, dict[str, Any]], rounds: int, out: dict[str, Any],
) -> None:  # fmt: skip
    """Receipts on against off, side by side (when both ran); adds the figures to ``out``."""
    if rounds > 1:
        for on, found in samples.items():
            rates = ", ".join(f"{run['per_s']:.0f}" for run in found)
            print(f"    receipts {'on' if on else 'off'}: {rates} upd/s", flush=True)
    if len(runs) == 2:
        on, off = runs[True], runs[False]
        ratio = on["per_s"] / off["per_s"]
        loop_on = on["cpu_ms_per_update"].get("aggregator/event-loop", float("nan"))
        loop_off = off["cpu_ms_per_update"].get("aggregator/event-loop", float("nan"))
        print(
            f"{case.model:9s} receipts on {on['per_s']:7.0f} upd/s "
            f"({on['receipts_sent']} receipts sent, {on['receipts_dropped']} dropped) | "
            f"off {off['per_s']:7.0f} upd/s | on/off {ratio:.3f} | event-loop CPU ms "
            f"per update on {loop_on:.3f}, off {loop_off:.3f}",
            flush=True,
        )
        figures = {
            "event_loop_cpu_ms_receipts": loop_on,
            "event_loop_cpu_ms_no_receipts": loop_off,
            "updates_per_s_receipts": round(on["per_s"], 1),
            "updates_per_s_no_receipts": round(off["per_s"], 1),
            "receipts_ratio": round(ratio, 3),
            "receipts_sent": on["receipts_sent"],
            "receipts_dropped": on["receipts_dropped"],
        }
        for name, value in figures.items():
            out.setdefault(name, value)  # the first model run
            out[f"{name}_{key}"] = value


def main() -> None:
    args = _parser().parse_args()
    global PUBLISHER_MODE, PUBLISHER_NICE
    PUBLISHER_MODE = args.publisher
    PUBLISHER_NICE = args.publisher_nice
    tuning: dict[str, Any] = {}
    if args.inflight_mib is not None:
        tuning["max_inflight_bytes"] = args.inflight_mib * 1024 * 1024
    if args.no_fsync:
        tuning["fsync"] = False

    scale = 0.25 if args.quick else 1.0
    cases = {
        "100k": Case("mlp-100k", int(6000 * scale), 50),
        "1m": Case("mlp-1m", int(800 * scale), 20),
    }
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {
        "quick": args.quick,
        "publishers": args.publishers,
        "publisher_mode": args.publisher,
        "publisher_nice": args.publisher_nice,
        **tuning,
    }
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for key, case in cases.items():
            if args.only is not None and key != args.only:
                continue
            _bench_case(key, case, args, ctx, tmp, tuning, out)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
