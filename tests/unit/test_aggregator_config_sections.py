"""AggregatorConfig's sections: flat options go to the right record and come back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.aggregation import NormBound, NormBoundMode, ServerOptimizerKind
from edgefl.aggregator import AggregatorConfig, NormBoundSetting
from edgefl.transport.config import TlsFiles

BASE = {"broker_url": "mqtt://127.0.0.1:1", "fleet": "f", "model": "digits-mlp"}


@pytest.mark.parametrize(
    "bound",
    [
        {"norm_bound": NormBoundSetting.OFF},
        {"norm_bound": NormBoundSetting.ADAPTIVE_REJECT, "max_norm": 4.0},
        {"norm_bound": NormBoundSetting.STATIC_CLIP, "max_norm": 2.0},
        {"norm_bound": NormBoundSetting.STATIC_REJECT, "max_norm": 3.0},
    ],
)
def test_flat_options_round_trip(tmp_path: Path, bound: dict[str, object]) -> None:
    # Arrange
    config = AggregatorConfig.build(
        **BASE, state_dir=tmp_path, buffer_size=3, staleness="hinge", staleness_a=2.0,
        staleness_b=5.0, server_optimizer="adam", server_lr=0.5, max_packet=1 << 20,
        username="agg", password="pw", fsync=False, receipt_queue=7, local_epochs=2, **bound,
    )  # fmt: skip

    # Act
    options = config.options()
    rebuilt = AggregatorConfig.build(**options)  # type: ignore[arg-type]

    # Assert
    assert rebuilt == config
    assert {k: options[k] for k in bound} == bound
    assert config.aggregation.buffer_size == 3
    assert config.aggregation.server_optimizer.kind is ServerOptimizerKind.ADAM
    assert (config.limits.max_packet, config.ingest.receipt_queue) == (1 << 20, 7)
    assert (config.mqtt.username, config.task.local_epochs) == ("agg", 2)


def test_the_norm_bound_choice_resolves_to_the_cores_bound(tmp_path: Path) -> None:
    static = AggregatorConfig.build(
        **BASE, state_dir=tmp_path, norm_bound="static-reject", max_norm=2.0
    )
    adaptive = AggregatorConfig.build(**BASE, state_dir=tmp_path)

    assert static.aggregation.norm_bound == NormBound.static(2.0, NormBoundMode.REJECT)
    assert adaptive.aggregation.norm_bound == NormBound()  # 5x the running median, clip


def test_replace_changes_one_option_and_keeps_the_rest(tmp_path: Path) -> None:
    config = AggregatorConfig.build(**BASE, state_dir=tmp_path, norm_bound="off", max_batch=9)

    changed = config.replace(buffer_size=4, fsync=False)

    assert changed.aggregation.buffer_size == 4
    assert changed.options()["norm_bound"] is NormBoundSetting.OFF
    assert (changed.ingest.fsync, changed.ingest.max_batch) == (False, 9)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        AggregatorConfig.build(**BASE, state_dir=tmp_path, buffer_sise=3)
    with pytest.raises(ValueError, match="needs max_norm"):
        AggregatorConfig.build(**BASE, state_dir=tmp_path, norm_bound="static-clip")
    with pytest.raises(ValueError, match="max_seq_jump"):
        AggregatorConfig.build(**BASE, state_dir=tmp_path, max_seq_jump=0)


def test_tls_options_reach_the_transports_tls_files(tmp_path: Path) -> None:
    config = AggregatorConfig.build(
        broker_url="mqtts://127.0.0.1:1", fleet="f", model="digits-mlp", state_dir=tmp_path,
        ca_file=Path("ca.pem"), tls_insecure=True,
    )  # fmt: skip

    mqtt = config.mqtt_config()
    without_ca = config.replace(ca_file=None)

    assert mqtt.tls_files == TlsFiles(ca_file=Path("ca.pem"), tls_insecure=True)
    assert without_ca.mqtt.tls_files == TlsFiles(tls_insecure=True)
    assert without_ca.options()["tls_insecure"] is True
