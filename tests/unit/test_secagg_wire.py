"""Secure aggregation on the wire (protocol 1.3): topics, envelopes, coordination messages, and
one update from the device's envelopes through both roles."""

from __future__ import annotations

import numpy as np
import pytest
import samples

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope
from edgefl.protocol.messages import (
    MESSAGE_TYPES,
    SecAggCoord,
    SecAggCoordKind,
    SecAggInfo,
    SecAggSeedHeader,
    SecAggShareHeader,
    ServerState,
    UpdateHeader,
    decode_message,
    encode_message,
)
from edgefl.protocol.topics import (
    SecAggDecisionTopic,
    SecAggReportTopic,
    SecAggSeedTopic,
    SecAggShareTopic,
    TopicKind,
    parse_topic,
    secagg_decision_topic,
    secagg_report_topic,
    secagg_seed_topic,
    secagg_seeds_filter,
    secagg_share_topic,
    secagg_shares_filter,
    update_topic,
)
from edgefl.secagg.decision import BufferDecision, HelperPartial, SeedReport
from edgefl.secagg.errors import SecAggReason
from edgefl.secagg.helper import HelperConfig, SecAggHelper
from edgefl.secagg.leader import LeaderConfig, SecAggLeader
from edgefl.secagg.ring import RingSpec
from edgefl.secagg.shares import HelperKeys
from edgefl.secagg.wire import (
    UpdateMeta,
    build_share_envelopes,
    coord_decision,
    coord_partial,
    coord_refusal,
    coord_report,
    decision_from_coord,
    helper_key_b64,
    helper_key_from_b64,
    partial_from_coord,
    report_from_coord,
    secagg_info,
    spec_of,
)

SPEC = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=2, w_max=256)
KEYS = HelperKeys.generate()


def _reason(fn: object) -> RejectReason:
    with pytest.raises(ProtocolError) as info:
        fn()  # type: ignore[operator]
    return info.value.reason


# -- topics ------------------------------------------------------------------------------------


def test_secagg_topics_round_trip_through_the_parser() -> None:
    cases = [
        (secagg_share_topic("lab", "d-1", 7), SecAggShareTopic("lab", "d-1", 7)),
        (secagg_seed_topic("lab", "d-1", 7), SecAggSeedTopic("lab", "d-1", 7)),
        (secagg_decision_topic("lab"), SecAggDecisionTopic("lab")),
        (secagg_report_topic("lab"), SecAggReportTopic("lab")),
    ]
    for text, typed in cases:
        assert parse_topic(text) == typed
        assert typed.topic == text
    assert secagg_share_topic("lab", "d-1", 7) == "edgefl/v1/lab/secagg/share/d-1/7"
    assert secagg_seed_topic("lab", "d", 0) == "edgefl/v1/lab/secagg/seed/d/0"
    assert secagg_shares_filter("lab") == "edgefl/v1/lab/secagg/share/+/+"
    assert secagg_seeds_filter("lab") == "edgefl/v1/lab/secagg/seed/+/+"
    assert SecAggShareTopic.kind is TopicKind.SECAGG_SHARE


@pytest.mark.parametrize(
    "topic",
    [
        "edgefl/v1/lab/secagg",
        "edgefl/v1/lab/secagg/share/d",
        "edgefl/v1/lab/secagg/share/d/01",
        "edgefl/v1/lab/secagg/share/d/1/x",
        "edgefl/v1/lab/secagg/other/d/1",
        "edgefl/v1/lab/secagg/decisions",
        "edgefl/v1/lab/secagg/seed/+/1",
    ],
)
def test_malformed_secagg_topics_are_refused(topic: str) -> None:
    assert _reason(lambda: parse_topic(topic)) in (RejectReason.BAD_TOPIC, RejectReason.BAD_NAME)


# -- envelopes ---------------------------------------------------------------------------------


def _meta(seq: int = 3, device: str = "d-1") -> UpdateMeta:
    return UpdateMeta(
        fleet="lab",
        device_id=device,
        seq=seq,
        base_version=4,
        num_examples=32,
        model="mlp",
        created_at=1.7e9,
    )


