"""A clustered MQTT broker for tests: NATS Server's MQTT gateway on JetStream, N nodes.

``NatsCluster(base_dir, size=3)`` writes one config per node (own ``server_name``, JetStream
store, cluster routes to every node, an MQTT listener, a monitoring port) and starts each node
as its own process. ``start()`` waits, bounded, until every node accepts MQTT connections and
reports JetStream healthy (``/healthz``), then makes one MQTT connection so the server creates
its ``$MQTT_*`` streams (replicas 3) before the test's clients arrive. ``close()`` always kills
every node; ``kill(i)`` is SIGKILL of one node (a crash: its clients see the TCP connection
reset), ``start_node(i)`` brings it back on the same ports and store.

Hosts: ``netns=True`` puts every node in a network namespace of its own (``ip netns`` + a veth
pair into a bridge in the test's namespace, addresses ``10.<a>.<b>.<10+i>/24``), so the nodes
are separate hosts that reach each other and the test only over the bridge. It needs root;
``netns_available()`` says whether this process can create namespaces. Without it the nodes
listen on free loopback ports.

Why NATS (not RabbitMQ 3.10): see docs/SCALING.md, "Choice of the clustered broker".
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import BrokerStartError, _accepts

NATS_BINARY_DIRS = "/usr/sbin:/usr/bin:/usr/local/bin:/usr/local/sbin"
ACK_WAIT = "3s"
"""JetStream redelivers an unacknowledged QoS 1 message after this long (NATS default 30 s)."""


_NODE_PORTS = (20000, 32000)
"""Loopback ports for the nodes: below Linux's default ephemeral range (32768-60999)."""


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_nats_server() -> str | None:
    """The ``nats-server`` binary (Debian package ``nats-server``), or None."""
    return shutil.which("nats-server") or shutil.which("nats-server", path=NATS_BINARY_DIRS)


