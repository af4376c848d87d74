"""The whole edgefl runtime on the 3-node NATS cluster, and a node's death under it.

The real aggregator (FedBuff, K = 3, receipts, leases) is connected to node C; three real device
agents to nodes A and B (``pi-1`` and ``pi-2`` on ``"A,B"``, ``pi-3`` on ``"B,A"``);
``edgefl monitor --once --json`` (a separate process) reads the fleet through node C. So
every model chunk, update, receipt, lease and presence message crosses the cluster. Each node is
a host (network namespace) of its own (the same cluster on loopback ports is what
test_cluster_broker.py and test_sharded_fedbuff.py run on; one variant here keeps the suite
within its time budget).

1. Models are delivered, updates applied (two steps), and the monitor sees every device and the
   aggregator.
2. Node A is SIGKILLed: ``pi-1`` and ``pi-2`` fail over to B (their URL list): each connects
   again while A is down, so to B. Node A is then restarted at once: while a node of three is
   down NATS 2.9 refuses many new QoS 1 subscriptions (docs/SCALING.md), and an agent subscribes
   anew on every connection and every model version, so training with A down is a retry loop of
   the broker's making (40-150 s here), not a test of edgefl.
3. ``pi-1`` and ``pi-2`` train and deliver again, the fleet makes two more steps, and the monitor
   sees every device. Settled (devices unplugged, every spool empty): every update a device was
   told was committed (receipt) was applied exactly once, and nothing the aggregator applied is
   missing from the receipts: ``applied == sum(receipted)``, any update in flight when A died
   included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fleet_parts
import pytest
from cluster import NatsCluster, running_cluster
from test_monitor_fleet import FLEET, MODEL, agent, monitor_once
from waiting import eventually

from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

K = 3
A_DEVICES = ("pi-1", "pi-2")  # on node A first (URL list "A,B")


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three NATS nodes, each on a host (network namespace) of its own."""
    yield from running_cluster(tmp_path / "nats", netns=True)


async def monitor_on_nats(url: str) -> dict[str, Any]:
    """The monitor's snapshot; NATS speaks MQTT 3.1.1 only and has no ``$SYS`` topics."""
    return await monitor_once(url, "--no-sys", "--protocol", "3.1.1")


async def test_the_runtime_on_three_nodes_survives_the_death_of_a_devices_node(
    nats: NatsCluster, tmp_path: Path
) -> None:
    node_a, node_b, node_c = nats.urls
    write_fake_sysfs(tmp_path / "fs", mains=True)
    aggregator = fleet_parts.aggregator(
        tmp_path, node_c, fleet=FLEET, model=MODEL, buffer_size=K, metrics_interval_s=0.5
    )
    agents = {
        "pi-1": agent(tmp_path, f"{node_a},{node_b}", "pi-1", 0),
        "pi-2": agent(tmp_path, f"{node_a},{node_b}", "pi-2", 1),
        "pi-3": agent(tmp_path, f"{node_b},{node_a}", "pi-3", 2),
    }

    ready = asyncio.Event()
    agg_task = asyncio.create_task(aggregator.run(ready))
    await asyncio.wait_for(ready.wait(), 60)
    tasks = [asyncio.create_task(a.run()) for a in agents.values()]
    try:
        # 1. the fleet trains across the cluster; the monitor on C sees it
        await eventually(lambda: aggregator.statistics().version >= 2, 120, what="2 steps")
        live = await monitor_on_nats(node_c)
        assert sorted(d["device_id"] for d in live["devices"]) == sorted(agents)
        assert {d["status"] for d in live["devices"]} <= {"online", "idle", "training"}
        assert live["aggregator"]["status"] == "online"
        assert live["model"]["version"] >= 2

        # 2. node A dies: pi-1 and pi-2 connect again while it is down, so to B (failover)
        sent = {name: a.statistics().updates_sent for name, a in agents.items()}
        connections = {name: a.statistics().connections for name, a in agents.items()}
        version = aggregator.statistics().version
        nats.kill(0)
        await eventually(
            lambda: all(agents[n].statistics().connections > connections[n] for n in A_DEVICES),
            60,
            what="the devices of the dead node connected to B",
        )
        # A comes back: NATS 2.9 refuses many new QoS 1 subscriptions (new JetStream consumers)
        # while a node of three is down; see docs/SCALING.md
        nats.start_node(0)

        # 3. the devices of the dead node train and deliver again; the fleet steps twice more;
        # the monitor on C sees the whole fleet; settle: unplugged, every spool empty (each
        # update committed or finally refused)
        await eventually(
            lambda: all(agents[n].statistics().updates_sent > sent[n] for n in A_DEVICES),
            90,
            what="updates from the devices of the dead node",
        )
        await eventually(
            lambda: aggregator.statistics().version >= version + 2, 90, what="2 more steps"
        )
        after = await monitor_on_nats(node_c)
        assert sorted(d["device_id"] for d in after["devices"]) == sorted(agents)
        assert after["model"]["version"] >= version + 2
        write_fake_sysfs(tmp_path / "fs", mains=False)
        for a in agents.values():
            a.check_now()
        await eventually(
            lambda: all(a.statistics().spool_depth == 0 for a in agents.values()),
            180,
            what="empty spools",
        )
    finally:
        for a in agents.values():
            a.stop()
        await asyncio.gather(*tasks)
        aggregator.stop()
        await agg_task

    applied = aggregator.statistics().applied
    receipted = sum(a.statistics().delivery.receipted for a in agents.values())
    assert applied == receipted  # nothing accepted lost, nothing counted twice
    assert applied >= (version + 2) * K
    assert all(a.statistics().dropped == {} for a in agents.values())