def test_share_envelopes_decode_on_their_topics_only() -> None:
    # Arrange
    delta = np.random.default_rng(1).normal(size=50).astype(np.float32) * 0.01
    built = build_share_envelopes(
        delta, _meta(), SPEC, KEYS.public_key, rng=np.random.default_rng(2)
    )
    share_topic = parse_topic(secagg_share_topic("lab", "d-1", 3))
    seed_topic = parse_topic(secagg_seed_topic("lab", "d-1", 3))

    # Act
    share = decode_envelope(built.share, max_payload=1 << 20)
    header = decode_message(built.share, SecAggShareHeader, topic=share_topic)
    seed = decode_message(built.seed, SecAggSeedHeader, topic=seed_topic)

    # Assert
    assert share.kind is EnvelopeKind.SECAGG_SHARE
    assert len(share.payload) == 4 * 50
    assert (header.base_version, header.num_examples, header.num_params) == (4, 32, 50)
    assert (seed.device_id, seed.seq, seed.bits) == ("d-1", 3, 32)
    wrong_seq = parse_topic(secagg_share_topic("lab", "d-1", 4))
    assert _reason(lambda: decode_message(built.share, SecAggShareHeader, topic=wrong_seq)) is (
        RejectReason.BAD_HEADER
    )
    assert _reason(lambda: decode_message(built.share, SecAggShareHeader, topic=seed_topic)) is (
        RejectReason.BAD_KIND
    )
    an_update = parse_topic(update_topic("lab", "d-1", 3))
    assert _reason(lambda: decode_message(built.share, SecAggShareHeader, topic=an_update)) is (
        RejectReason.BAD_KIND
    )
    assert _reason(lambda: decode_message(built.share, UpdateHeader)) is RejectReason.BAD_KIND


def test_every_secagg_kind_has_a_message_type() -> None:
    for kind in (EnvelopeKind.SECAGG_SHARE, EnvelopeKind.SECAGG_SEED, EnvelopeKind.SECAGG_COORD):
        assert MESSAGE_TYPES[kind].KIND is kind


def test_header_fields_are_validated() -> None:
    base = {
        "fleet": "lab",
        "device_id": "d",
        "seq": 1,
        "model": "mlp",
        "num_params": 10,
        "created_at": 1.0,
    }
    assert SecAggSeedHeader(**base, bits=64).bits == 64  # type: ignore[arg-type]
    assert _reason(lambda: SecAggSeedHeader(**base, bits=16)) is RejectReason.BAD_HEADER  # type: ignore[arg-type]
    assert _reason(lambda: SecAggInfo(32, 3, 1.0, helper_key_b64(KEYS.public_key))) is (
        RejectReason.BAD_HEADER
    )
    assert _reason(lambda: SecAggInfo(32, 4, 1.0, "not-a-key")) is RejectReason.BAD_HEADER


def test_server_state_announces_the_ring_and_old_decoders_ignore_it() -> None:
    # Arrange
    info = secagg_info(SPEC, KEYS.public_key)
    state = samples.server_state(buffer_size=2, features=("secagg",), secagg=info)

    # Act
    back = decode_message(encode_message(state), ServerState)
    header = state.to_header()
    header.pop("secagg")  # what an aggregator without secure aggregation publishes

    # Assert
    assert back.secagg == info
    assert spec_of(info) == SPEC
    assert helper_key_b64(helper_key_from_b64(info.helper_key)) == info.helper_key
    assert ServerState.from_header(header).secagg is None


# -- coordination ------------------------------------------------------------------------------


def test_coordination_messages_round_trip() -> None:
    decision = BufferDecision(5, (("a", 1), ("b", 2)), (256, 3), dropped=(("c", 9),))
    report = SeedReport(("a", 1), False, SecAggReason.BAD_SEAL)
    partial = HelperPartial(5, b"\x01" * 8)
    for msg, payload in [
        (coord_decision("lab", decision, 1.0), b""),
        (coord_report("lab", report, 1.0), b""),
        (coord_partial("lab", partial, 1.0), partial.total),
        (coord_refusal("lab", 5, SecAggReason.BAD_DECISION, 1.0, frozenset({("a", 1)})), b""),
    ]:
        data = encode_message(msg, payload)
        assert decode_message(data, SecAggCoord) == msg
    assert decision_from_coord(coord_decision("lab", decision, 1.0)) == decision
    assert report_from_coord(coord_report("lab", report, 1.0)) == report
    assert partial_from_coord(coord_partial("lab", partial, 1.0), partial.total) == partial
    assert _reason(lambda: decision_from_coord(coord_report("lab", report, 1.0))) is (
        RejectReason.BAD_HEADER
    )


