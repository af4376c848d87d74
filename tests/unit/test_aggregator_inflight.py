"""``AggregatorConfig``: the in-flight window and the batch limits it sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.aggregator import AggregatorConfig

FLEET = "lab"


def test_inflight_window_is_validated_and_sizes_batches(tmp_path: Path) -> None:
    base = {
        "broker_url": "mqtt://127.0.0.1:1", "fleet": FLEET, "model": "mlp-1m",
        "state_dir": tmp_path,
    }  # fmt: skip
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        AggregatorConfig.build(**base, max_inflight_bytes=1000)  # type: ignore[arg-type]
    small = AggregatorConfig.build(**base, max_inflight_bytes=16 << 20)  # type: ignore[arg-type]
    large = AggregatorConfig.build(**base)  # type: ignore[arg-type]
    # 1M int8 updates are 4 chunks of <= 256 KiB: the window never drops below the chunk floor
    # (16 partial updates x 3 held chunks + 32), a batch takes a quarter of the bytes
    assert small.inflight_window() == 16 * 3 + 32
    assert large.inflight_window() == (32 << 20) // (256 * 1024)
    assert large.batch_limits()[1] == 8 << 20
