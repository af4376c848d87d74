"""Relay rate of a broker: QoS 1 messages of one size from a publisher to a subscriber.

Brokers: ``mosquitto`` (one node), ``nats1`` (one NATS node, MQTT on JetStream), ``nats3``
(the 3-node NATS cluster of ``tests/cluster.py``, publisher on node 0, subscriber on node 2,
so every message crosses a cluster route; its ``$MQTT_*`` streams have 3 replicas) and
``nats3r1`` (the same cluster with one replica: faster, but a node's death loses what it
stored). One paho publisher keeps up to 64 QoS 1 messages unacknowledged; one paho subscriber
(QoS 1, PUBACK on arrival) counts arrivals. The rate is messages received / seconds from the
first publish to the last arrival. Also reports the broker processes' CPU per message (from
``/proc/<pid>/stat``, 10 ms ticks: coarse for Mosquitto's short runs).

    python bench/cluster_relay.py --messages 400 --size 92000 --json

Everything runs on this machine, so the publisher, subscriber and nodes share its cores: on 2
cores the cluster's figure is a lower bound of what three hosts give.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from cluster import NatsCluster  # noqa: E402

from broker.launcher import MosquittoBroker  # noqa: E402

TOPIC = "edgefl/v1/bench/device/d1/update/1"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client(host: str, port: int, name: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
    client.max_inflight_messages_set(64)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    return client


def relay(pub: tuple[str, int], sub: tuple[str, int], messages: int, size: int) -> float:
    """Messages per second from ``pub`` to ``sub`` (QoS 1 both ways)."""
    done = threading.Event()
    subscribed = threading.Event()
    received = 0

    def on_message(*_: object) -> None:
        nonlocal received
        received += 1
        if received >= messages:
            done.set()

    subscriber = _client(*sub, "bench-sub")
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *_: subscribed.set()
    subscriber.subscribe(TOPIC, qos=1)
    if not subscribed.wait(30):
        raise RuntimeError("no SUBACK")
    publisher = _client(*pub, "bench-pub")
    payload = os.urandom(size)
    start = time.perf_counter()
    infos = [publisher.publish(TOPIC, payload, qos=1) for _ in range(messages)]
    if not done.wait(300):
        raise RuntimeError(f"only {received} of {messages} arrived")
    elapsed = time.perf_counter() - start
    for info in infos:
        info.wait_for_publish(30)
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()
    return messages / elapsed


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    return host, int(port)


def run(broker: str, messages: int, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        if broker == "mosquitto":
            with MosquittoBroker(state_dir=Path(tmp)) as mosq:
                assert mosq.pid is not None
                pids = [mosq.pid]
                ends = (_host_port(mosq.url),) * 2
                return _measure(pids, ends, messages, size)
        nodes = 1 if broker == "nats1" else 3
        replicas = 1 if broker == "nats3r1" else None
        with NatsCluster(Path(tmp), size=nodes, replicas=replicas) as cluster:
            pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
            ends = (_host_port(cluster.urls[0]), _host_port(cluster.urls[-1]))
            return _measure(pids, ends, messages, size)


def _measure(
    pids: list[int], ends: tuple[tuple[str, int], ...], messages: int, size: int
) -> dict[str, float]:
    cpu0 = sum(_cpu_seconds(p) for p in pids)
    rate = relay(ends[0], ends[1], messages, size)
    cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
    return {"messages_per_s": round(rate, 1), "broker_cpu_ms_per_message": cpu / messages * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--size", type=int, default=92_000, help="payload bytes (100k int8)")
    parser.add_argument("--brokers", default="mosquitto,nats1,nats3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {b: run(b, args.messages, args.size) for b in args.brokers.split(",")}
    if args.json:
        print(json.dumps({**results, "load_average_1m": os.getloadavg()[0]}))
    else:
        for name, value in results.items():
            print(name, value)


if __name__ == "__main__":
    main()
