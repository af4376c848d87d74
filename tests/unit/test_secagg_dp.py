"""Central DP at the secure-aggregation leader: the noise on the decoded sum (statistically
``z · W_max · C_q``), the participation cap and the one-update rule (sans-IO and in the service),
the counts surviving a restart of the leader's store, the refused settings."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_secagg_services import FLEET, MODEL, SETTINGS
from test_secagg_services import _config as secagg_config

from edgefl.aggregation import ExampleWeighting, Normalisation
from edgefl.aggregator import AggregatorConfig, NormBoundSetting
from edgefl.aggregator.secagg_config import check_compatible
from edgefl.aggregator.secagg_leader import LeaderService, leader_state_path
from edgefl.aggregator.secagg_store import LeaderStore
from edgefl.errors import RejectReason, UpdateRejected
from edgefl.participation import ParticipationConfig
from edgefl.privacy import CentralDP
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import ServerStatus, encode_message
from edgefl.protocol.topics import secagg_report_topic, secagg_share_topic
from edgefl.secagg import (
    BufferDecision,
    HelperConfig,
    HelperKeys,
    LeaderConfig,
    LeaderPrivacy,
    RingSpec,
    SecAggHelper,
    SecAggLeader,
    SeedReport,
    encode,
    make_shares,
)
from edgefl.secagg.wire import UpdateMeta, build_share_envelopes, coord_partial, coord_report
from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport

KEYS = HelperKeys.generate()
W_MAX = 256


def _dp(**fields: Any) -> CentralDP:
    values: dict[str, Any] = {
        "clip_norm": 1.0,
        "noise_multiplier": 2.0,
        "target_epsilon": None,
        "max_participations": 1,
        "seed": 7,
    }
    return CentralDP(**(values | fields))


# -- the core: noise, admission ----------------------------------------------------------------

P, K = 4096, 3
SPEC = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=K, w_max=W_MAX)
HCFG = HelperConfig(spec=SPEC, num_params=P, fleet="lab", model="mlp", seed_timeout=1000.0)


def _combined(noise: Any, buffer_seeds: range) -> list[np.ndarray]:
    """The decoded sums of one buffer of K updates (weight W_MAX each) per seed in
    ``buffer_seeds``, under the leader's ``noise``; the same updates in every buffer."""
    cfg = LeaderConfig(spec=SPEC, num_params=P, buffer_size=K, w_max=W_MAX, noise=noise)
    leader, helper = SecAggLeader(cfg), SecAggHelper(HCFG, KEYS)
    totals = []
    for seq in buffer_seeds:
        for i in range(K):
            rng = np.random.default_rng(i)
            update = rng.standard_normal(P).astype(np.float32) * 0.01
            key = (f"pi-{i}", seq)
            encoded = encode(update, SPEC, rng)
            context = HCFG.context(key)
            shares = make_shares(encoded, SPEC, KEYS.public_key, context, seed=rng.bytes(32))
            leader.receive_masked(key, shares.masked, W_MAX, now=0.0)
            report = helper.receive_sealed(key, shares.sealed, now=0.0)
            assert report is not None
            leader.helper_report(report, now=0.0)
        totals.append(leader.combine(helper.apply(leader.decide())).total)
    return totals


def test_the_leader_adds_noise_of_z_times_w_max_times_the_clip_to_the_decoded_sum() -> None:
    # Arrange: z = 2, C = 1, W_max = 256: sigma = 512 · C_q, C_q = C + rounding
    dp = _dp()
    privacy = LeaderPrivacy(dp, spec=SPEC, num_params=P, w_max=W_MAX)
    expected = 2.0 * W_MAX * 1.0

    # Act: the same two buffers without and with the noise, and again with the same seed
    clean = _combined(None, range(2))
    noisy = _combined(privacy.noise, range(2))
    again = _combined(LeaderPrivacy(dp, spec=SPEC, num_params=P, w_max=W_MAX).noise, range(2))

    # Assert: N(0, sigma^2) per coordinate (P = 4096: the sample std is within 5% w.p. >> 0.999)
    assert privacy.noise.stddev == pytest.approx(expected, rel=1e-3)
    assert privacy.noise.stddev > expected  # it covers the rounding, not only C
    for c, n in zip(clean, noisy, strict=True):
        noise = n - c
        assert abs(float(np.std(noise)) / privacy.noise.stddev - 1.0) < 0.05
        assert abs(float(np.mean(noise))) < 4 * privacy.noise.stddev / math.sqrt(P)
    assert not np.allclose(noisy[0] - clean[0], noisy[1] - clean[1])  # fresh noise per buffer
    assert all(np.array_equal(a, b) for a, b in zip(noisy, again, strict=True))  # seeded


