"""MqttTransport against a real Mosquitto (and the embedded amqtt broker for the 3.1.1 fallback)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from transport_helpers import config, consumer_config, receive

from broker.launcher import MosquittoBroker, ThreadedEmbeddedBroker
from edgefl.transport import (
    Backpressure,
    ConnectInfo,
    InboundMessage,
    MqttProtocol,
    MqttTransport,
    NotConnectedError,
    PayloadTooLarge,
    TransportClosed,
    Will,
)
from edgefl.transport._paho import BufferedClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def nothing_within(transport: MqttTransport, seconds: float) -> bool:
    try:
        await receive(transport, 1, seconds)
    except TimeoutError:
        return True
    return False


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a statistics predicate (the transports expose no events for these)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_qos1_roundtrip_speaks_mqtt5_to_mosquitto(mosquitto: MosquittoBroker) -> None:
    async with (
        MqttTransport(config(mosquitto.url)) as sub,
        MqttTransport(config(mosquitto.url)) as pub,
    ):
        await sub.subscribe("edgefl/v1/f/device/+/update/#", qos=1)
        await pub.publish("edgefl/v1/f/device/d1/update/7", b"delta", qos=1)
        await pub.publish("edgefl/v1/f/server/metrics", b"not matched", qos=0)
        [message] = await receive(sub)
        assert message == InboundMessage("edgefl/v1/f/device/d1/update/7", b"delta", qos=1)
        assert await nothing_within(sub, 0.2)
        p, s = pub.statistics(), sub.statistics()
        assert (p.protocol, s.protocol) == ("5", "5")
        assert p.published == 2
        assert p.published_bytes == len(b"delta") + len(b"not matched")
        assert s.received == 1
        assert s.connected
        assert s.dropped == 0


async def test_retained_message_reaches_late_subscriber_and_can_be_cleared(
    mosquitto: MosquittoBroker,
) -> None:
    async with MqttTransport(config(mosquitto.url)) as pub:
        await pub.publish("edgefl/v1/f/model/manifest", b"v1", retain=True)
        await pub.publish("edgefl/v1/f/model/manifest", b"v2", retain=True)
        async with MqttTransport(config(mosquitto.url)) as late:
            await late.subscribe("edgefl/v1/f/model/#")
            [message] = await receive(late)
            assert (message.payload, message.retain) == (b"v2", True)
            await late.subscribe("edgefl/v1/f/model/#")  # again: no second retained copy
            assert await nothing_within(late, 0.2)
        await pub.publish("edgefl/v1/f/model/manifest", b"", retain=True)
        async with MqttTransport(config(mosquitto.url)) as later:
            await later.subscribe("edgefl/v1/f/model/#")
            assert await nothing_within(later, 0.3)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "plain-paho"])
@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
async def test_unacked_message_is_redelivered_to_persistent_session(
    mosquitto: MosquittoBroker,
    protocol: MqttProtocol,
    fast_path: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # plain-paho: what a paho without the private members the fast path needs gets
    monkeypatch.setattr(BufferedClient, "fast_path", fast_path)
    topic = "edgefl/v1/f/device/d1/update/1"
    agg = consumer_config(mosquitto.url, f"aggregator-{protocol.value}", protocol=protocol)

    async with MqttTransport(config(mosquitto.url)) as pub:
        first = MqttTransport(agg)
        async with first:
            await first.subscribe("edgefl/v1/f/device/+/update/+")
            await pub.publish(topic, b"u1")
            [message] = await receive(first)
            assert message.payload == b"u1"
            assert message.ack_token
            await first.close(abrupt=True)  # crash before the update was recorded

        second = MqttTransport(agg)
        async with second:  # no subscribe: the session brings subscription and message back
            [again] = await receive(second)
            assert (again.topic, again.payload, again.duplicate) == (topic, b"u1", True)
            assert second.statistics().protocol == protocol.value
            await second.ack(again)
            await second.ack(again)  # idempotent
            assert second.statistics().acked == 1

        third = MqttTransport(agg)
        async with third:
            assert await nothing_within(third, 0.3)
            await pub.publish(topic, b"u2")
            [fresh] = await receive(third)
            assert (fresh.payload, fresh.duplicate) == (b"u2", False)
            await third.ack(fresh)


async def test_broker_restart_mid_stream(mosquitto: MosquittoBroker) -> None:
    connects: list[ConnectInfo] = []

    async def on_connect(info: ConnectInfo) -> None:
        connects.append(info)

    loop = asyncio.get_running_loop()
    sub_cfg = config(mosquitto.url, client_id="restart-sub", persistent_session=True)
    async with (
        MqttTransport(sub_cfg, on_connect=on_connect) as sub,
        MqttTransport(config(mosquitto.url)) as pub,
    ):
        await sub.subscribe("r/#")
        await pub.publish("r/1", b"1")
        assert [m.payload for m in await receive(sub)] == [b"1"]

        await loop.run_in_executor(None, mosquitto.save)
        await loop.run_in_executor(None, mosquitto.kill)
        await until(lambda: not pub.connected and not sub.connected)
        pending = asyncio.create_task(pub.publish("r/2", b"2"))
        await asyncio.sleep(0.3)
        assert not pending.done()  # waits for the broker instead of failing

        await loop.run_in_executor(None, mosquitto.start)
        await asyncio.wait_for(pending, 10)
        await pub.publish("r/3", b"3")
        assert [m.payload for m in await receive(sub, 2, within=10)] == [b"2", b"3"]
        stats = sub.statistics()
        assert stats.reconnects >= 1
        assert stats.connect_failures >= 1
        assert pub.statistics().reconnects >= 1
    assert len(connects) >= 2
    assert connects[0].connects == 1
    assert connects[0].session_present is False
    assert connects[-1].session_present is True  # restored from the persistence database


async def test_last_will_fires_on_abrupt_disconnect_only(mosquitto: MosquittoBroker) -> None:
    state = "edgefl/v1/f/device/d1/state"
    will = Will(state, b"lost", qos=1, retain=True)

    async with MqttTransport(config(mosquitto.url)) as watcher:
        await watcher.subscribe("edgefl/v1/f/device/+/state")

        async def online(info: ConnectInfo) -> None:
            await device.publish(state, b"online", retain=True)

        device = MqttTransport(config(mosquitto.url, will=will), on_connect=online)
        async with device:
            [birth] = await receive(watcher)
            assert birth.payload == b"online"
        assert await nothing_within(watcher, 0.3)  # clean DISCONNECT: no Will

        device = MqttTransport(config(mosquitto.url, will=will), on_connect=online)
        await device.__aenter__()
        [birth] = await receive(watcher)
        assert birth.payload == b"online"
        await device.close(abrupt=True)
        [death] = await receive(watcher)
        assert (death.topic, death.payload) == (state, b"lost")


async def test_auto_protocol_falls_back_to_311_on_embedded_broker(
    embedded_broker: ThreadedEmbeddedBroker,
) -> None:
    async with (
        MqttTransport(config(embedded_broker.url)) as sub,
        MqttTransport(config(embedded_broker.url)) as pub,
    ):
        await sub.subscribe("a/#")
        await pub.publish("a/b", b"hi")
        [message] = await receive(sub)
        assert message.payload == b"hi"
        assert sub.statistics().protocol == "3.1.1"
        assert pub.statistics().connect_failures == 0  # a refused v5 CONNECT is not a failure


async def test_one_megabyte_payload_and_packet_size_limit(mosquitto: MosquittoBroker) -> None:
    payload = os.urandom(1_000_000)

    async with (
        MqttTransport(config(mosquitto.url)) as sub,
        MqttTransport(config(mosquitto.url)) as pub,
    ):
        await sub.subscribe("big/#")
        await pub.publish("big/one", payload)
        [message] = await receive(sub, within=10)
        assert message.payload == payload
        # dev.conf advertises max_packet_size 1 MiB + 64 KiB in CONNACK: refused before sending
        with pytest.raises(PayloadTooLarge):
            await pub.publish("big/two", payload + payload[:200_000])
        assert pub.statistics().connected


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
async def test_full_queue_applies_backpressure_and_loses_nothing(
    mosquitto: MosquittoBroker, protocol: MqttProtocol
) -> None:
    """MQTT 5: Receive Maximum = queue size, so the broker itself holds back. 3.1.1: the broker's
    in-flight window (1000) is larger than the queue, so the transport stops reading."""
    count = 300

    sub_cfg = config(mosquitto.url, max_queued_messages=10, protocol=protocol)
    async with MqttTransport(sub_cfg) as sub, MqttTransport(config(mosquitto.url)) as pub:
        await sub.subscribe("bp/#")
        await asyncio.gather(
            *(pub.publish(f"bp/{i}", i.to_bytes(4, "big") * 256) for i in range(count))
        )
        await until(lambda: sub.statistics().queued >= 10)
        await asyncio.sleep(0.2)
        stats = sub.statistics()
        assert stats.queued == 10
        assert stats.queue_high_water == 10
        if protocol is MqttProtocol.V5:
            assert stats.read_pauses == 0  # keepalive keeps working while the queue is full
        else:
            assert stats.read_pauses >= 1
        messages = await receive(sub, count, within=10)
        seqs = sorted(int.from_bytes(m.payload[:4], "big") for m in messages)
        assert seqs == list(range(count))
        stats = sub.statistics()
        assert stats.dropped_by_reason == {}
        assert stats.acked == count  # acknowledged as handed out, not on arrival


async def test_queued_but_unconsumed_messages_come_back_after_a_crash(
    mosquitto: MosquittoBroker,
) -> None:
    """Without manual_ack a message is acknowledged when a consumer takes it, not on arrival."""

    cfg = config(mosquitto.url, client_id="auto-ack", persistent_session=True)
    async with MqttTransport(config(mosquitto.url)) as pub:
        first = MqttTransport(cfg)
        async with first:
            await first.subscribe("q/#")
            await pub.publish("q/1", b"1")
            await pub.publish("q/2", b"2")
            await until(lambda: first.statistics().queued == 2)
            [taken] = await receive(first)
            assert (taken.payload, taken.ack_token) == (b"1", 0)
            await first.close(abrupt=True)
            assert first.statistics().dropped_by_reason == {"unconsumed_at_close": 1}
        async with MqttTransport(cfg) as second:
            [back] = await receive(second)
            assert (back.payload, back.duplicate) == (b"2", True)
            assert await nothing_within(second, 0.2)


async def test_ack_after_reconnect_is_stale_and_the_broker_redelivers(
    mosquitto: MosquittoBroker,
) -> None:
    loop = asyncio.get_running_loop()
    cfg = consumer_config(mosquitto.url, "agg")
    async with MqttTransport(cfg) as agg, MqttTransport(config(mosquitto.url)) as pub:
        await agg.subscribe("u/#")
        await pub.publish("u/1", b"a")
        [old] = await receive(agg)
        await loop.run_in_executor(None, mosquitto.save)
        await loop.run_in_executor(None, mosquitto.kill)
        await until(lambda: not agg.connected)
        await loop.run_in_executor(None, mosquitto.start)
        await until(lambda: agg.connected)
        await agg.ack(old)  # its packet id belonged to the dead connection: not sent
        stats = agg.statistics()
        assert (stats.stale_acks, stats.acked) == (1, 0)
        [again] = await receive(agg)
        assert (again.payload, again.duplicate) == (b"a", True)
        await agg.ack(again)
        assert agg.statistics().acked == 1


async def test_drop_newest_counts_every_drop(mosquitto: MosquittoBroker) -> None:
    sub_cfg = config(mosquitto.url, max_queued_messages=5, backpressure=Backpressure.DROP_NEWEST)
    async with MqttTransport(sub_cfg) as sub, MqttTransport(config(mosquitto.url)) as pub:
        await sub.subscribe("m/#", qos=0)
        for i in range(20):
            await pub.publish(f"m/{i}", b"x", qos=0)
        await until(lambda: sub.statistics().received + sub.statistics().dropped == 20)
        stats = sub.statistics()
        assert stats.received == 5
        assert stats.dropped_by_reason == {"queue_full": 15}
        await sub.close()
        assert sub.statistics().dropped_by_reason == {
            "queue_full": 15,
            "unconsumed_at_close": 5,
        }


async def test_publish_while_broker_down_times_out_without_sending(
    mosquitto: MosquittoBroker,
) -> None:
    loop = asyncio.get_running_loop()
    async with MqttTransport(config(mosquitto.url, operation_timeout=0.5)) as pub:
        await loop.run_in_executor(None, mosquitto.stop)
        await until(lambda: not pub.connected)
        with pytest.raises(NotConnectedError):
            await pub.publish("x/y", b"1")
        stats = pub.statistics()
        assert stats.published == 0
        assert not stats.connected
        assert stats.last_error is not None
    with pytest.raises(TransportClosed):
        await pub.publish("x/y", b"1")


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
async def test_manual_ack_session_holds_at_most_receive_maximum_unacknowledged(
    mosquitto: MosquittoBroker, protocol: MqttProtocol
) -> None:
    """The transport enforces its Receive Maximum itself on manual-ack sessions (it stops
    reading), and ack_many() hands the PUBACKs back so the rest flows; nothing is lost."""
    count, window = 60, 8

    sub_cfg = consumer_config(
        mosquitto.url,
        f"window-{protocol.value}",
        receive_maximum=window,
        max_queued_messages=100,
        protocol=protocol,
    )
    async with MqttTransport(sub_cfg) as sub, MqttTransport(config(mosquitto.url)) as pub:
        await sub.subscribe("win/#")
        await asyncio.gather(*(pub.publish(f"win/{i}", i.to_bytes(4, "big")) for i in range(count)))

        # Act 1: take what comes without acknowledging it
        held = await receive(sub, window)
        assert await nothing_within(sub, 0.5)
        stats = sub.statistics()

        # Assert 1: no more than the window is outstanding
        assert stats.received == window
        assert stats.read_pauses >= 1

        # Act 2: acknowledge in one go, then take and acknowledge the rest batch by batch
        await sub.ack_many(held)
        got = list(held)
        while len(got) < count:
            batch = await receive(sub, min(window, count - len(got)))
            await sub.ack_many(batch)
            got += batch

        # Assert 2: everything arrived once and was acknowledged
        seqs = sorted(int.from_bytes(m.payload, "big") for m in got)
        assert seqs == list(range(count))
        assert sub.statistics().acked == count

    async with MqttTransport(sub_cfg) as again:  # the session has nothing left to redeliver
        assert await first_after_reconnect(again, "win/marker") == "win/marker"


async def first_after_reconnect(transport: MqttTransport, marker: str) -> str:
    """The topic of the first message a resumed session delivers, once ``marker`` is published
    through it: the broker sends what it redelivers right after CONNACK, before it has even
    read our PUBLISH, so anything left over comes first (an event to wait for, not a window)."""
    await transport.publish(marker, b"marker")
    [first] = await receive(transport, 1)
    return first.topic


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
async def test_acks_sent_before_a_graceful_close_are_processed_before_a_session_takeover(
    mosquitto: MosquittoBroker, protocol: MqttProtocol
) -> None:
    """Issue 14: the same client id reconnecting at once took over its session while Mosquitto
    still had PUBACKs of the old connection unread (it reads one packet per connection and
    wake-up), so acknowledged messages came again. close() now waits for a PINGRESP first.
    Without it, 3000 acks then an immediate takeover redelivered in 6 of 8 rounds (MQTT 5)."""
    count = 3000

    for round_ in range(3):
        sub_cfg = consumer_config(
            mosquitto.url,
            f"takeover-{protocol.value}-{round_}",
            receive_maximum=count,
            max_queued_messages=count + 10,
            protocol=protocol,
        )
        # Arrange: a session holding `count` delivered, unacknowledged messages
        async with MqttTransport(sub_cfg) as sub:
            await sub.subscribe("takeover/#")
            async with MqttTransport(config(mosquitto.url)) as pub:
                await asyncio.gather(*(pub.publish(f"takeover/{i}", b"x") for i in range(count)))
            # (Mosquitto sends a 3.1.1 client at most 1000 unacknowledged messages)
            window = 1000 if protocol is MqttProtocol.V311 else count
            received = 0
            while received < count - window:
                batch = await receive(sub, window, within=20.0)
                await sub.ack_many(batch)
                received += len(batch)
            last = await receive(sub, count - received, within=20.0)

            # Act: acknowledge the last window, close, and take the session over at once
            await sub.ack_many(last)
        async with MqttTransport(sub_cfg) as again:
            # Assert: nothing acknowledged comes again
            assert await first_after_reconnect(again, "takeover/marker") == "takeover/marker"
        assert sub.statistics().acked == count
