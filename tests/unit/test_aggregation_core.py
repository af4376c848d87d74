"""The one aggregation seam: AggregationCore from make_core (driven by the service's Engine and the
virtual simulator), SyncFedAvg's public snapshot/restore, the one Algorithm enum, the one staleness
parser and the one translation of a simulated run's knobs (virtual == live)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefl.aggregation import (
    AggregationSettings,
    Algorithm,
    DenseUpdate,
    FedBuffConfig,
    FedBuffCore,
    HingeStaleness,
    NormBound,
    PolynomialStaleness,
    RoundStatus,
    ServerOptimizerConfig,
    StalenessKind,
    StalenessSetting,
    SyncCore,
    SyncFedAvg,
    SyncFedAvgConfig,
    make_core,
    parse_staleness,
)
from edgefl.aggregator import AggregatorConfig
from edgefl.aggregator import Algorithm as ServiceAlgorithm
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.service import initial_state
from edgefl.errors import RejectReason, UpdateRejected
from firmware_sim.live import LiveOptions, _aggregator_config
from firmware_sim.record import Algorithm as RecordAlgorithm
from firmware_sim.scenario import SimConfig

SYNC = SyncFedAvgConfig(
    min_fraction=0.5,
    norm_bound=NormBound(adaptive_warmup=2),
    server_optimizer=ServerOptimizerConfig.sgd(lr=0.5, momentum=0.9),
)


def test_one_algorithm_enum() -> None:
    assert ServiceAlgorithm is Algorithm
    assert RecordAlgorithm is Algorithm


# ---------------------------------------------------------------------------------------------
# SyncFedAvg snapshot / restore


def run_round(sync: SyncFedAvg, deltas: list[list[float]]) -> None:
    sync.open_round([f"d{i}" for i in range(len(deltas))])
    for i, d in enumerate(deltas):
        sync.add(f"d{i}", DenseUpdate(d), base_version=sync.version, num_examples=10 + i)


def test_sync_fedavg_snapshot_restore_round_trip() -> None:
    # Arrange: two rounds (momentum and norm history now carry state), then a snapshot
    sync = SyncFedAvg(SYNC, [0.0, 0.0])
    run_round(sync, [[1.0, 0.0], [0.0, 2.0]])
    run_round(sync, [[1.0, 1.0], [3.0, 0.0], [0.5, 0.5]])
    restored = SyncFedAvg.restore(SYNC, sync.snapshot())

    # Act: the same third round on both
    for s in (sync, restored):
        run_round(s, [[2.0, -1.0], [1.0, 1.0]])

    # Assert: same model, same version, same core statistics (moments, norm history, counters)
    np.testing.assert_array_equal(restored.weights, sync.weights)
    assert restored.version == sync.version == 3
    assert restored.statistics().fedbuff == sync.statistics().fedbuff
    assert not SyncFedAvg.restore(SYNC, sync.snapshot()).round_open


def test_sync_fedavg_restore_rejects_an_incompatible_snapshot() -> None:
    sync = SyncFedAvg(SYNC, [0.0, 0.0])
    adam = SyncFedAvgConfig(server_optimizer=ServerOptimizerConfig.adam())
    with pytest.raises(ValueError, match="optimizer"):
        SyncFedAvg.restore(adam, sync.snapshot())


def test_engine_restores_fedavg_momentum(tmp_path: Path) -> None:
    # Arrange: a FedAvg service engine with momentum steps once, is snapshotted, and restored
    config = AggregatorConfig.build(
        broker_url="mqtt://127.0.0.1:1",
        fleet="lab",
        model="digits-mlp",
        state_dir=tmp_path,
        algorithm=Algorithm.FEDAVG,
        buffer_size=2,
        server_momentum=0.9,
        norm_bound="off",  # type: ignore[arg-type]
    )
    delta = np.full(config.spec.num_params, 0.01, np.float32)
    engine = Engine(config, initial_state(config))
    for device in ("a", "b"):
        engine.add(device, DenseUpdate(delta), base_version=0, num_examples=5)
    restored = Engine(config, engine.snapshot(), generation=engine.generation)

    # Act: one more round on both
    for e in (engine, restored):
        for device in ("a", "b"):
            e.add(device, DenseUpdate(delta), base_version=1, num_examples=5)

    # Assert: the momentum survived (a fresh optimizer would step 0.01, not 0.019)
    np.testing.assert_array_equal(restored.weights, engine.weights)
    assert restored.version == 2
    np.testing.assert_allclose(
        restored.weights - initial_state(config).weights, 0.01 + 0.019, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# the two cores


def test_make_core_chooses_by_config_type() -> None:
    assert isinstance(make_core(FedBuffConfig(), [0.0]), FedBuffCore)
    assert isinstance(make_core(SYNC, [0.0]), SyncCore)
    assert make_core(SYNC, [0.0]).algorithm is Algorithm.FEDAVG


def test_fedbuff_core_steps_inside_add_and_has_no_rounds() -> None:
    core = make_core(FedBuffConfig(buffer_size=2, norm_bound=NormBound.off()), [0.0])
    assert core.round_open
    assert core.deadline is None
    assert core.deadline_passed(1e9) is None

    first = core.add("a", DenseUpdate([2.0]), base_version=0, num_examples=1)
    second = core.add("b", DenseUpdate([4.0]), base_version=0, num_examples=1)

    assert first.step is None
    assert first.round is None
    assert second.step is not None
    assert second.step.version == 1
    np.testing.assert_array_equal(core.weights, [3.0])


def test_sync_core_with_named_cohort() -> None:
    core = make_core(SYNC, [0.0, 0.0])
    assert not core.round_open
    core.open_round(["a", "b"], deadline=10.0)

    with pytest.raises(UpdateRejected) as stranger:
        core.add("c", DenseUpdate([1.0, 1.0]), base_version=0, num_examples=1)
    core.add("a", DenseUpdate([1.0, 1.0]), base_version=0, num_examples=1)
    closed = core.deadline_passed(10.0)

    assert stranger.value.reason is RejectReason.UNKNOWN_DEVICE
    assert closed is not None
    assert closed.status is RoundStatus.PARTIAL
    assert closed.missing == frozenset({"b"})
    assert core.version == 1
    assert not core.round_open


def test_sync_core_with_anonymous_slots() -> None:
    # Arrange: 2 slots; any device may take one, once per round
    core = make_core(SYNC, [0.0, 0.0])
    core.open_round(2, deadline=None)

    # Act
    core.add("x", DenseUpdate([1.0, 0.0]), base_version=0, num_examples=1)
    with pytest.raises(UpdateRejected) as again:
        core.add("x", DenseUpdate([1.0, 0.0]), base_version=0, num_examples=1)
    last = core.add("y", DenseUpdate([0.0, 1.0]), base_version=0, num_examples=1)

    # Assert
    assert again.value.reason is RejectReason.DUPLICATE
    assert last.round is not None
    assert last.round.status is RoundStatus.COMPLETE
    assert last.step is last.round.step
    assert core.version == 1


# ---------------------------------------------------------------------------------------------
# staleness text and the knobs of a simulated run


@pytest.mark.parametrize(
    ("text", "setting", "weight"),
    [
        ("constant", StalenessSetting(StalenessKind.CONSTANT), None),
        ("polynomial", StalenessSetting(StalenessKind.POLYNOMIAL), PolynomialStaleness()),
        (
            " Polynomial:0.3",
            StalenessSetting(StalenessKind.POLYNOMIAL, 0.3),
            PolynomialStaleness(0.3),
        ),
        ("hinge:2,4", StalenessSetting(StalenessKind.HINGE, 2.0, 4.0), HingeStaleness(2.0, 4.0)),
    ],
)
def test_parse_staleness(text: str, setting: StalenessSetting, weight: object) -> None:
    parsed = parse_staleness(text)
    assert parsed == setting
    if weight is not None:
        assert parsed.weight() == weight


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linear", "unknown staleness kind"),
        ("constant:1", "no parameter"),
        ("polynomial:1,2", "one parameter"),
        ("hinge:1", "two parameters"),
        ("polynomial:x", "could not convert"),
    ],
)
def test_parse_staleness_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_staleness(text)


SIM_CONFIGS = {
    "fedbuff-default": SimConfig.build(),
    "fedbuff-sum-hinge-static": SimConfig.build(
        normalisation="sum",  # type: ignore[arg-type]
        staleness="hinge:1,4",
        norm_bound="3.5",
        server_momentum=0.5,
        buffer_size=7,
    ),
    "fedavg-robust-off": SimConfig.build(
        algorithm=Algorithm.FEDAVG,
        robust="trimmed_mean",  # type: ignore[arg-type]
        norm_bound="off",
        cohort_size=6,
        min_fraction=0.75,
        normalisation="sum",  # type: ignore[arg-type]
    ),
}


@pytest.mark.parametrize("name", sorted(SIM_CONFIGS))
def test_live_aggregator_runs_the_aggregation_the_virtual_simulator_runs(
    name: str, tmp_path: Path
) -> None:
    cfg = SIM_CONFIGS[name]
    live = _aggregator_config(cfg, LiveOptions(), "mqtt://127.0.0.1:1", tmp_path)
    assert live.aggregation_settings() == cfg.aggregation_settings()


def test_aggregation_settings_validate() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        AggregationSettings(buffer_size=0)
