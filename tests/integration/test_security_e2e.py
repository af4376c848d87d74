"""End to end on the secure broker: the real aggregator and a real agent with `edgefl provision`
files, attacked by someone who stole MQTT passwords but not signing keys.

One scenario (one broker, aggregator and agent, to keep it lean):

1. the agent, configured from its provisioned bundle (TLS, password, ACL, signing key, the
   aggregator's public key), fetches the signed v0 and sends one signed update, which the
   aggregator (FedBuff K=2, device-keys directory) authenticates and accepts;
2. with the device's password, the attacker replays that update (captured by a monitor account)
   and publishes a forged one (another key, a higher seq) and an unsigned one: the aggregator
   rejects each and counts it (``duplicate``/``replay``, ``bad_signature``), as well as garbage
   (``bad_magic``, ``truncated``), keeps running, and accepts nothing but the genuine update;
3. with the aggregator's password, the attacker publishes a forged manifest v7 (signed by another
   key, with matching chunks) and a tampered copy of the genuine manifest: the running agent
   rejects both (``bad_signature``) and keeps v0.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
import zlib
from pathlib import Path

import needs
import numpy as np
import pytest
from sklearn.datasets import load_digits
from waiting import eventually

import device_agent.agent as device_agent
import edgefl.aggregator as aggregator_mod
from edgefl.errors import RejectReason
from edgefl.protocol.chunking import split_message
from edgefl.protocol.envelope import EnvelopeKind
from edgefl.protocol.messages import (
    ModelFormat,
    ModelManifest,
    UpdateHeader,
    decode_message,
    decode_update,
    encode_message,
)
from edgefl.protocol.topics import manifest_topic, model_chunk_topic, update_topic, updates_filter
from edgefl.security import Ed25519Signer, generate_private_key, load_signer
from edgefl.security.provision import FleetDirectory, add_device, init_fleet, mosquitto_for_fleet
from edgefl.transport import InboundMessage, MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

FLEET, DEVICE, MODEL = "vineyard", "pi-1", "digits-mlp"


def _fake_sysfs(root: Path) -> None:
    """An idle, cool, mains-powered 2-CPU machine for the eligibility probes."""
    (root / "proc").mkdir(parents=True)
    (root / "proc/loadavg").write_text("0.00 0.00 0.00 1/100 1\n")
    (root / "proc/cpuinfo").write_text("processor : 0\nprocessor : 1\n")
    ac = root / "sys/class/power_supply/AC"
    ac.mkdir(parents=True)
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("1\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("40000\n")


def _forged_model(signer: Ed25519Signer, version: int) -> list[tuple[str, bytes]]:
    """A complete, self-consistent model v``version`` (manifest + chunk) signed by ``signer``."""
    from edgefl.models.spec import get_model_spec

    spec = get_model_spec(MODEL)
    weights = np.full(spec.num_params, 0.5, dtype=np.float32).tobytes()
    chunks = split_message(weights, kind=EnvelopeKind.MODEL_CHUNK)
    manifest = ModelManifest(
        fleet=FLEET,
        version=version,
        model=MODEL,
        format=ModelFormat.FP32_FLAT,
        sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights),
        chunk_size=chunks.chunk_size,
        num_chunks=chunks.count,
        num_params=spec.num_params,
        created_at=time.time(),
    )
    out = [(model_chunk_topic(FLEET, version, i), p) for i, p in enumerate(chunks.packets)]
    return [*out, (manifest_topic(FLEET), encode_message(manifest, signer=signer))]


class SecureFleet:
    """A provisioned fleet on its TLS broker: the URL, the CA and each account's password."""

    def __init__(self, layout: FleetDirectory, bundle: Path, port: int) -> None:
        self.layout, self.bundle = layout, bundle
        self.url = f"mqtts://localhost:{port}"
        self.ca = layout.broker_dir / "ca.pem"
        self.passwords = {
            "aggregator": (layout.aggregator_dir / "mqtt-password").read_text().strip(),
            DEVICE: (bundle / "mqtt-password").read_text().strip(),
            "monitor": (layout.monitor_dir / "mqtt-password").read_text().strip(),
        }

    def creds(self, user: str) -> MqttConfig:
        return MqttConfig.from_url(
            self.url,
            username=user,
            password=self.passwords[user],
            ca_file=self.ca,
            start_timeout=10.0,
        )

    def aggregator(self, state_dir: Path) -> aggregator_mod.Aggregator:
        """FedBuff K=2 authenticating updates with the device-keys directory, signing models."""
        from edgefl.security import load_update_authenticator

        return aggregator_mod.Aggregator(
            aggregator_mod.AggregatorConfig.build(
                broker_url=self.url,
                fleet=FLEET,
                model=MODEL,
                state_dir=state_dir,
                buffer_size=2,
                fsync=False,
                username="aggregator",
                password=self.passwords["aggregator"],
                ca_file=self.ca,
                authenticator=load_update_authenticator(self.layout.device_keys_dir),
                manifest_signer=load_signer(self.layout.aggregator_signing_key),
            )
        )

    def agent(self, tmp_path: Path) -> device_agent.DeviceAgent:
        """The agent configured from its provisioned bundle, on an idle fake machine."""
        from device_agent.config import load_config
        from device_agent.dataset import LocalDataset

        _fake_sysfs(tmp_path / "fs")
        (tmp_path / "train.npz").write_bytes(b"unused: the dataset is passed in")
        config = load_config(
            self.bundle / "agent.toml",
            {},
            {
                "broker.url": self.url,
                "broker.reconnect_max_s": 2.0,
                "data.path": str(tmp_path / "train.npz"),
                "state_dir": str(tmp_path / "agent"),
                "probes.root": str(tmp_path / "fs"),
                "probes.metered": "no",
                "probes.interval_s": 1.0,
            },
        )
        digits = load_digits()
        x = (digits.data[:200] / 16.0).astype(np.float32)
        data = LocalDataset.split(x, digits.target[:200].astype(np.int64), 0.2, seed=1)
        return device_agent.DeviceAgent(config, dataset=data)