def netns_available() -> bool:
    """True when this process may create network namespaces (root and ``ip`` present)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@dataclass
class _Hosts:
    """Network namespaces joined by a bridge: one per node, addresses ``prefix.(10+i)``."""

    tag: str
    prefix: str
    size: int
    created: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def namespace(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def address(self, i: int) -> str:
        return f"{self.prefix}.{10 + i}"

    def create(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.created.append("bridge")
        _run("ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.size):
            ns, outer = self.namespace(i), f"{self.tag}h{i}"
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", outer, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        for name in reversed(self.created):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if name == "bridge":
                    _run("ip", "link", "del", self.bridge)  # takes the veth ends with it
                else:
                    _run("ip", "netns", "del", name)
        self.created.clear()


def _free_prefix(tag_seed: int) -> str:
    """A ``10.a.b`` /24 not assigned to any interface of this namespace."""
    taken = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    for k in range(256):
        a, b = 200 + (tag_seed + k) % 50, (tag_seed // 50 + k) % 256
        if f" 10.{a}.{b}." not in taken:
            return f"10.{a}.{b}"
    raise BrokerStartError("no free 10.x.y.0/24 for the test hosts")


@dataclass
class NatsNode:
    """One node: its address, ports, files and process."""

    index: int
    host: str
    mqtt_port: int
    client_port: int
    cluster_port: int
    http_port: int
    state_dir: Path
    namespace: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "nats.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class NatsCluster:
    """``size`` NATS Server nodes clustered with JetStream and MQTT; see the module docstring."""

    def __init__(
        self, base_dir: Path, *, size: int = 3, netns: bool = False, replicas: int | None = None
    ) -> None:
        binary = find_nats_server()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (apt-get install nats-server)")
        self.binary = binary
        self.base_dir = base_dir
        self.replicas = replicas  # the $MQTT_* streams' replicas; None: min(size, 3)
        self._hosts: _Hosts | None = None
        if netns:
            seed = os.getpid() % 10000
            self._hosts = _Hosts(f"es{seed}", _free_prefix(seed), size)
        self._ports: set[int] = set()
        self.nodes = [self._plan(i) for i in range(size)]

    def _plan(self, i: int) -> NatsNode:
        state = self.base_dir / f"n{i}"
        if self._hosts is not None:  # a host of its own: fixed ports are free there
            host = self._hosts.address(i)
            return NatsNode(i, host, 1883, 4222, 6222, 8222, state, self._hosts.namespace(i))
        mqtt_port, client_port, cluster_port, http_port = (self._distinct_port() for _ in range(4))
        return NatsNode(i, "127.0.0.1", mqtt_port, client_port, cluster_port, http_port, state)

    def _distinct_port(self) -> int:
        """A free port none of this cluster's nodes was given, below the kernel's ephemeral
        range: a port from that range (what ``free_port`` hands out) may be taken as the source
        port of some outgoing connection while its node is down, and ``start_node`` then fails
        with "address already in use"."""
        rng = random.Random()
        while True:
            port = rng.randrange(*_NODE_PORTS)
            if port not in self._ports and _bindable(port):
                self._ports.add(port)
                return port

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def config(self, node: NatsNode) -> str:
        routes = ", ".join(f"nats-route://{n.host}:{n.cluster_port}" for n in self.nodes)
        cluster = (
            f"cluster {{ name: edgefl, listen: {node.host}:{node.cluster_port}, "
            f"routes: [{routes}] }}"
            if len(self.nodes) > 1
            else "# one node: no cluster (JetStream runs stand-alone)"
        )
        replicas = f", stream_replicas: {self.replicas}" if self.replicas else ""
        return "\n".join(
            [
                f"server_name: {node.name}",
                f"listen: {node.host}:{node.client_port}",
                f"http: {node.host}:{node.http_port}",
                "jetstream {",
                f'  store_dir: "{node.state_dir / "js"}"',
                "  max_memory_store: 64MB",
                "  max_file_store: 512MB",
                "}",
                cluster,
                f"mqtt {{ listen: {node.host}:{node.mqtt_port}, ack_wait: {ACK_WAIT}{replicas} }}",
                "",
            ]
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> list[str]:
        """Start every node and wait (at most ``timeout`` s) until the cluster serves MQTT."""
        try:
            if self._hosts is not None and not self._hosts.created:
                self._hosts.create()
            for node in self.nodes:
                self.start_node(node.index, wait=False)
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                self._wait_ready(node, deadline)
            self._create_mqtt_streams(deadline)
        except BaseException:
            self.close()
            raise
        return self.urls

    def start_node(self, i: int, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start node ``i`` (again) with its config, ports and JetStream store."""
        node = self.nodes[i]
        if node.running():
            return
        node.state_dir.mkdir(parents=True, exist_ok=True)
        conf = node.state_dir / "nats.conf"
        conf.write_text(self.config(node))
        cmd = [self.binary, "-c", str(conf), "-l", str(node.log_path)]
        if node.namespace is not None:
            cmd = ["ip", "netns", "exec", node.namespace, *cmd]  # execs: the pid is nats-server
        node.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait:
            self._wait_ready(node, time.monotonic() + timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: a crash, its clients' connections are reset."""
        proc = self.nodes[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        """Kill every node and remove the network namespaces (never raises)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.kill(node.index)
        if self._hosts is not None:
            self._hosts.destroy()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ readiness
    def _wait_ready(self, node: NatsNode, deadline: float) -> None:
        while not (_accepts(node.host, node.mqtt_port) and _healthy(node)):
            if not node.running():
                raise BrokerStartError(f"nats node {node.name} exited:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise BrokerStartError(f"nats node {node.name} not ready:\n{node.log_tail()}")
            time.sleep(0.1)

    def _create_mqtt_streams(self, deadline: float) -> None:
        """One MQTT connection: the first CONNECT creates the ``$MQTT_*`` streams (R3)."""
        node = self.nodes[0]
        while True:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgefl-cluster-warmup")
            try:
                client.connect(node.host, node.mqtt_port, keepalive=10)
                client.loop_start()
                try:
                    info = client.publish("edgefl/cluster/warmup", b"1", qos=1)
                    info.wait_for_publish(max(1.0, deadline - time.monotonic()))
                    if info.is_published():
                        return
                finally:
                    client.disconnect()
                    client.loop_stop()
            except (OSError, RuntimeError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BrokerStartError(f"MQTT never came up on {node.url}:\n{node.log_tail()}")
            time.sleep(0.2)


def running_cluster(directory: Path, *, netns: bool) -> Iterator[NatsCluster]:
    """A fixture's body: three NATS nodes under ``directory`` (on loopback ports, or each on a
    host of its own with ``netns``), closed after the test. Fails (never skips) when
    nats-server or network namespaces are missing."""
    import pytest  # here: bench/cluster_relay.py imports this module without pytest

    if find_nats_server() is None:
        pytest.fail("nats-server is not installed: apt-get install nats-server (Debian package)")
    if netns and not netns_available():
        pytest.fail("network namespaces need root and iproute2 (`ip netns`)")
    cluster = NatsCluster(directory, netns=netns)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


def _healthy(node: NatsNode) -> bool:
    """``/healthz`` answers 200 once the node's JetStream is current with the cluster."""
    try:
        url = f"http://{node.host}:{node.http_port}/healthz"
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False
