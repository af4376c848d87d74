"""Helpers shared by the receipt tests (unit and integration): an agent configuration on a fake
sysfs tree, real spooled updates, and MemoryBroker plumbing."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from agent_helpers import DEVICE, FLEET, MODEL, SPEC, digits_dataset, make_config
from numpy.typing import NDArray

from device_agent.agent import DeviceAgent
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
from edgefl.protocol.messages import UpdateMeta
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


def spool_updates(tmp: Path, n: int) -> dict[int, tuple[NDArray[np.float32], bytes]]:
    """``n`` real fp32 updates in the agent's spool, as after training offline; returns each
    one's delta and envelope by seq."""
    manifest = model_release(FLEET, 0, MODEL, init_weights_numpy(SPEC, 0)).manifest
    rng = np.random.default_rng(0)
    spooled = {}
    with UpdateSpool(tmp / "state/spool") as spool:
        for _ in range(n):
            seq = spool.next_seq()
            delta = rng.normal(size=SPEC.num_params).astype(np.float32)
            meta = UpdateMeta(FLEET, DEVICE, seq, manifest.version, 10, MODEL, time.time())
            built = build_update(
                TrainResult(delta, 10),
                meta,
                manifest=manifest,
                codec=CodecConfig(quantization=Quantization.FP32),
                residual=None,
                rng=rng,
            )
            spool.put(seq, built.envelope, {})
            spooled[seq] = (delta, built.envelope)
    return spooled


def spooled_agent(tmp: Path, url: str, n: int) -> DeviceAgent:
    """A real agent on battery with ``n`` updates in its spool and receipts on (an hour's
    timeout: only a reconnect resends), reconnecting within 1 s."""
    config = receipts_config(tmp, url=url, timeout_s=3600.0, reconnect_max_s=1.0)
    spool_updates(tmp, n)
    return DeviceAgent(config, dataset=dataset())