async def attack_with_device_password(
    fleet: SecureFleet, genuine: InboundMessage, thief: Ed25519Signer
) -> None:
    """Replay the genuine update, publish a forged (thief-signed) and an unsigned one, and
    garbage (bad magic, truncated): five rejections."""
    header, _ = decode_update(genuine.payload)
    forged_header = UpdateHeader(**{**header.__dict__, "seq": header.seq + 1000})
    unsigned = UpdateHeader(**{**header.__dict__, "seq": header.seq + 2000})
    async with MqttTransport(fleet.creds(DEVICE)) as stolen:
        await stolen.publish(genuine.topic, genuine.payload)
        await stolen.publish(
            update_topic(FLEET, DEVICE, forged_header.seq),
            encode_message(forged_header, b"\x00" * 8, signer=thief),
        )
        await stolen.publish(
            update_topic(FLEET, DEVICE, unsigned.seq), encode_message(unsigned, b"\x00")
        )
        # and plain garbage: counted, and the aggregator keeps running
        await stolen.publish(update_topic(FLEET, DEVICE, 5000), b"garbage!" * 4)
        await stolen.publish(update_topic(FLEET, DEVICE, 5001), b"EDFL\x01")


def tampered_manifest(genuine: bytes) -> bytes:
    """The genuine manifest claiming version 8, its CRC fixed (only the signature is wrong)."""
    tampered = bytearray(genuine)
    at = tampered.index(b'"version":0')
    tampered[at : at + 11] = b'"version":8'
    struct.pack_into(">I", tampered, len(tampered) - 4, zlib.crc32(tampered[:-4]))
    return bytes(tampered)


