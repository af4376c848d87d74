"""Participation leases end to end: devices loop check-in -> lease -> update against a real
Mosquitto and an in-process aggregator, and the run reports what leasing costs and holds.

    python bench/leases.py --devices 50 --concurrency 10 --updates 400

Reported (JSON): applied updates per second; the lease round trip (check-in published ->
LEASE received) p50/p95; the most leases held at once as sampled every 50 ms (must be <= C);
broker messages per applied update (check-ins + leases + update packets + receipts); the
staleness histogram against C / K. The devices do not train (the update is sent as soon as the
lease arrives), so the figures are the protocol's overhead, not a fleet's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker.launcher import MosquittoBroker
from edgefl.aggregator import Aggregator, AggregatorConfig, NormBoundSetting
from edgefl.aggregator.updates import build_update_packets
from edgefl.codec import CodecConfig
from edgefl.participation import ParticipationConfig
from edgefl.protocol import decode_message, encode_message
from edgefl.protocol.messages import CheckIn, Lease
from edgefl.protocol.topics import checkin_topic, lease_topic
from edgefl.transport import MqttConfig, MqttTransport

FLEET, MODEL, NUM_PARAMS = "bench", "digits-mlp", 2410


class _Counts:
    def __init__(self) -> None:
        self.checkins = 0
        self.leases = 0
        self.updates = 0
        self.round_trips: list[float] = []


async def _device(url: str, index: int, stop: asyncio.Event, counts: _Counts, agg: Any) -> None:
    name = f"d{index:04d}"
    config = MqttConfig.from_url(url, client_id=f"bench-{name}")
    rng = np.random.default_rng(index)
    async with MqttTransport(config) as transport:
        await transport.subscribe(lease_topic(FLEET, name), qos=1)
        messages = transport.messages()
        seq = 0
        while not stop.is_set():
            sent = time.perf_counter()
            msg = CheckIn(fleet=FLEET, device_id=name, at=time.time())
            await transport.publish(checkin_topic(FLEET, name), encode_message(msg), qos=1)
            counts.checkins += 1
            lease = decode_message((await anext(messages)).payload, Lease)
            counts.leases += 1
            counts.round_trips.append(time.perf_counter() - sent)
            seq += 1
            delta = (rng.standard_normal(NUM_PARAMS) * 0.01).astype(np.float32)
            topic, packets = build_update_packets(
                fleet=FLEET, model=MODEL, device=name, seq=seq,
                base_version=agg.statistics().version, delta=delta, codec=CodecConfig(),
                lease_id=lease.lease_id,
            )  # fmt: skip
            for packet in packets:
                await transport.publish(topic, packet, qos=1)
                counts.updates += 1


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with MosquittoBroker(state_dir=tmp / "mosquitto") as broker:
        config = AggregatorConfig.build(
            broker_url=broker.url, fleet=FLEET, model=MODEL, state_dir=tmp / "state",
            buffer_size=args.buffer_size, norm_bound=NormBoundSetting.OFF,
            max_staleness=100_000, fsync=False,
            participation=ParticipationConfig(concurrency=args.concurrency, lease_s=60.0),
        )  # fmt: skip
        agg = Aggregator(config)
        ready = asyncio.Event()
        task = asyncio.create_task(agg.run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        counts, stop = _Counts(), asyncio.Event()
        devices = [
            asyncio.create_task(_device(broker.url, i, stop, counts, agg))
            for i in range(args.devices)
        ]
        held, start = 0, time.perf_counter()
        while agg.statistics().applied < args.updates:
            p = agg.statistics().participation
            held = max(held, 0 if p is None else p.in_flight)
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - start
        s = agg.statistics()
        stop.set()
        for d in devices:
            d.cancel()
        await asyncio.gather(*devices, return_exceptions=True)
        agg.stop()
        await task
    trips = sorted(counts.round_trips)
    messages = counts.checkins + counts.leases + counts.updates + s.receipts.sent
    tau = s.staleness
    return {
        "devices": args.devices,
        "concurrency": args.concurrency,
        "buffer_size": args.buffer_size,
        "applied": s.applied,
        "applied_per_s": round(s.applied / elapsed, 1),
        "lease_round_trip_ms": {
            "p50": round(1000 * statistics.median(trips), 2),
            "p95": round(1000 * trips[int(0.95 * (len(trips) - 1))], 2),
        },
        "max_leases_held": held,
        "messages_per_applied_update": round(messages / max(1, s.applied), 2),
        "staleness_mean": round(sum(t * n for t, n in tau.items()) / max(1, sum(tau.values())), 2),
        "staleness_reference": args.concurrency / args.buffer_size,
        "rejected": dict(s.rejected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--updates", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefl-leases-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp))), indent=2))


if __name__ == "__main__":
    main()
