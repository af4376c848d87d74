"""The monitor's asyncio shell over the in-memory broker: subscriptions (all traffic or without
updates), the topic log and its filters, retained-topic tracking, settling, clearing."""

from __future__ import annotations

import asyncio
import json

from edgefl.monitor.clear import select_topics
from edgefl.monitor.client import FleetMonitor, fleet_filters, monitor_mqtt_config
from edgefl.protocol.messages import UpdateHeader, encode_message
from edgefl.protocol.topics import device_state_topic, update_topic
from edgefl.transport.memory import MemoryBroker, MemoryTransport

FLEET = "lab"


def state(status: str, session: int = 1) -> bytes:
    return json.dumps({"status": status, "session": session}).encode()


def update(device: str, seq: int) -> bytes:
    header = UpdateHeader(FLEET, device, seq, 0, 8, "tiny", {"quantization": "int8"}, 10, 1.0)
    return encode_message(header, b"\x00" * 64)


def monitor(broker: MemoryBroker, **kw: object) -> FleetMonitor:
    config = monitor_mqtt_config("mqtt://memory.invalid")
    return FleetMonitor(config, FLEET, transport=MemoryTransport(broker), **kw)  # type: ignore[arg-type]


def test_fleet_filters() -> None:
    assert fleet_filters(FLEET) == ["edgefl/v1/lab/#"]
    assert fleet_filters(FLEET, updates=False) == [
        "edgefl/v1/lab/device/+/state",
        "edgefl/v1/lab/model/manifest",
        "edgefl/v1/lab/server/+",
    ]


async def test_log_filters_sys_and_retained_tracking() -> None:
    broker = MemoryBroker()
    broker.publish(device_state_topic(FLEET, "a"), state("idle"), qos=1, retain=True)
    broker.publish("$SYS/broker/clients/connected", b"3", qos=0, retain=True)
    seen: list[str] = []
    async with monitor(broker) as m:
        m.add_listener(lambda entry: seen.append(entry.topic))
        await m.settle(quiet=0.1, timeout=2.0)
        broker.publish(update_topic(FLEET, "a", 1), update("a", 1), qos=1)
        broker.publish(device_state_topic(FLEET, "a"), state("training"), qos=1, retain=True)
        await asyncio.sleep(0.05)

        snap = m.snapshot()
        assert snap.device("a").status == "training"  # type: ignore[union-attr]
        assert snap.device("a").updates_seen == 1  # type: ignore[union-attr]
        assert snap.connection is not None
        assert snap.connection.broker_stats.clients == 3  # folded, though not logged
        assert snap.connection.subscriptions == ("edgefl/v1/lab/#", "$SYS/#")
        # $SYS stays out of the log unless asked for; the retained state was logged
        assert [e.topic for e in m.log] == [
            device_state_topic(FLEET, "a"),
            update_topic(FLEET, "a", 1),
            device_state_topic(FLEET, "a"),
        ]
        assert seen == [e.topic for e in m.log]  # listeners see what the log keeps
        assert m.retained_topics == {
            device_state_topic(FLEET, "a"),
            "$SYS/broker/clients/connected",
        }


async def test_without_updates_and_with_a_topic_filter() -> None:
    broker = MemoryBroker()
    filters = (f"edgefl/v1/{FLEET}/device/+/update/+",)
    async with monitor(broker, include_updates=False, topic_filters=filters) as m:
        broker.publish(update_topic(FLEET, "a", 1), update("a", 1), qos=1)
        broker.publish(device_state_topic(FLEET, "a"), state("idle"), qos=1, retain=True)
        await asyncio.sleep(0.05)
        snap = m.snapshot()
        assert [d.device_id for d in snap.devices] == ["a"]  # the state arrived
        assert snap.monitor.by_kind == {"device_state": 1}  # the update was never received
        assert list(m.log) == []  # and the state did not pass the log filter


async def test_clear_retained_states_of_lost_devices() -> None:
    broker = MemoryBroker()
    broker.publish(device_state_topic(FLEET, "gone"), state("lost"), qos=1, retain=True)
    broker.publish(device_state_topic(FLEET, "here"), state("online"), qos=1, retain=True)
    async with monitor(broker) as m:
        await m.settle(quiet=0.1, timeout=2.0)
        topics = select_topics("lost", m.snapshot(), m.retained_topics)
        assert topics == [device_state_topic(FLEET, "gone")]
        await m.clear_retained(topics)
        await asyncio.sleep(0.05)
        assert [d.device_id for d in m.snapshot().devices] == ["here"]
    assert sorted(broker.retained()) == [device_state_topic(FLEET, "here")]


async def test_settle_is_bounded_and_waits_for_the_first_metrics_of_an_online_server() -> None:
    from edgefl.protocol.messages import ServerMetrics, ServerState
    from edgefl.protocol.topics import server_metrics_topic, server_state_topic

    broker = MemoryBroker()
    server = ServerState(FLEET, "online", 1, 3, 1, 4, 9, 0.0, 1.0)  # type: ignore[arg-type]
    broker.publish(server_state_topic(FLEET), encode_message(server), qos=1, retain=True)
    async with monitor(broker) as m:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(10):  # a hang fails here, not the whole run
            await m.settle(quiet=0.05, timeout=0.5)  # no metrics come: the bound holds
        assert loop.time() - started >= 0.5  # it waited for the metrics, up to its bound
        assert m.model.awaiting_metrics()
        metrics = ServerMetrics(FLEET, 2.0, 3, 2, 4, accuracy=0.5)
        loop.call_later(
            0.1,
            lambda: broker.publish(server_metrics_topic(FLEET), encode_message(metrics)),
        )
        await m.settle(quiet=0.05, timeout=5.0)
        agg = m.snapshot().aggregator
        assert (agg.buffer_fill, agg.accuracy) == (2, 0.5)