def test_unseeded_noise_differs_between_two_leaders() -> None:
    dp = _dp(seed=None)
    noises = [LeaderPrivacy(dp, spec=SPEC, num_params=P, w_max=W_MAX).noise for _ in range(2)]
    decision = BufferDecision(0, (("a", 1),), (1,))
    draws = []
    for noise in noises:
        total = np.zeros(8)
        noise(total, decision)
        draws.append(total)
    assert not np.array_equal(draws[0], draws[1])


def test_a_device_at_its_cap_is_refused_and_one_update_per_device_is_held() -> None:
    # Arrange: cap 1; the leader holds d0's update (no seed yet)
    privacy = LeaderPrivacy(_dp(), spec=SPEC, num_params=P, w_max=W_MAX)
    cfg = LeaderConfig(spec=SPEC, num_params=P, buffer_size=2, w_max=W_MAX, share_timeout=5.0)
    leader = SecAggLeader(cfg)
    masked = bytes(SPEC.bytes_per_share(P))
    privacy.admit("d0", held=leader.holds("d0"))
    leader.receive_masked(("d0", 1), masked, W_MAX, now=0.0)

    # Act / Assert: a second update of d0 while the first is held
    with pytest.raises(UpdateRejected) as info:
        privacy.admit("d0", held=leader.holds("d0"))
    assert info.value.reason is RejectReason.DP_ONE_PER_BUFFER
    # held while in the open decision too; not after the buffer is released
    for device in ("d0", "d1"):
        leader.helper_report(SeedReport((device, 1), True), now=0.0)
    leader.receive_masked(("d1", 1), masked, W_MAX, now=0.0)
    decision = leader.decide()
    assert leader.holds("d0")
    privacy.release(decision)
    leader.abort(frozenset(decision.members))  # (the decision is closed either way)
    assert not leader.holds("d0")
    # now d0 has taken part in one release: at its cap
    with pytest.raises(UpdateRejected) as info:
        privacy.admit("d0", held=leader.holds("d0"))
    assert info.value.reason is RejectReason.DP_BUDGET_EXHAUSTED
    assert (privacy.participations("d0"), privacy.participations("d2")) == (1, 0)
    privacy.admit("d2", held=leader.holds("d2"))  # a fresh device is admitted


def test_an_excluded_update_no_longer_holds_its_device() -> None:
    cfg = LeaderConfig(spec=SPEC, num_params=P, buffer_size=2, w_max=W_MAX, share_timeout=5.0)
    leader = SecAggLeader(cfg)
    leader.receive_masked(("d0", 1), bytes(SPEC.bytes_per_share(P)), W_MAX, now=0.0)
    leader.expire(now=6.0)  # its seed never came
    assert not leader.holds("d0")


def test_the_ring_clip_must_be_the_dp_clip() -> None:
    with pytest.raises(ValueError, match="not the DP clip"):
        LeaderPrivacy(_dp(clip_norm=0.5), spec=SPEC, num_params=P, w_max=W_MAX)


# -- the service: refusals counted, counts durable with the step -------------------------------

NUM_PARAMS = 2410


def _config(state_dir: Path, **fields: Any) -> AggregatorConfig:
    """The service tests' leader (K = 3) with central DP (cap 1) and a flush after 1 s."""
    dp_fields: dict[str, Any] = {
        "normalisation": Normalisation.SUM,
        "example_weighting": ExampleWeighting.EQUAL,
        "privacy": _dp(),
        "participation": ParticipationConfig(flush_after_s=1.0),
    }
    return secagg_config(state_dir, **(dp_fields | fields))


def _leader(state_dir: Path, transport: MemoryTransport) -> LeaderService:
    service = LeaderService(_config(state_dir), SETTINGS, KEYS.public_key)
    service._restore(LeaderStore(leader_state_path(state_dir), fsync=False))
    service._transport = transport
    return service


