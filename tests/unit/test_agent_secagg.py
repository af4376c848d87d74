"""The device agent under secure aggregation (MemoryBroker): when the server state announces it,
a finished training goes out as two shares, never as an UPDATE; with another helper key than its
own configuration's, the agent sends nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import (
    DEVICE,
    FLEET,
    MODEL,
    SPEC,
    make_config,
    publish_model,
    running,
    server_state,
)
from waiting import eventually

from device_agent.config import AgentConfig, SecurityConfig
from device_agent.secagg import SecAggUnavailable, SecAggUplink, pack, unpack
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope
from edgefl.protocol.messages import SecAggShareHeader, decode_message, encode_message
from edgefl.protocol.topics import all_fleet_filter, server_state_topic
from edgefl.secagg import (
    HelperConfig,
    HelperKeys,
    LeaderConfig,
    RingSpec,
    SecAggHelper,
    SecAggLeader,
)
from edgefl.secagg.wire import secagg_info
from edgefl.transport import MemoryBroker

RING = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=1, w_max=1)


def _announce(broker: MemoryBroker, keys: HelperKeys) -> None:
    state = dataclasses.replace(
        server_state(("secagg",), None), secagg=secagg_info(RING, keys.public_key)
    )
    broker.publish(server_state_topic(FLEET), encode_message(state), 1, True)


def _config(tmp_path: Path, keys: HelperKeys) -> AgentConfig:
    key_file = tmp_path / "helper.pub.pem"
    key_file.write_bytes(keys.public_pem())
    cfg = make_config(tmp_path)
    return dataclasses.replace(cfg, security=SecurityConfig(helper_public_key_file=key_file))


async def test_agent_sends_two_shares_that_decode_to_its_clipped_update(tmp_path: Path) -> None:
    # Arrange
    keys = HelperKeys.generate()
    broker = MemoryBroker()
    _announce(broker, keys)
    publish_model(broker, 0)

    async with running(broker, _config(tmp_path, keys), all_fleet_filter(FLEET)) as (agent, seen):
        # Act
        await eventually(lambda: agent.statistics().updates_sent == 1)

    # Assert: one share, one seed, no UPDATE
    mine = [m for m in seen if f"/{DEVICE}/" in m.topic and "/state" not in m.topic]
    assert [m.topic.split("/")[3:5] for m in mine] == [["secagg", "share"], ["secagg", "seed"]]
    share_env = decode_envelope(mine[0].payload, max_payload=1 << 20)
    seed_env = decode_envelope(mine[1].payload, max_payload=1 << 20)
    assert (share_env.kind, seed_env.kind) == (EnvelopeKind.SECAGG_SHARE, EnvelopeKind.SECAGG_SEED)
    header = decode_message(mine[0].payload, SecAggShareHeader, max_payload=1 << 20)
    assert (header.seq, header.base_version, header.num_params) == (0, 0, SPEC.num_params)
    # the two roles recover the update: clipped to C, not zero
    helper = SecAggHelper(HelperConfig(RING, SPEC.num_params, FLEET, MODEL, min_members=1), keys)
    leader = SecAggLeader(LeaderConfig(RING, SPEC.num_params, 1, 1, min_members=1))
    key = (DEVICE, 0)
    report = helper.receive_sealed(key, bytes(seed_env.payload), 0.0)
    assert report is not None
    assert report.ok
    leader.receive_masked(key, bytes(share_env.payload), 1, 0.0)
    leader.helper_report(report, 0.0)
    total = leader.combine(helper.apply(leader.decide())).total
    assert 0.0 < float(np.linalg.norm(total)) <= 1.0 + 1e-5


async def test_agent_with_another_helper_key_sends_nothing(tmp_path: Path) -> None:
    # Arrange: the server state announces a key that is not the configured one
    broker = MemoryBroker()
    _announce(broker, HelperKeys.generate())
    publish_model(broker, 0)
    cfg = _config(tmp_path, HelperKeys.generate())

    async with running(broker, cfg, all_fleet_filter(FLEET)) as (agent, seen):
        # Act
        await eventually(lambda: agent.statistics().dropped.get("encode_failed", 0) == 1)

    # Assert
    assert not [m for m in seen if "/secagg/" in m.topic or "/update/" in m.topic]
    assert agent.statistics().updates_sent == 0


def test_uplink_refuses_without_a_key_and_spool_entries_round_trip() -> None:
    uplink = SecAggUplink(None)
    assert not uplink.required
    with pytest.raises(SecAggUnavailable, match="not announced"):
        uplink.spec()
    state = dataclasses.replace(
        server_state(("secagg",), None), secagg=secagg_info(RING, HelperKeys.generate().public_key)
    )
    uplink.on_server_state(state)
    assert uplink.required
    with pytest.raises(SecAggUnavailable, match="helper_public_key_file"):
        uplink.spec()
    uplink.on_server_state(server_state((), None))  # an aggregator without secagg again
    assert not uplink.required
    assert unpack(pack(b"EDFLshare", b"EDFLseed")) == (b"EDFLshare", b"EDFLseed")
    with pytest.raises(ValueError, match="share pair"):
        unpack(b"EDFL...")
