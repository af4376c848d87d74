"""Central DP in the aggregator service, over the in-memory broker: the participation counts and
the open buffer's devices survive a restart (SQLite), a replayed or fresh update past the cap is
refused, and the figures show in the statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_aggregator_config_file import write as write_config
from test_aggregator_service import Harness, delta, make_config, run
from waiting import eventually

from edgefl.aggregation import FedBuff, FedBuffConfig, Normalisation, NormBound
from edgefl.aggregator import AggregatorConfig
from edgefl.aggregator.config_file import describe, load_aggregator_config
from edgefl.aggregator.store import decode_state, encode_state
from edgefl.cli import main
from edgefl.clierror import ConfigError
from edgefl.errors import ProtocolError, RejectReason
from edgefl.privacy import CentralDP, PrivacyState
from edgefl.protocol import (
    ServerMetrics,
    ServerState,
    decode_message,
    encode_message,
    server_state_topic,
)
from edgefl.protocol.messages import CentralPrivacy, Receipt
from edgefl.protocol.receipts import RECEIPTED_REJECTIONS
from edgefl.transport import MemoryBroker

# one participation per device: the smallest cap, so a restart that forgot it shows at once
DP_CAP_1 = CentralDP(clip_norm=1.0, noise_multiplier=3.0, target_epsilon=None, max_participations=1)


def dp_config(tmp_path: Path, **overrides: Any) -> AggregatorConfig:
    values: dict[str, Any] = {
        "privacy": DP_CAP_1,
        "normalisation": "sum",
        "example_weighting": "equal",
        **overrides,
    }
    return make_config(tmp_path, **values)


async def step_once(h: Harness, first: str, second: str) -> None:
    """Version 1 from one update of each of two devices (K = 2), from version 0."""
    await h.send(first, 1, 0, delta(1))
    await h.send(second, 1, 0, delta(2))
    await h.until(lambda s: s.version == 1)


def test_the_state_blob_carries_the_privacy_state() -> None:
    config = FedBuffConfig(
        buffer_size=3,
        normalisation=Normalisation.SUM,
        norm_bound=NormBound.off(),
        privacy=DP_CAP_1,
    )
    fb = FedBuff(config, np.zeros(4, np.float32))
    for device in ("a", "b", "c"):
        fb.add(np.full(4, 0.1, np.float32), base_version=0, num_examples=1, device_id=device)
    fb.step()
    fb.add(np.full(4, 0.1, np.float32), base_version=1, num_examples=1, device_id="d")

    state = decode_state(encode_state(fb.snapshot()))

    assert state.privacy == PrivacyState({"a": 1, "b": 1, "c": 1}, ("d",))
    restored = FedBuff.restore(config, state)
    assert [restored.privacy_admits(d) for d in "abcde"] == [False] * 4 + [True]


def test_a_state_blob_without_dp_has_no_privacy_state() -> None:
    fb = FedBuff(FedBuffConfig(), np.zeros(4, np.float32))
    assert decode_state(encode_state(fb.snapshot())).privacy is None


def test_caps_and_the_open_buffer_survive_a_restart_and_refuse_replays(tmp_path: Path) -> None:
    """Two devices step (each at its cap of 1), a third waits in the open buffer; after a
    restart the first is refused with a fresh seq (budget), the third with a fresh seq (one per
    buffer), and a replay of an accepted update is a duplicate."""
    broker = MemoryBroker()
    config = dp_config(tmp_path)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await step_once(h, "dev-a", "dev-b")
            await h.send("dev-c", 1, 1, delta(3))
            await h.until(lambda s: s.applied == 3)
        async with Harness(broker, config) as h:
            assert (h.stats().version, h.stats().buffer_fill) == (1, 1)
            await h.send("dev-a", 2, 1, delta(4))  # a fresh update past the cap
            await h.send("dev-c", 2, 1, delta(5))  # a second update in the open buffer
            await h.send("dev-b", 1, 0, delta(2))  # the accepted update again
            s = await h.until(lambda s: s.received == 6)
            assert dict(s.rejected) == {
                "dp_budget_exhausted": 1,
                "dp_one_per_buffer": 1,
                "duplicate": 1,
            }
            assert (s.applied, s.version, s.buffer_fill) == (3, 1, 1)

    run(body)


def test_a_checkpointed_buffer_keeps_its_devices_across_a_restart(tmp_path: Path) -> None:
    """Thirteen updates exceed the replay bound, so the buffer is checkpointed (its devices go
    into the snapshot, not the replayed rows); after a restart each of them is still in it."""
    broker = MemoryBroker()
    config = dp_config(tmp_path, buffer_size=20)

    async def body() -> None:
        async with Harness(broker, config) as h:
            for i in range(13):
                await h.send(f"dev-{i}", 1, 0, delta(i))
            await h.until(lambda s: s.applied == 13)
            running = h.agg._running
            assert running is not None
            assert running.builder.totals.checkpoints >= 1
        async with Harness(broker, config) as h:
            assert h.stats().buffer_fill == 13
            await h.send("dev-0", 2, 0, delta(20))
            await h.send("dev-12", 2, 0, delta(21))
            await h.send("dev-new", 1, 0, delta(22))
            s = await h.until(lambda s: s.received == 16)
            assert dict(s.rejected) == {"dp_one_per_buffer": 2}
            assert s.buffer_fill == 14

    run(body)


def test_dp_refuses_a_buffer_checkpointed_without_it(tmp_path: Path) -> None:
    from edgefl.aggregator import Aggregator
    from edgefl.aggregator.store import StateMismatch
    from edgefl.transport import MemoryTransport

    broker = MemoryBroker()
    plain = make_config(tmp_path, buffer_size=20, normalisation="sum", example_weighting="equal")

    async def body() -> None:
        async with Harness(broker, plain) as h:
            for i in range(13):
                await h.send(f"dev-{i}", 1, 0, delta(i))
            await h.until(lambda s: s.applied == 13)
        transport = MemoryTransport(broker, "aggregator", persistent_session=True, manual_ack=True)
        with pytest.raises(StateMismatch, match="before differential privacy"):
            await Aggregator(plain.replace(privacy=DP_CAP_1), transport=transport).run()

    run(body)


# --------------------------------------------------------------------------- configuration


def test_the_privacy_table_turns_central_dp_on_with_its_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[privacy]\ndp = "central:z=2,C=0.3,eps=4,delta=1e-6"\n')

    loaded = load_aggregator_config(path, {}, {})

    cfg = loaded.aggregator
    assert cfg.aggregation.privacy == CentralDP(
        noise_multiplier=2.0, clip_norm=0.3, target_epsilon=4.0, delta=1e-6
    )
    assert tuple(
        cfg.options()[k] for k in ("normalisation", "norm_bound", "example_weighting")
    ) == ("sum", "off", "equal")
    assert describe(loaded)["privacy.dp"] == "central:z=2,C=0.3,delta=1e-06,eps=4,accountant=rdp"
    assert describe(loaded)["aggregation.normalisation"] == "sum"
    assert loaded.sources["aggregation.normalisation"] == "default with privacy.dp"


def test_the_dp_flag_beats_the_file_and_off_turns_it_off(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[aggregation]\nnorm_bound = "static-clip"\nmax_norm = 5.0\n'
        '[privacy]\ndp = "central:z=3"\n',
    )  # fmt: skip

    flagged = load_aggregator_config(path, {}, {"privacy.dp": "central:z=4,cap=5"})
    off = load_aggregator_config(path, {}, {"privacy.dp": "off"})

    dp = flagged.aggregator.aggregation.privacy
    assert dp is not None
    assert (dp.noise_multiplier, dp.participation_cap, dp.target_epsilon) == (4.0, 5, None)
    assert flagged.aggregator.options()["norm_bound"] == "static-clip"  # set in the file: kept
    assert flagged.sources["privacy.dp"] == "command line (--dp)"
    assert off.aggregator.aggregation.privacy is None
    assert off.aggregator.aggregation.normalisation == "mean"  # the service's defaults without DP
    assert describe(off)["privacy.dp"] == "off"


def test_check_config_shows_the_dp_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "")

    with pytest.raises(SystemExit) as exited:
        main(["aggregator", "--dp", "central:z=3,eps=8", "check-config", "--config", str(path)])

    assert exited.value.code == 0

    out = capsys.readouterr().out
    assert "central:z=3,C=1,delta=1e-05,eps=8,accountant=rdp" in out


# --------------------------------------------------------------------------- visible


def test_statistics_metrics_and_prometheus_show_the_spent_epsilon(tmp_path: Path) -> None:
    from edgefl.aggregator.metrics import PrometheusExporter
    from edgefl.aggregator.runner import status_line
    from edgefl.aggregator.service import _server_metrics

    dp = CentralDP(clip_norm=0.5, noise_multiplier=2.0, target_epsilon=8.0)
    config = dp_config(tmp_path, privacy=dp)
    broker = MemoryBroker()

    async def body() -> None:
        async with Harness(broker, config) as h:
            assert h.stats().privacy is not None
            assert h.stats().privacy.participation_max == 0  # type: ignore[union-attr]
            await step_once(h, "dev-a", "dev-b")
            await h.send("dev-a", 2, 1, delta(3))
            await h.send("dev-c", 1, 1, delta(4))
            s = await h.until(lambda s: s.version == 2)
            assert "dp epsilon " in status_line(h.agg)
        p = s.privacy
        assert p is not None
        assert (p.participation_max, p.devices, dict(p.participation_histogram)) == (
            2, 3, {1: 2, 2: 1})  # fmt: skip
        assert p.epsilon == dp.epsilon(2)
        assert (p.delta, p.noise_multiplier, p.clip_norm) == (1e-5, 2.0, 0.5)
        assert p.participation_cap == dp.participation_cap == 9
        message = _server_metrics("lab", s)
        extra = decode_message(encode_message(message), ServerMetrics).extra  # JSON and back
        assert extra["dp_participation_histogram"] == {"1": 2, "2": 1}
        assert (extra["dp_epsilon"], extra["dp_participation_max"]) == (p.epsilon, 2)
        value = PrometheusExporter(lambda: s).registry.get_sample_value
        assert value("edgefl_aggregator_dp_epsilon_spent_max") == p.epsilon
        assert value("edgefl_aggregator_dp_participations_max") == 2
        assert value("edgefl_aggregator_dp_participation_cap") == 9
        state = decode_message(broker.retained()[server_state_topic("lab")], ServerState)
        assert state.privacy == CentralPrivacy(
            epsilon=p.epsilon, delta=1e-5, noise_multiplier=2.0, clip_norm=0.5,
            participation_cap=9, participation_max=2, devices=3,
            participation_histogram={1: 2, 2: 1}, accountant="rdp",
        )  # fmt: skip

    run(body)


def test_without_dp_nothing_about_it_is_shown(tmp_path: Path) -> None:
    from edgefl.aggregator.service import _server_metrics

    async def body() -> None:
        async with Harness(broker, make_config(tmp_path)) as h:
            s = h.stats()
        assert s.privacy is None
        assert not [k for k in _server_metrics("lab", s).extra if k.startswith("dp_")]
        state = broker.retained()[server_state_topic("lab")]
        assert decode_message(state, ServerState).privacy is None
        assert b"privacy" not in state

    broker = MemoryBroker()
    run(body)


def test_central_privacy_round_trips_and_is_validated() -> None:
    figures = CentralPrivacy(
        epsilon=1.5, delta=1e-5, noise_multiplier=3, clip_norm=1, participation_cap=22,
        participation_max=1, devices=2, participation_histogram={1: 2},
    )  # fmt: skip

    again = CentralPrivacy.from_json(json.loads(json.dumps(figures.to_json())))

    assert again == figures
    assert figures.to_json()["participation_histogram"] == {"1": 2}
    with pytest.raises(ProtocolError):
        CentralPrivacy.from_json({**figures.to_json(), "participation_cap": 0})
    with pytest.raises(ProtocolError):
        CentralPrivacy.from_json({**figures.to_json(), "epsilon": "lots"})


# --------------------------------------------------------------------------- receipts


def test_budget_exhausted_is_receipted_and_one_per_buffer_is_resent(tmp_path: Path) -> None:
    """Cap 3, K = 2: a second update of a device in the open buffer is refused without a
    receipt, and its resend after the flush is accepted; past the cap the refusal is final and
    receipted."""
    from test_aggregator_participation import receipt

    assert RejectReason.DP_BUDGET_EXHAUSTED in RECEIPTED_REJECTIONS
    assert RejectReason.DP_ONE_PER_BUFFER not in RECEIPTED_REJECTIONS
    broker = MemoryBroker()
    config = dp_config(tmp_path, privacy=CentralDP(target_epsilon=None, max_participations=3))

    def receipt_of(device: str) -> Receipt:
        r = receipt(broker, device)
        assert r is not None
        return r

    async def body() -> None:
        async with Harness(broker, config) as h:
            await step_once(h, "a", "b")
            await h.send("a", 2, 1, delta(3))
            await h.send("a", 3, 1, delta(4))  # a's update 2 is in the open buffer
            await h.until(lambda s: s.received == 4)
            await h.send("c", 1, 1, delta(5))  # the flush
            await eventually(lambda: receipt(broker, "c") is not None)  # receipts go in order
            assert (receipt_of("a").through, dict(receipt_of("a").rejected)) == (2, {})
            await h.send("a", 3, 1, delta(4))  # the device's resend after its timeout
            await eventually(lambda: receipt_of("a").through == 3)
            assert dict(receipt_of("a").rejected) == {}
            await h.send("b", 2, 2, delta(6))  # the flush: a has taken part 3 times
            await h.until(lambda s: s.version == 3)
            await h.send("a", 4, 3, delta(7))
            await eventually(lambda: 4 in receipt_of("a").rejected)
            assert dict(receipt_of("a").rejected) == {4: "dp_budget_exhausted"}
            assert dict(h.stats().rejected) == {"dp_one_per_buffer": 1, "dp_budget_exhausted": 1}

    run(body)


# --------------------------------------------------------------------------- leases


def test_no_lease_for_a_device_dp_would_refuse_and_its_check_in_is_kept(tmp_path: Path) -> None:
    """Cap 2, K = 2, C = 2: a device with an update in the open buffer gets no lease until the
    flush, then gets one from the check-in it made before; at its cap it gets none, while a
    new device does."""
    from test_aggregator_participation import Fleet, participation, until

    from edgefl.participation import ParticipationConfig

    broker = MemoryBroker()
    dp = CentralDP(target_epsilon=None, max_participations=2)
    config = dp_config(tmp_path, privacy=dp, participation=ParticipationConfig(concurrency=2))

    def leases(fleet: Fleet, device: str) -> list[int]:
        return [lease.lease_id for lease in fleet.leases if lease.device_id == device]

    async def body() -> None:
        async with Harness(broker, config) as h, Fleet(broker) as fleet:

            async def train(device: str, seq: int, base: int) -> None:
                await fleet.send(device, seq, leases(fleet, device)[-1], base=base)

            await fleet.check_in("a")
            await fleet.check_in("b")
            await until(lambda: len(fleet.leases) == 2)
            await train("a", 1, 0)
            await h.until(lambda s: s.applied == 1)
            await fleet.check_in("a")  # a's update waits in the open buffer
            await until(lambda: participation(h).checkins["available"] == 3)
            await fleet.check_in("c")  # the free slot is c's, not a's
            await until(lambda: leases(fleet, "c") != [])
            assert (len(leases(fleet, "a")), participation(h).candidates) == (1, 1)
            await train("b", 1, 0)  # the flush: a is admissible again, still checked in
            await until(lambda: len(leases(fleet, "a")) == 2)
            await train("a", 2, 1)
            await train("c", 1, 1)
            await h.until(lambda s: s.version == 2)  # a took part twice: its cap
            await fleet.check_in("a")
            await fleet.check_in("d")
            await until(lambda: leases(fleet, "d") != [])
            assert len(leases(fleet, "a")) == 2
            assert participation(h).candidates == 1  # a keeps its check-in
            assert h.stats().rejected == {}  # nobody trained for nothing

    run(body)


def test_the_lease_desk_draws_only_admissible_candidates() -> None:
    from edgefl.aggregator.participation import LeaseDesk
    from edgefl.participation import ParticipationConfig
    from edgefl.protocol.messages import CheckIn
    from edgefl.protocol.topics import checkin_topic

    refused = {"b"}
    desk = LeaseDesk(
        ParticipationConfig(concurrency=3), "lab", rng=np.random.default_rng(0),
        admissible=lambda device: device not in refused,
    )  # fmt: skip
    for device in "abc":
        message = CheckIn(fleet="lab", device_id=device, at=100.0, available=True)
        assert (
            desk.check_in(checkin_topic("lab", device), encode_message(message), now=100.0) is None
        )

    first = desk.grant(now=101.0, version=0)
    refused.clear()
    second = desk.grant(now=102.0, version=0)

    assert sorted(lease.device for lease in first) == ["a", "c"]
    assert [lease.device for lease in second] == ["b"]  # its check-in was kept


def test_dp_without_dp_accounting_is_a_config_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from edgefl.privacy import accountant

    accountant.epsilon.cache_clear()  # nothing computed before: every value needs the package
    accountant._cap.cache_clear()
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails as if not installed
    path = write_config(tmp_path, '[privacy]\ndp = "central:z=3.5,eps=7"\n')

    with pytest.raises(ConfigError) as raised:
        load_aggregator_config(path, {}, {})

    assert "privacy.dp" in str(raised.value)
    assert "edgefl-mqtt[aggregator]" in str(raised.value)