class _Fleet:
    """Devices sending share pairs to a leader service, a sans-IO helper answering it."""

    def __init__(self, leader: LeaderService) -> None:
        self.leader = leader
        self.helper = SecAggHelper(HelperConfig(SETTINGS.ring(3), NUM_PARAMS, FLEET, MODEL), KEYS)

    async def send(self, device: str, seq: int) -> None:
        meta = UpdateMeta(FLEET, device, seq, self.leader.version, 10, MODEL, time.time())
        delta = np.full(NUM_PARAMS, 0.001, np.float32)
        built = build_share_envelopes(
            delta, meta, SETTINGS.ring(3), KEYS.public_key, rng=np.random.default_rng(seq)
        )
        topic = secagg_share_topic(FLEET, device, seq)
        await self.leader.handle(InboundMessage(topic, built.share))
        sealed = bytes(decode_envelope(built.seed, max_payload=1024).payload)
        report = self.helper.receive_sealed((device, seq), sealed, 0.0)
        if report is not None:
            msg = encode_message(coord_report(FLEET, report, 0.0))
            await self.leader.handle(InboundMessage(secagg_report_topic(FLEET), msg))

    async def step(self) -> None:
        """Flush the complete updates as a decision, answer it, combine."""
        await self.leader.tick(time.time() + 2.0)
        decision = self.leader.leader.open_decision
        assert decision is not None
        partial = self.helper.apply(decision)
        msg = encode_message(coord_partial(FLEET, partial, 0.0), partial.total)
        await self.leader.handle(InboundMessage(secagg_report_topic(FLEET), msg))


async def test_the_leader_refuses_by_cap_and_one_update_rule_and_keeps_counts_across_a_restart(
    tmp_path: Path,
) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        # Arrange: cap 1; d0 and d1 are released in version 1, d2 holds an update
        leader = _leader(tmp_path, transport)
        fleet = _Fleet(leader)
        await fleet.send("d0", 1)
        await fleet.send("d1", 1)
        await fleet.step()
        assert leader.version == 1
        await fleet.send("d2", 1)

        # Act: d0 again (at its cap), d2 again (its update is held), d2's update 1 redelivered
        await fleet.send("d0", 2)
        await fleet.send("d2", 2)
        await fleet.send("d2", 1)  # a redelivery of the held update: the role's duplicate

        # Assert: both refused by reason; the counts are durable with version 1
        refused = {k: v for k, v in leader.statistics().items() if k.startswith("dp_")}
        assert refused == {"dp_budget_exhausted": 1, "dp_one_per_buffer": 1}
        assert leader.statistics()["secagg_duplicate"] == 1
        state = leader._server_state(ServerStatus.ONLINE)
        assert state.privacy is not None
        assert (state.privacy.participation_max, state.privacy.devices) == (1, 2)
        assert state.privacy.epsilon == pytest.approx(_dp().epsilon(1))
        assert state.rejected["dp_budget_exhausted"] == 1
        store = LeaderStore(leader_state_path(tmp_path), fsync=False)
        stored = store.privacy()
        assert stored is not None
        assert dict(stored.participations) == {"d0": 1, "d1": 1}
        store.close()

        # Act: a restarted leader (a new service on the same file)
        leader._store.close()  # type: ignore[union-attr]
        again = _leader(tmp_path, transport)
        fleet.leader = again
        await fleet.send("d1", 3)  # at its cap
        await fleet.send("d2", 3)  # its update 1 is still held

        # Assert: the same refusals, the counts and the refusal counters restored
        assert again.version == 1
        stats = again.statistics()
        assert (stats["dp_budget_exhausted"], stats["dp_one_per_buffer"]) == (2, 2)
        assert again.privacy is not None
        assert again.privacy.participations("d1") == 1


async def test_a_state_dir_with_shares_from_before_dp_is_refused(tmp_path: Path) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        # Arrange: a leader without DP holds one share
        plain = LeaderService(_config(tmp_path, privacy=None), SETTINGS, KEYS.public_key)
        plain._restore(LeaderStore(leader_state_path(tmp_path), fsync=False))
        plain._transport = transport
        await _Fleet(plain).send("d0", 1)
        plain._store.close()  # type: ignore[union-attr]

        # Act / Assert
        with pytest.raises(ValueError, match="before differential privacy was on"):
            _leader(tmp_path, transport)


@pytest.mark.parametrize(
    ("fields", "clip", "message"),
    [
        ({"example_weighting": ExampleWeighting.EXAMPLES}, 1.0, "example_weighting examples"),
        (
            {"norm_bound": NormBoundSetting.STATIC_CLIP, "max_norm": 1.0},
            1.0,
            "norm_bound static-clip with --dp",
        ),
        ({}, 0.5, "--secagg-clip 0.5 with --dp"),
    ],
)
def test_dp_at_the_leader_refuses_settings_its_sensitivity_needs_otherwise(
    tmp_path: Path, fields: dict[str, Any], clip: float, message: str
) -> None:
    config = _config(tmp_path, **fields)
    settings = dataclasses.replace(SETTINGS, clip_norm=clip)
    with pytest.raises(ValueError, match=message) as info:
        check_compatible(config, settings)
    assert "\n" not in str(info.value)
    check_compatible(_config(tmp_path), SETTINGS)  # the defaults DP sets are accepted
