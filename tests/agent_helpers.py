"""Helpers shared by the device agent's MemoryBroker tests: an eligible agent configuration on a
fake sysfs tree, digits data, model releases, a transport factory and a gated real trainer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.datasets import load_digits

from device_agent.agent import DeviceAgent
from device_agent.config import (
    AgentConfig,
    BrokerConfig,
    DataConfig,
    DataKind,
    ProbeConfig,
    ReceiptMode,
    SecurityConfig,
    SpoolConfig,
)
from device_agent.dataset import LocalDataset
from device_agent.eligibility import EligibilityPolicy, MeteredSource
from device_agent.release import model_release
from device_agent.trainer import TorchTrainer, TrainJob, TrainResult
from edgefl.codec import CodecDescriptor, open_update
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.protocol.messages import (
    Participation,
    ServerState,
    ServerStatus,
    UpdateHeader,
    decode_update,
)
from edgefl.security import generate_private_key, write_private_key, write_public_key
from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport, OnConnect, Will
from firmware_sim.fake_sysfs import write_fake_sysfs

FLEET, DEVICE, MODEL = "farm", "pi-1", "digits-mlp"
SPEC = get_model_spec(MODEL)


def make_config(tmp: Path) -> AgentConfig:
    write_fake_sysfs(tmp / "fs")
    return AgentConfig(
        broker=BrokerConfig("mqtt://127.0.0.1:1"),
        fleet=FLEET,
        device_id=DEVICE,
        data=DataConfig(kind=DataKind.NPZ, path=tmp / "unused.npz"),
        probes=ProbeConfig(
            root=tmp / "fs", metered=MeteredSource.NO, throttle=False, interval_s=1.0
        ),
        eligibility=EligibilityPolicy(),
        state_dir=tmp / "state",
        spool=SpoolConfig(receipts=ReceiptMode.OFF),  # protocol 1.0: no aggregator here
    )


def digits_dataset() -> LocalDataset:
    d = load_digits()
    x = (d.data[:200] / 16.0).astype(np.float32)
    return LocalDataset.split(x, d.target[:200].astype(np.int64), 0.2, seed=3)


DATA = digits_dataset()


def publish_model(broker: MemoryBroker, version: int, seed: int = 0) -> None:
    release = model_release(FLEET, version, MODEL, init_weights_numpy(SPEC, seed))
    for topic, payload in release.messages:
        broker.publish(topic, payload, 1, True)


def decoded_update(payload: bytes) -> tuple[UpdateHeader, np.ndarray]:
    """An UPDATE envelope's header and its delta, decoded to a dense float32 vector."""
    header, body = decode_update(payload)
    dense = open_update(
        CodecDescriptor.from_dict(header.codec),
        body,
        num_params=SPEC.num_params,
        max_decompressed=1 << 24,
    ).to_dense()
    return header, dense


def factory(broker: MemoryBroker, made: list[MemoryTransport] | None = None):  # type: ignore[no-untyped-def]
    def make(will: Will, on_connect: OnConnect) -> MemoryTransport:
        transport = MemoryTransport(broker, DEVICE, will=will, on_connect=on_connect)
        if made is not None:
            made.append(transport)
        return transport

    return make


class GateTrainer:
    """A Trainer that waits (polling ``should_stop``, as the contract requires) until the test
    opens the gate, then trains for real; the simulator wraps trainers the same way. With
    ``polls=False`` it is a thread busy where it cannot poll: it neither polls while it waits
    nor stops training, so it returns an update even after an abort."""

    def __init__(self, *, polls: bool = True) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.inner = TorchTrainer()
        self.polls = polls

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        self.entered.set()
        if not self.polls:
            self.gate.wait(30)
            return self.inner.train(job, lambda: False)
        while not self.gate.wait(0.01):
            if should_stop():
                return None
        return self.inner.train(job, should_stop)


class RecordingTrainer:
    """Real torch training that keeps every raw delta (what must never leave the device under
    local DP)."""

    def __init__(self) -> None:
        self.inner = TorchTrainer()
        self.deltas: list[np.ndarray] = []
        self.lock = threading.Lock()

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        result = self.inner.train(job, should_stop)
        if result is not None:
            with self.lock:
                self.deltas.append(np.array(result.delta, dtype=np.float32, copy=True))
        return result


def server_state(
    features: tuple[str, ...], participation: Participation | None, session: int = 1
) -> ServerState:
    """An online aggregator's state at version 0 announcing ``features`` and ``participation``
    (session ``session``, buffer 0/10, nothing applied, started at 1.0, published at 2.0)."""
    online = ServerStatus.ONLINE
    state = ServerState(FLEET, online, session, 0, 0, 10, 0, 1.0, 2.0, features=features)
    return dataclasses.replace(state, participation=participation)


async def collect(
    broker: MemoryBroker, topic_filter: str
) -> tuple[list[InboundMessage], Callable[[], Awaitable[None]]]:
    """Subscribe an observer; returns the list it fills and a function that stops it."""
    observer = MemoryTransport(broker, "observer")
    await observer.connect()
    await observer.subscribe(topic_filter)
    seen: list[InboundMessage] = []

    async def pump() -> None:
        async for message in observer.messages():
            seen.append(message)

    task = asyncio.create_task(pump())

    async def stop() -> None:
        await observer.close()
        await task

    return seen, stop


@contextlib.asynccontextmanager
async def running(
    broker: MemoryBroker, config: AgentConfig, observe: str, **kwargs: Any
) -> AsyncIterator[tuple[DeviceAgent, list[InboundMessage]]]:
    """A running agent on ``broker`` (the digits data, this broker's transports, ``kwargs``
    for the rest), and what an observer of ``observe`` sees until the agent stopped."""
    seen, stop_observer = await collect(broker, observe)
    options: dict[str, Any] = {"dataset": DATA, "transport_factory": factory(broker), **kwargs}
    agent = DeviceAgent(config, **options)
    run = asyncio.create_task(agent.run())
    try:
        yield agent, seen
    finally:
        agent.stop()
        await run
        await stop_observer()


@dataclass(frozen=True)
class Keys:
    """Key pairs of a signed deployment: the aggregator's, the device's, and a stranger's."""

    aggregator: Ed25519PrivateKey
    device: Ed25519PrivateKey
    stranger: Ed25519PrivateKey


def signed_config(tmp: Path) -> tuple[AgentConfig, Keys]:
    """:func:`make_config` with a device signing key and the aggregator's public key (PEM files
    in ``tmp``), and the key pairs."""
    keys = Keys(*(generate_private_key() for _ in range(3)))
    write_public_key(tmp / "aggregator.pub", keys.aggregator.public_key())
    write_private_key(tmp / "device.key", keys.device)
    security = SecurityConfig(
        signing_key_file=tmp / "device.key", aggregator_public_key_file=tmp / "aggregator.pub"
    )
    return dataclasses.replace(make_config(tmp), security=security), keys
