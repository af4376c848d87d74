"""The secure Mosquitto config (broker/conf/secure*.conf) with files from `edgefl provision`.

A real Mosquitto runs the provisioned TLS + password + ACL config on a free port. Checked:
anonymous and wrong-password logins are refused; a device can publish neither to another
device's topics nor to the model or server topics (the aggregator, subscribed to everything it
may read, never receives those messages), cannot read other devices' updates, and can read its
fleet's models; Python-written ``$7$`` password lines work; the mutual-TLS variant takes the
identity from the client certificate and applies the same ACL; forged or tampered manifests and
updates that do pass the broker (a stolen MQTT password) are rejected by the signature checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import needs
import pytest

from broker.launcher import MosquittoBroker
from edgefl.errors import ProtocolError, RejectReason, UpdateRejected
from edgefl.protocol.messages import (
    DeviceState,
    DeviceStatus,
    ModelFormat,
    ModelManifest,
    UpdateHeader,
    decode_message,
    decode_update,
    encode_message,
)
from edgefl.protocol.topics import (
    checkin_topic,
    checkins_filter,
    device_state_topic,
    lease_topic,
    manifest_topic,
    model_chunk_topic,
    receipt_topic,
    server_state_topic,
    update_topic,
    updates_filter,
)
from edgefl.security import (
    Ed25519Signer,
    generate_private_key,
    load_manifest_verifier,
    load_signer,
    load_update_authenticator,
)
from edgefl.security.provision import FleetDirectory, add_device, init_fleet, mosquitto_for_fleet
from edgefl.transport import (
    BrokerRefused,
    InboundMessage,
    MqttConfig,
    MqttTransport,
    NotConnectedError,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FLEET = "lab"


@dataclass(frozen=True)
class SecureFleet:
    layout: FleetDirectory
    broker: MosquittoBroker

    @property
    def ca(self) -> Path:
        return self.layout.broker_dir / "ca.pem"

    def password(self, who: str) -> str:
        directory = (
            self.layout.aggregator_dir
            if who == "aggregator"
            else self.layout.monitor_dir
            if who == "monitor"
            else self.layout.device_dir(who)
        )
        return (directory / "mqtt-password").read_text().strip()

    def config(self, user: str | None, password: str | None = None, **extra: object) -> MqttConfig:
        values: dict[str, object] = {
            "ca_file": self.ca,
            "start_timeout": 5.0,
            "operation_timeout": 5.0,
            "reconnect_min_delay": 0.2,
        }
        if user is not None:
            values["username"] = user
            values["password"] = self.password(user) if password is None else password
        values.update(extra)
        return MqttConfig.from_url(f"mqtts://localhost:{self.broker.port}", **values)


def _require_mosquitto() -> None:
    needs.mosquitto()


def _start(tmp: Path, layout: FleetDirectory, *, mtls: bool = False) -> MosquittoBroker:
    broker = mosquitto_for_fleet(layout, tmp / ("state-mtls" if mtls else "state"), mtls=mtls)
    broker.start()
    return broker


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    _require_mosquitto()
    tmp = tmp_path_factory.mktemp("secure")
    layout = init_fleet(tmp / "fleet", FLEET, ["localhost", "127.0.0.1"])
    add_device(layout.root, "dev-a", client_cert=True)
    add_device(layout.root, "dev-b")
    add_device(layout.root, "dev-py", use_mosquitto_passwd=False)  # our own $7$ writer
    broker = _start(tmp, layout)
    try:
        yield SecureFleet(layout, broker)
    finally:
        broker.stop()


async def _collect(sub: MqttTransport, seconds: float) -> list[InboundMessage]:
    got: list[InboundMessage] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in sub.messages():
                got.append(message)
    except TimeoutError:
        pass
    return got


async def _collect_until(sub: MqttTransport, topic: str, seconds: float = 5.0) -> list[str]:
    """Topics received until (and including) ``topic``."""
    got: list[str] = []
    async with asyncio.timeout(seconds):
        async for message in sub.messages():
            got.append(message.topic)
            if message.topic == topic:
                return got
    raise AssertionError("unreachable")


def _update(device: str, seq: int, *, signer: Ed25519Signer | None) -> bytes:
    header = UpdateHeader(
        fleet=FLEET,
        device_id=device,
        seq=seq,
        base_version=0,
        num_examples=10,
        model="tiny",
        codec={"format": 1},
        num_params=4,
        created_at=1_700_000_000.0,
    )
    return encode_message(header, b"\x00" * 16, signer=signer)


def _manifest(version: int, *, signer: Ed25519Signer | None) -> bytes:
    weights = b"\x00" * 16
    msg = ModelManifest(
        fleet=FLEET,
        version=version,
        model="tiny",
        format=ModelFormat.FP32_FLAT,
        sha256=hashlib.sha256(weights).hexdigest(),
        size=16,
        chunk_size=16,
        num_chunks=1,
        num_params=4,
        created_at=1_700_000_000.0,
    )
    return encode_message(msg, signer=signer)


# --- authentication -------------------------------------------------------------------------------


async def test_anonymous_connection_is_refused(fleet: SecureFleet) -> None:
    with pytest.raises(NotConnectedError, match=r"refused|closed"):
        async with MqttTransport(fleet.config(None, start_timeout=1.0)):
            pass


async def test_wrong_password_is_refused(fleet: SecureFleet) -> None:
    wrong = fleet.config("dev-a", password="not-the-password", start_timeout=1.0)
    with pytest.raises(NotConnectedError, match=r"refused|closed"):
        async with MqttTransport(wrong):
            pass
    stolen_name = fleet.config("dev-a", password=fleet.password("dev-b"), start_timeout=1.0)
    with pytest.raises(NotConnectedError, match=r"refused|closed"):
        async with MqttTransport(stolen_name):
            pass


async def test_plain_tcp_is_not_spoken(fleet: SecureFleet) -> None:
    plain = MqttConfig.from_url(
        f"mqtt://127.0.0.1:{fleet.broker.port}",
        username="dev-a",
        password=fleet.password("dev-a"),
        start_timeout=1.0,
    )
    with pytest.raises(NotConnectedError):
        async with MqttTransport(plain):
            pass


async def test_python_written_password_hash_is_accepted_by_mosquitto(fleet: SecureFleet) -> None:
    line = next(
        line
        for line in fleet.layout.password_file.read_text().splitlines()
        if line.startswith("dev-py:")
    )
    assert line.startswith("dev-py:$7$101$")

    async with MqttTransport(fleet.config("dev-py")) as client:
        await client.publish(device_state_topic(FLEET, "dev-py"), b"x", qos=1)


# --- authorisation (ACL) -------------------------------------------------------------------------


async def test_device_cannot_publish_to_other_devices_or_model_or_server_topics(
    fleet: SecureFleet,
) -> None:
    forbidden = [
        update_topic(FLEET, "dev-b", 1),
        device_state_topic(FLEET, "dev-b"),
        manifest_topic(FLEET),
        model_chunk_topic(FLEET, 1, 0),
        server_state_topic(FLEET),
        "edgefl/v1/otherfleet/device/dev-a/update/1",
    ]
    marker = update_topic(FLEET, "dev-a", 99)

    agg_cfg = fleet.config("aggregator", client_id="agg-acl")
    async with MqttTransport(agg_cfg) as agg, MqttTransport(fleet.config("dev-a")) as dev:
        await agg.subscribe(updates_filter(FLEET))
        await agg.subscribe(f"edgefl/v1/{FLEET}/device/+/state")
        await agg.subscribe(f"edgefl/v1/{FLEET}/model/#")
        await agg.subscribe(f"edgefl/v1/{FLEET}/server/#")
        refused = 0
        for topic in forbidden:
            try:
                await dev.publish(topic, b"evil", qos=1)
            except BrokerRefused:
                refused += 1  # MQTT 5: PUBACK "not authorized"
        await dev.publish(marker, b"ok", qos=1)
        got = await _collect_until(agg, marker)
        assert got == [marker]  # nothing forbidden got through, the allowed one did
        # MQTT 5: every denied publish is reported (PUBACK "Not authorized"); 3.1.1 cannot
        assert refused == (len(forbidden) if dev.statistics().protocol == "5" else 0)


async def test_device_cannot_read_other_devices_updates(fleet: SecureFleet) -> None:
    async with (
        MqttTransport(fleet.config("dev-a")) as a,
        MqttTransport(fleet.config("dev-b")) as b,
    ):
        # Mosquitto 2.0 grants the subscription but checks "read" on every delivery.
        with contextlib.suppress(BrokerRefused):
            await b.subscribe(updates_filter(FLEET))
        await a.publish(update_topic(FLEET, "dev-a", 1), b"private", qos=1)
        assert await _collect(b, 0.5) == []


@pytest.mark.parametrize("leaf", [receipt_topic, lease_topic])
async def test_only_the_aggregator_publishes_receipts_and_leases_and_each_device_reads_its_own(
    fleet: SecureFleet, leaf: Callable[[str, str], str]
) -> None:
    own, other = leaf(FLEET, "dev-a"), leaf(FLEET, "dev-b")
    agg_cfg = fleet.config("aggregator", client_id="agg-receipts")
    async with (
        MqttTransport(agg_cfg) as agg,
        MqttTransport(fleet.config("dev-a")) as a,
        MqttTransport(fleet.config("dev-b")) as b,
    ):
        await agg.subscribe(own.replace("/dev-a/", "/+/"))
        await a.subscribe(own)
        with contextlib.suppress(BrokerRefused):  # granted, but "read" is checked on delivery
            await b.subscribe(own)
        # devices cannot forge receipts, not even their own
        for topic in (own, other):
            with contextlib.suppress(BrokerRefused):
                await a.publish(topic, b"forged", qos=1)
        await agg.publish(own, b"genuine", qos=1)
        assert [(m.topic, m.payload) for m in await _collect(a, 0.5)] == [(own, b"genuine")]
        assert [m.payload for m in await _collect(agg, 0.3)] == [b"genuine"]  # no forgery
        assert await _collect(b, 0.3) == []


async def test_a_device_checks_in_only_as_itself_and_only_the_aggregator_reads_check_ins(
    fleet: SecureFleet,
) -> None:
    agg_cfg = fleet.config("aggregator", client_id="agg-checkins")
    async with (
        MqttTransport(agg_cfg) as agg,
        MqttTransport(fleet.config("dev-a")) as a,
        MqttTransport(fleet.config("dev-b")) as b,
    ):
        await agg.subscribe(checkins_filter(FLEET))
        with contextlib.suppress(BrokerRefused):  # granted, but "read" is checked on delivery
            await b.subscribe(checkins_filter(FLEET))
        with contextlib.suppress(BrokerRefused):
            await a.publish(checkin_topic(FLEET, "dev-b"), b"forged", qos=1)
        await a.publish(checkin_topic(FLEET, "dev-a"), b"mine", qos=1)
        got = [(m.topic, m.payload) for m in await _collect(agg, 0.5)]
        assert got == [(checkin_topic(FLEET, "dev-a"), b"mine")]
        assert await _collect(b, 0.3) == []


async def test_device_reads_its_fleets_models_and_verifies_the_signature(
    fleet: SecureFleet,
) -> None:
    signer = load_signer(fleet.layout.aggregator_signing_key)
    verifier = load_manifest_verifier(fleet.layout.device_dir("dev-b") / "aggregator.pub")
    forged = Ed25519Signer(generate_private_key())

    async with MqttTransport(fleet.config("aggregator")) as agg:
        await agg.publish(manifest_topic(FLEET), _manifest(3, signer=signer), retain=True)
        await agg.publish(model_chunk_topic(FLEET, 3, 0), b"chunk", retain=True)
    async with MqttTransport(fleet.config("dev-b")) as dev:
        await dev.subscribe(f"edgefl/v1/{FLEET}/model/#")
        got = {m.topic: m.payload for m in await _collect(dev, 1.0)}
        assert set(got) == {manifest_topic(FLEET), model_chunk_topic(FLEET, 3, 0)}
        verifier.verify(got[manifest_topic(FLEET)])
        assert decode_message(got[manifest_topic(FLEET)], ModelManifest).version == 3
    # Someone holding the aggregator's MQTT password but not its signing key (or a broker
    # that was tampered with) publishes a manifest: it reaches devices, but does not verify.
    async with MqttTransport(fleet.config("aggregator")) as agg:
        await agg.publish(manifest_topic(FLEET), _manifest(4, signer=forged), retain=True)
    async with MqttTransport(fleet.config("dev-b")) as dev:
        await dev.subscribe(manifest_topic(FLEET))
        (message,) = await _collect(dev, 1.0)
        with pytest.raises(ProtocolError) as err:
            verifier.verify(message.payload)
        assert err.value.reason is RejectReason.BAD_SIGNATURE
        tampered = _manifest(4, signer=None)  # unsigned
        with pytest.raises(ProtocolError):
            verifier.verify(tampered)


async def test_monitor_reads_everything_and_publishes_nothing(fleet: SecureFleet) -> None:
    state = DeviceState(fleet=FLEET, device_id="dev-a", status=DeviceStatus.IDLE, session=1, at=1)

    async with (
        MqttTransport(fleet.config("monitor")) as mon,
        MqttTransport(fleet.config("dev-a")) as dev,
    ):
        await mon.subscribe(f"edgefl/v1/{FLEET}/device/+/state")
        with contextlib.suppress(BrokerRefused):
            await mon.publish(device_state_topic(FLEET, "dev-b"), b"evil")
        marker = device_state_topic(FLEET, "dev-a")
        await dev.publish(marker, encode_message(state))
        got = await _collect_until(mon, marker)
        assert got[-1] == marker
        assert device_state_topic(FLEET, "dev-b") not in got


# --- signed updates through the broker -----------------------------------------------------------


async def test_forged_and_tampered_updates_are_rejected_by_the_authenticator(
    fleet: SecureFleet,
) -> None:
    auth = load_update_authenticator(fleet.layout.device_keys_dir)
    dev_a = load_signer(fleet.layout.device_dir("dev-a") / "signing.key")
    thief = Ed25519Signer(generate_private_key())  # has dev-a's MQTT password, not its key
    genuine = _update("dev-a", 1, signer=dev_a)
    forged = _update("dev-a", 2, signer=thief)
    unsigned = _update("dev-a", 3, signer=None)
    tampered = bytearray(_update("dev-a", 4, signer=dev_a))
    tampered[-80] ^= 0xFF  # a payload byte: CRC now fails
    tampered_fixed = bytearray(_update("dev-a", 5, signer=dev_a))
    tampered_fixed[60:61] = b"9" if tampered_fixed[60:61] != b"9" else b"8"
    struct.pack_into(">I", tampered_fixed, len(tampered_fixed) - 4, zlib.crc32(tampered_fixed[:-4]))
    sent = [genuine, forged, unsigned, bytes(tampered), bytes(tampered_fixed)]

    async def main() -> list[bytes]:
        async with (
            MqttTransport(fleet.config("aggregator")) as agg,
            MqttTransport(fleet.config("dev-a")) as dev,
        ):
            await agg.subscribe(updates_filter(FLEET))
            for seq, data in enumerate(sent, start=1):
                await dev.publish(update_topic(FLEET, "dev-a", seq), data)
            got = await _collect(agg, 1.0)
            return [m.payload for m in got]

    received = await main()
    assert received == sent  # the broker lets the device publish on its own topics...
    outcomes: list[str] = []
    for data in received:  # ...and the aggregator's checks decide
        try:
            header, _ = decode_update(data)
            auth.authenticate(header, data)
            outcomes.append("accepted")
        except UpdateRejected as exc:
            outcomes.append(exc.reason.value)
        except ProtocolError as exc:
            outcomes.append(exc.reason.value)
    assert outcomes == [
        "accepted",
        "bad_signature",
        "bad_signature",
        "bad_checksum",
        outcomes[4],
    ]
    assert outcomes[4] in ("bad_signature", "bad_header")


# --- mutual TLS ---------------------------------------------------------------------------------


async def test_mutual_tls_config_takes_identity_from_certificate_and_applies_the_acl(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    broker = _start(tmp_path, fleet.layout, mtls=True)
    bundle = fleet.layout.device_dir("dev-a")
    url = f"mqtts://localhost:{broker.port}"
    common = {"ca_file": fleet.ca, "start_timeout": 5.0, "reconnect_min_delay": 0.2}
    agg_dir = fleet.layout.aggregator_dir
    marker = update_topic(FLEET, "dev-a", 7)

    try:
        no_cert = MqttConfig.from_url(url, **{**common, "start_timeout": 2.0})
        with pytest.raises(NotConnectedError):
            async with MqttTransport(no_cert):
                pass
        dev_cfg = MqttConfig.from_url(
            url, cert_file=bundle / "client.pem", key_file=bundle / "client.key", **common
        )
        agg_cfg = MqttConfig.from_url(
            url, cert_file=agg_dir / "client.pem", key_file=agg_dir / "client.key", **common
        )
        async with MqttTransport(agg_cfg) as agg, MqttTransport(dev_cfg) as dev:
            await agg.subscribe(updates_filter(FLEET))
            with contextlib.suppress(BrokerRefused):
                await dev.publish(update_topic(FLEET, "dev-b", 7), b"evil")
            await dev.publish(marker, b"ok")
            assert await _collect_until(agg, marker) == [marker]
    finally:
        broker.stop()