async def attack_with_aggregator_password(
    fleet: SecureFleet, genuine_manifest: InboundMessage, thief: Ed25519Signer
) -> None:
    """Publish a forged model v7 (thief-signed) and a tampered genuine manifest, retained."""
    async with MqttTransport(fleet.creds("aggregator")) as stolen_agg:
        for topic, payload in _forged_model(thief, 7):
            await stolen_agg.publish(topic, payload, retain=True)
        await stolen_agg.publish(
            manifest_topic(FLEET), tampered_manifest(genuine_manifest.payload), retain=True
        )


async def test_forged_models_and_forged_or_replayed_updates_are_rejected_by_running_services(
    tmp_path: Path,
) -> None:
    needs.mosquitto()

    # --- Arrange: provisioned fleet, secure broker, aggregator and agent from the files
    layout: FleetDirectory = init_fleet(tmp_path / "fleet", FLEET, ["localhost"])
    bundle = add_device(layout.root, DEVICE).directory
    broker = mosquitto_for_fleet(layout, tmp_path / "mosquitto")
    broker.start()
    fleet = SecureFleet(layout, bundle, broker.port)
    aggregator = fleet.aggregator(tmp_path / "aggregator")
    agent = fleet.agent(tmp_path)
    thief = Ed25519Signer(generate_private_key())
    captured: list[InboundMessage] = []

    try:
        ready = asyncio.Event()
        agg_task = asyncio.create_task(aggregator.run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        async with MqttTransport(fleet.creds("monitor")) as monitor:
            await monitor.subscribe(updates_filter(FLEET))
            await monitor.subscribe(manifest_topic(FLEET))
            agent_task = asyncio.create_task(agent.run())

            async def sniff() -> None:
                async for message in monitor.messages():
                    captured.append(message)

            sniffer = asyncio.create_task(sniff())
            # 1. genuine path: signed v0 accepted by the agent, signed update by the aggregator
            await eventually(lambda: aggregator.statistics().applied >= 1, 60)
            assert agent.statistics().model_version == 0
            await eventually(lambda: any("/update/" in m.topic for m in captured), 10)

            # 2. stolen device password: replay, forgery, unsigned
            (genuine,) = [m for m in captured if "/update/" in m.topic]
            await attack_with_device_password(fleet, genuine, thief)
            await eventually(lambda: aggregator.statistics().rejected_total >= 5, 20)
            assert aggregator.statistics().link.connected

            # 3. stolen aggregator password: forged model v7 and a tampered genuine manifest
            (genuine_manifest,) = [m for m in captured if m.topic == manifest_topic(FLEET)][:1]
            await attack_with_aggregator_password(fleet, genuine_manifest, thief)
            await eventually(
                lambda: agent.statistics().rejected.get(RejectReason.BAD_SIGNATURE.value, 0) >= 2,
                20,
            )
            await asyncio.sleep(0.5)  # give a wrongly accepted model time to show up
            sniffer.cancel()
            agent.stop()
            await agent_task
        aggregator.stop()
        await agg_task
    finally:
        broker.stop()

    # --- Assert
    assert_aggregator_accepted_only_the_genuine_update(aggregator)
    assert_agent_kept_the_genuine_model(agent, captured)


def assert_aggregator_accepted_only_the_genuine_update(
    aggregator: aggregator_mod.Aggregator,
) -> None:
    agg_stats = aggregator.statistics()
    assert agg_stats.applied == 1  # only the genuine update
    assert agg_stats.rejected.get("bad_signature", 0) == 2  # forged + unsigned
    assert agg_stats.rejected.get("duplicate", 0) + agg_stats.rejected.get("replay", 0) == 1
    assert agg_stats.rejected.get("bad_magic") == 1
    assert agg_stats.rejected.get("truncated") == 1


def assert_agent_kept_the_genuine_model(
    agent: device_agent.DeviceAgent, captured: list[InboundMessage]
) -> None:
    agent_stats = agent.statistics()
    assert agent_stats.model_version == 0  # kept the genuine model
    assert agent_stats.rejected == {"bad_signature": 2}
    assert agent_stats.manifests_accepted == 1
    held = decode_message(
        next(m.payload for m in captured if m.topic == manifest_topic(FLEET)), ModelManifest
    )
    assert held.version == 0
