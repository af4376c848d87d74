"""MemoryBroker/MemoryTransport semantics, plus the sans-IO pieces of edgefl.transport
(topic matching and validation, MqttConfig URL parsing)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from transport_helpers import receive

from edgefl.transport import (
    Backpressure,
    ConnectInfo,
    InboundMessage,
    MemoryBroker,
    MemoryTransport,
    MqttConfig,
    MqttProtocol,
    MqttTransport,
    NotConnectedError,
    Transport,
    TransportClosed,
    Will,
    topic_matches,
    validate_filter,
    validate_topic,
)

pytestmark = pytest.mark.timeout(10)


async def take(transport: MemoryTransport, count: int) -> list[InboundMessage]:
    return await receive(transport, count, within=1.0)


async def session(broker: MemoryBroker, client_id: str, **options: bool) -> MemoryTransport:
    """A connected transport with a persistent session of ``client_id``."""
    transport = MemoryTransport(broker, client_id, persistent_session=True, **options)
    await transport.connect()
    return transport


def payloads(messages: list[InboundMessage]) -> list[bytes]:
    return [m.payload for m in messages]


# -- topics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("+/+/c", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("edgefl/v1/+/device/+/update/#", "edgefl/v1/f/device/d1/update/3", True),
        ("edgefl/v1/+/device/+/update/#", "edgefl/v1/f/device/d1/state", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00b", "x" * 65536])
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(ValueError, match=r"topic|wildcard|NUL"):
        validate_topic(topic)


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a/b#", "a+/b", "$share/g", "$share//a"])
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(ValueError, match=r"filter|level|shared"):
        validate_filter(topic_filter)


def test_valid_filters() -> None:
    for topic_filter in ("#", "+", "a/+/b/#", "$share/aggregators/edgefl/v1/f/device/+/update/#"):
        validate_filter(topic_filter)


# -- routing, QoS, retained -----------------------------------------------------------------------


async def test_wildcard_routing_and_qos_downgrade() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as a, MemoryTransport(broker) as b:
        await a.subscribe("fleet/+/update/#", qos=1)
        await b.subscribe("fleet/#", qos=0)
        await a.publish("fleet/d1/update/1", b"u", qos=1)
        await a.publish("fleet/d1/state", b"s", qos=1)
        [got_a] = await take(a, 1)
        assert got_a == InboundMessage("fleet/d1/update/1", b"u", qos=1)
        got_b = await take(b, 2)
        assert [(m.topic, m.qos) for m in got_b] == [
            ("fleet/d1/update/1", 0),
            ("fleet/d1/state", 0),
        ]
        assert a.statistics().queued == 0
        with pytest.raises(ValueError, match="wildcards"):
            await a.publish("fleet/+", b"x")
        with pytest.raises(ValueError, match="QoS"):
            await a.publish("fleet/x", b"x", qos=2)


async def test_overlapping_subscriptions_deliver_one_copy_at_highest_qos() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as t:
        await t.subscribe("a/#", qos=0)
        await t.subscribe("a/+", qos=1)
        await t.publish("a/b", b"x", qos=1)
        assert [(m.qos, m.payload) for m in await take(t, 1)] == [(1, b"x")]
        assert t.statistics().queued == 0


async def test_retained_messages() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as pub:
        await pub.publish("m/manifest", b"v1", retain=True)
        await pub.publish("m/manifest", b"v2", retain=True)
        assert broker.retained() == {"m/manifest": b"v2"}
        async with MemoryTransport(broker) as late:
            await late.subscribe("m/#")
            [message] = await take(late, 1)
            assert (message.payload, message.retain) == (b"v2", True)
            await late.subscribe("m/#")  # an existing subscription gets no second copy
            assert late.statistics().queued == 0
            await pub.publish("m/manifest", b"v3", retain=True)
            [live] = await take(late, 1)
            assert (live.payload, live.retain) == (b"v3", False)
        await pub.publish("m/manifest", b"", retain=True)
        assert broker.retained() == {}


# -- sessions, acks, wills ------------------------------------------------------------------------


async def test_last_will_on_abrupt_close_only() -> None:
    broker = MemoryBroker()
    will = Will("dev/d1/state", b"lost")
    async with MemoryTransport(broker) as watcher:
        await watcher.subscribe("dev/+/state")
        async with MemoryTransport(broker, will=will):
            pass
        assert watcher.statistics().queued == 0
        device = MemoryTransport(broker, will=will)
        await device.connect()
        await device.close(abrupt=True)
        [message] = await take(watcher, 1)
        assert message.payload == b"lost"
        assert broker.retained() == {"dev/d1/state": b"lost"}


async def test_unacked_messages_are_redelivered_to_the_same_persistent_client() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as pub:
        first = await session(broker, "agg", manual_ack=True)
        await first.subscribe("u/#")
        await pub.publish("u/1", b"a")
        await pub.publish("u/2", b"b")
        got = await take(first, 2)
        assert all(m.ack_token for m in got)
        await first.ack(got[1])  # only the second is recorded
        await first.close(abrupt=True)
        assert broker.queued_for("agg") == 1

        second = await session(broker, "agg", manual_ack=True)  # no subscribe: the session keeps it
        [again] = await take(second, 1)
        assert (again.payload, again.duplicate) == (b"a", True)
        await second.ack(again)
        await second.ack(again)
        assert second.statistics().acked == 1
        await pub.publish("u/3", b"c")
        [fresh] = await take(second, 1)
        assert (fresh.payload, fresh.duplicate) == (b"c", False)
        await second.ack(fresh)
        await second.close()

        third = await session(broker, "agg", manual_ack=True)
        assert third.statistics().queued == 0
        await third.close()


async def test_ack_from_an_earlier_connection_is_stale_and_the_message_comes_back() -> None:
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "agg", persistent_session=True, manual_ack=True)
    async with MemoryTransport(broker) as pub, agg:
        await agg.subscribe("u/#")
        await pub.publish("u/1", b"a")
        [old] = await take(agg, 1)
        await agg.disconnect()
        await agg.connect()
        await agg.ack(old)
        assert agg.statistics().stale_acks == 1
        assert agg.statistics().acked == 0
        [again] = await take(agg, 1)
        assert (again.payload, again.duplicate) == (b"a", True)
        await agg.ack(again)
        assert agg.statistics().acked == 1


async def test_auto_ack_messages_are_not_redelivered() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as pub:
        sub = await session(broker, "s")
        await sub.subscribe("t")
        await pub.publish("t", b"x")
        [message] = await take(sub, 1)
        assert message.ack_token == 0
        await sub.close(abrupt=True)
        again = await session(broker, "s")
        assert again.statistics().queued == 0


async def test_offline_persistent_session_queues_qos1_and_drops_qos0_counted() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as pub:
        sub = await session(broker, "dev")
        await sub.subscribe("cmd/#", qos=1)
        await sub.close()
        await pub.publish("cmd/a", b"1", qos=1)
        await pub.publish("cmd/b", b"0", qos=0)
        assert broker.dropped_by_reason == {"offline_qos0": 1}

        infos: list[ConnectInfo] = []

        async def hook(info: ConnectInfo) -> None:
            infos.append(info)

        back = MemoryTransport(broker, "dev", persistent_session=True, on_connect=hook)
        await back.connect()
        assert payloads(await take(back, 1)) == [b"1"]
        assert infos == [ConnectInfo(session_present=True, protocol="memory", connects=1)]
        await back.close()

        clean = MemoryTransport(broker, "dev")  # clean start discards the session
        await clean.connect()
        await pub.publish("cmd/c", b"2")
        assert clean.statistics().queued == 0
        await clean.close()
        assert not broker.has_session("dev")


async def test_reconnect_resubscribes_and_runs_hook_each_time() -> None:
    broker = MemoryBroker()
    infos: list[ConnectInfo] = []

    async def hook(info: ConnectInfo) -> None:
        infos.append(info)
        await device.publish("dev/d/state", b"online", retain=True)

    device = MemoryTransport(broker, "d", on_connect=hook)
    async with MemoryTransport(broker) as pub, device:
        await device.subscribe("model/#")
        await device.disconnect()
        await pub.publish("model/m", b"while away", qos=1)  # non-persistent: lost
        await device.connect()
        await pub.publish("model/m", b"back", qos=1)
        assert payloads(await take(device, 1)) == [b"back"]
        assert [i.connects for i in infos] == [1, 2]
        assert device.statistics().reconnects == 1
        assert broker.retained()["dev/d/state"] == b"online"


async def test_client_id_takeover_disconnects_the_old_connection() -> None:
    broker = MemoryBroker()
    old = MemoryTransport(broker, "same", will=Will("w", b"gone"))
    new = MemoryTransport(broker, "same")
    async with MemoryTransport(broker) as watcher:
        await watcher.subscribe("w")
        await old.connect()
        await new.connect()
        assert not old.connected
        assert new.connected
        assert watcher.statistics().queued == 0  # no Will on takeover
        await old.close(abrupt=True)  # no longer attached: no Will either
        assert watcher.statistics().queued == 0
        await new.close()


async def test_shared_subscription_round_robin() -> None:
    broker = MemoryBroker()
    group = "$share/aggregators/u/#"
    async with (
        MemoryTransport(broker) as pub,
        MemoryTransport(broker) as a,
        MemoryTransport(broker) as b,
    ):
        await a.subscribe(group)
        await b.subscribe(group)
        for i in range(6):
            await pub.publish(f"u/{i}", b"x")
        assert a.statistics().queued == 3
        assert b.statistics().queued == 3


# -- backpressure, timeouts, closing --------------------------------------------------------------


async def test_full_queue_holds_messages_at_the_broker_and_loses_none() -> None:
    broker = MemoryBroker()
    async with (
        MemoryTransport(broker) as pub,
        MemoryTransport(broker, max_queued_messages=3) as sub,
    ):
        await sub.subscribe("t/#")
        for i in range(10):
            await pub.publish(f"t/{i}", bytes([i]))
        stats = sub.statistics()
        assert (stats.queued, stats.read_pauses) == (3, 1)
        assert payloads(await take(sub, 10)) == [bytes([i]) for i in range(10)]
        stats = sub.statistics()
        assert (stats.received, stats.queue_high_water, stats.dropped) == (10, 3, 0)


async def test_drop_newest_counts_drops() -> None:
    broker = MemoryBroker()
    sub = MemoryTransport(
        broker, max_queued_messages=2, backpressure=Backpressure.DROP_NEWEST, manual_ack=True
    )
    async with MemoryTransport(broker) as pub, sub:
        await sub.subscribe("t/#")
        for i in range(5):
            await pub.publish(f"t/{i}", b"x")
        assert sub.statistics().dropped_by_reason == {"queue_full": 3}
        assert broker.queued_for(sub.client_id) == 2  # dropped ones are not held in flight
    assert sub.statistics().dropped_by_reason == {"queue_full": 3, "unconsumed_at_close": 2}


async def test_publish_waits_for_connection_with_timeout() -> None:
    broker = MemoryBroker()
    t = MemoryTransport(broker, operation_timeout=0.05)
    with pytest.raises(NotConnectedError):
        await t.publish("a", b"x")
    waiting = asyncio.create_task(MemoryTransport.publish(t, "a", b"x"))
    await asyncio.sleep(0)
    await t.connect()
    await waiting
    assert t.statistics().published == 1
    await t.close()
    with pytest.raises(TransportClosed):
        await t.publish("a", b"x")
    with pytest.raises(TransportClosed):
        await t.connect()


async def test_messages_iteration_ends_on_close() -> None:
    broker = MemoryBroker()
    t = MemoryTransport(broker)
    await t.connect()

    async def consume() -> list[InboundMessage]:
        return [m async for m in t.messages()]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await t.close()
    assert await asyncio.wait_for(task, 1) == []


def test_both_transports_satisfy_the_protocol() -> None:
    assert isinstance(MemoryTransport(MemoryBroker()), Transport)
    assert isinstance(MqttTransport(MqttConfig()), Transport)


def test_statistics_are_a_frozen_snapshot() -> None:
    stats = MemoryTransport(MemoryBroker()).statistics()
    assert stats.connected is False
    assert stats.protocol is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.connected = True  # type: ignore[misc]


# -- MqttConfig -----------------------------------------------------------------------------------


def test_config_from_url() -> None:
    cfg = MqttConfig.from_url("mqtt://user:p%40ss@broker.local:1884", client_id="agg")
    assert (cfg.host, cfg.port, cfg.tls) == ("broker.local", 1884, False)
    assert (cfg.username, cfg.password, cfg.client_id) == ("user", "p@ss", "agg")
    assert cfg.url == "mqtt://broker.local:1884"
    assert "p@ss" not in repr(cfg)

    tls = MqttConfig.from_url("mqtts://broker.local", ca_file=Path("/etc/ca.pem"))
    assert (tls.port, tls.tls, tls.tls_files.tls_insecure) == (8883, True, False)
    assert MqttConfig.from_url("mqtt://[::1]").url == "mqtt://[::1]:1883"
    assert MqttConfig.from_url("tcp://h").port == 1883
    assert MqttConfig.from_url("mqtt://h", protocol=MqttProtocol.V311).protocol is MqttProtocol.V311


@pytest.mark.parametrize(
    ("url", "overrides"),
    [
        ("http://h", {}),
        ("mqtt://", {}),
        ("mqtt://h/path", {}),
        ("mqtt://h?x=1", {}),
        ("mqtt://h:99999", {}),
        ("mqtt://h", {"persistent_session": True}),  # needs a client id
        ("mqtt://h", {"ca_file": Path("ca.pem")}),  # TLS option on a plain URL
        ("mqtts://h", {"cert_file": Path("c.pem")}),  # cert without key
        ("mqtt://h", {"max_queued_messages": 0}),
        ("mqtt://h", {"reconnect_min_delay": 5.0, "reconnect_max_delay": 1.0}),
    ],
)
def test_config_rejects(url: str, overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        MqttConfig.from_url(url, **overrides)


def test_will_is_validated() -> None:
    with pytest.raises(ValueError, match="wildcards"):
        Will("a/#", b"x")
    with pytest.raises(ValueError, match="QoS"):
        Will("a", b"x", qos=2)
