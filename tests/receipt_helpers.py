"""Helpers shared by the receipt tests (unit and integration): an agent configuration on a fake
sysfs tree, real spooled updates, and MemoryBroker plumbing."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from agent_helpers import DEVICE, FLEET, MODEL, SPEC, digits_dataset, make_config

from device_agent.config import (
    AgentConfig,
    BrokerConfig,
    ReceiptMode,
    SpoolConfig,
)
from device_agent.release import model_release
from device_agent.spool import UpdateSpool
from device_agent.trainer import TrainResult
from device_agent.updates import build_update
from edgefl.codec import CodecConfig, Quantization
from edgefl.models.spec import init_weights_numpy
from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport, OnConnect, Will
from firmware_sim.fake_sysfs import write_fake_sysfs


def write_tree(root: Path) -> None:
    """A device on battery: it never trains, it only sends its spool."""
    write_fake_sysfs(root, mains=False)


dataset = digits_dataset


def receipts_config(
    tmp: Path,
    mode: ReceiptMode = ReceiptMode.ON,
    *,
    url: str = "mqtt://127.0.0.1:1",
    timeout_s: float = 0.2,
    reconnect_max_s: float = 30.0,
) -> AgentConfig:
    """An agent on battery (only its spool is sent) with receipts ``mode``, a short timeout."""
    config = make_config(tmp)
    write_tree(tmp / "fs")
    return dataclasses.replace(
        config,
        broker=BrokerConfig(url, reconnect_max_s=reconnect_max_s),
        spool=SpoolConfig(
            receipts=mode, receipt_timeout_s=timeout_s, resend_max_s=max(timeout_s, 0.2)
        ),
    )


def spool_updates(tmp: Path, n: int) -> None:
    """``n`` real updates in the agent's spool, as after training offline."""
    manifest = model_release(FLEET, 0, MODEL, init_weights_numpy(SPEC, 0)).manifest
    rng = np.random.default_rng(0)
    with UpdateSpool(tmp / "state/spool") as spool:
        for _ in range(n):
            seq = spool.next_seq()
            built = build_update(
                TrainResult(rng.normal(size=SPEC.num_params).astype(np.float32), 10),
                manifest=manifest,
                fleet=FLEET,
                device_id=DEVICE,
                seq=seq,
                codec=CodecConfig(quantization=Quantization.FP32),
                residual=None,
                rng=rng,
                created_at=time.time(),
            )
            spool.put(seq, built.envelope, {})


def factory(broker: MemoryBroker):  # type: ignore[no-untyped-def]
    def make(will: Will, on_connect: OnConnect) -> MemoryTransport:
        return MemoryTransport(broker, DEVICE, will=will, on_connect=on_connect)

    return make


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