def test_coordination_messages_go_one_way_each() -> None:
    decision = coord_decision("lab", BufferDecision(0, (("a", 1),), (1,)), 1.0)
    report = coord_report("lab", SeedReport(("a", 1), True), 1.0)
    to_helper = parse_topic(secagg_decision_topic("lab"))
    to_leader = parse_topic(secagg_report_topic("lab"))
    assert decode_message(encode_message(decision), SecAggCoord, topic=to_helper) == decision
    assert decode_message(encode_message(report), SecAggCoord, topic=to_leader) == report
    for msg, topic in ((decision, to_leader), (report, to_helper)):
        data = encode_message(msg)
        assert _reason(lambda d=data, t=topic: decode_message(d, SecAggCoord, topic=t)) is (
            RejectReason.BAD_KIND
        )


def test_coordination_messages_need_their_fields() -> None:
    assert _reason(lambda: SecAggCoord("lab", SecAggCoordKind.PARTIAL, 1.0)) is (
        RejectReason.BAD_HEADER
    )
    assert (
        _reason(
            lambda: SecAggCoord("lab", SecAggCoordKind.DECISION, 1.0, buffer_id=0, weights=(1,))
        )
        is RejectReason.BAD_HEADER
    )
    assert (
        _reason(lambda: SecAggCoord("lab", SecAggCoordKind.REPORT, 1.0, device_id="d", seq=1))
        is RejectReason.BAD_HEADER
    )
    assert (
        _reason(
            lambda: report_from_coord(
                SecAggCoord(
                    "lab",
                    SecAggCoordKind.REPORT,
                    1.0,
                    device_id="d",
                    seq=1,
                    ok=False,
                    reason="nope",
                )
            )
        )
        is RejectReason.BAD_HEADER
    )


# -- end to end --------------------------------------------------------------------------------


def test_two_devices_through_the_wire_decode_to_their_weighted_sum() -> None:
    # Arrange
    rng = np.random.default_rng(3)
    deltas = [rng.normal(size=40).astype(np.float32) * 0.02 for _ in range(2)]
    helper = SecAggHelper(HelperConfig(SPEC, 40, "lab", "mlp"), KEYS)
    leader = SecAggLeader(LeaderConfig(SPEC, 40, buffer_size=2, w_max=256))
    weights = (256, 7)

    # Act: every value crosses an encoded envelope
    for i, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
        built = build_share_envelopes(
            delta, _meta(seq=i, device=f"d{i}"), SPEC, KEYS.public_key, rng=rng
        )
        share = decode_envelope(built.share, max_payload=1 << 20)
        seed = decode_envelope(built.seed, max_payload=1 << 20)
        report = helper.receive_sealed((f"d{i}", i), bytes(seed.payload), now=0.0)
        assert report is not None
        wire_report = decode_message(encode_message(coord_report("lab", report, 0.0)), SecAggCoord)
        leader.receive_masked((f"d{i}", i), bytes(share.payload), weight, now=0.0)
        leader.helper_report(report_from_coord(wire_report), now=0.0)
    decision = leader.decide()
    wire_decision = decode_message(
        encode_message(coord_decision("lab", decision, 0.0)), SecAggCoord
    )
    partial = helper.apply(decision_from_coord(wire_decision))
    data = encode_message(coord_partial("lab", partial, 0.0), partial.total)
    env = decode_envelope(data, max_payload=1 << 20)
    result = leader.combine(partial_from_coord(decode_message(data, SecAggCoord), env.payload))

    # Assert
    expected = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True))
    assert np.allclose(result.total, expected, atol=sum(weights) / SPEC.scale)
