"""Ingest (``edgefl.aggregator.ingest``): ScratchUpdate, staging out of order, the codec cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefl.aggregator import AggregatorConfig
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.ingest import Accepted, Ingest, Rejected, ScratchUpdate, StagedUpdate
from edgefl.aggregator.service import initial_state
from edgefl.aggregator.updates import build_update_packets
from edgefl.codec import CodecConfig, Quantization, encode_update, open_update
from edgefl.errors import CodecError, RejectReason
from edgefl.protocol import decode_envelope
from edgefl.protocol.sequence import SEQ_WINDOW

FLEET, MODEL = "lab", "digits-mlp"


def test_scratch_update_norm_and_single_use() -> None:
    # Arrange
    delta = np.array([3.0, -4.0, 0.0, 12.0], np.float32)
    encoded, _ = encode_update(
        delta, CodecConfig(quantization=Quantization.FP32), rng=np.random.default_rng(0)
    )
    decoded = open_update(encoded.descriptor, encoded.body, num_params=4, max_decompressed=65536)
    scratch = np.empty(4, np.float32)
    update = ScratchUpdate(decoded, scratch)
    out = np.ones(4, np.float32)

    # Act
    norm2 = update.squared_norm()
    update.add_to(out, 0.5)

    # Assert: |d|^2 = 9 + 16 + 144; out = 1 + d/2; a consumed update refuses further use
    assert norm2 == 169.0
    assert out.tolist() == [2.5, -1.0, 1.0, 7.0]
    with pytest.raises(RuntimeError, match="consumed"):
        update.squared_norm()


def make_ingest(tmp_path: Path, **overrides: object) -> Ingest:
    values: dict[str, object] = {
        "broker_url": "mqtt://127.0.0.1:1", "fleet": FLEET, "model": MODEL,
        "state_dir": tmp_path / "state", "buffer_size": 100, "norm_bound": "off",
        "max_staleness": None,
    }  # fmt: skip
    values.update(overrides)
    config = AggregatorConfig.build(**values)  # type: ignore[arg-type]
    return Ingest(config, Engine(config, initial_state(config)))


def packet(device: str, seq: int, *, seed: int = 0) -> tuple[str, bytes]:
    d = (np.random.default_rng(seed).standard_normal(2410) * 0.01).astype(np.float32)
    topic, packets = build_update_packets(
        fleet=FLEET, model=MODEL, device=device, seq=seq, base_version=0, delta=d
    )
    return topic, packets[0]


def test_out_of_order_staging_is_finished_as_if_sequential(tmp_path: Path) -> None:
    # Arrange: seq 6 and 5 of one device, and a second copy of seq 6, all staged before any
    # is finished (as when decoding overlaps): each passes the checks on its own
    ingest = make_ingest(tmp_path)
    staged = [ingest.stage(*packet("d", seq), now=0.0) for seq in (6, 5, 6)]
    assert all(isinstance(s, StagedUpdate) for s in staged)

    # Act: finish in arrival order
    outcomes = []
    for s in staged:
        assert isinstance(s, StagedUpdate)
        outcomes.append(ingest.finish(s, ingest.decode(s, None), now=0.0))

    # Assert: what one-at-a-time processing gives: 6 accepted, 5 accepted (inside the window),
    # 6 again a duplicate
    match outcomes:
        case [Accepted(), Accepted(), Rejected(reason=RejectReason.DUPLICATE)]:
            pass
        case _:
            pytest.fail(f"unexpected outcomes {outcomes}")


def verdicts(ingest: Ingest, seqs: list[int]) -> list[str]:
    """Process one update of device ``d`` per seq: "ok" or the rejection reason."""
    out = []
    for seq in seqs:
        match ingest.process(*packet("d", seq), now=0.0):
            case Accepted():
                out.append("ok")
            case Rejected(reason=reason):
                out.append(str(reason))
            case other:
                pytest.fail(f"unexpected {other}")
    return out


def test_sequence_window_accepts_late_seqs_once_and_refuses_below_the_window(
    tmp_path: Path,
) -> None:
    # Arrange: the window is 256 seqs below the highest accepted one
    assert SEQ_WINDOW == 256
    ingest = make_ingest(tmp_path)

    # Act: 5, then the late 3 (new), 3 and 5 again, the late 4, a jump to 300 (the window now
    # covers 45..299), 44 (below it, never seen), 45 (its lowest seq), 45 again, 3 again
    got = verdicts(ingest, [5, 3, 3, 5, 4, 300, 44, 45, 45, 3])

    # Assert: by hand
    assert got == [
        "ok", "ok", "duplicate", "duplicate", "ok", "ok", "replay", "ok", "duplicate", "duplicate",
    ]  # fmt: skip


def test_sequence_window_after_a_restart_asks_the_durable_seen_set(tmp_path: Path) -> None:
    # Arrange: what a restarted aggregator loads: mark 10, committed {7, 10} (the seen table)
    config = make_ingest(tmp_path)._config
    seen = {("d", 7), ("d", 10)}
    ingest = Ingest(
        config,
        Engine(config, initial_state(config)),
        max_seq={"d": 10},
        committed_seen=lambda device, seq: (device, seq) in seen,
    )

    # Act / Assert: 7 and 10 were committed before the restart; 8 and 9 never arrived
    assert verdicts(ingest, [7, 8, 10, 9, 8]) == ["duplicate", "ok", "duplicate", "ok", "duplicate"]


def test_codec_cache_keeps_json_types_apart(tmp_path: Path) -> None:
    # Arrange: the same codec object, once with an int where the other has a bool
    ingest = make_ingest(tmp_path)
    _topic, good = packet("d", 1)
    envelope = decode_envelope(good, max_payload=1 << 24)
    codec = dict(envelope.header["codec"])
    assert isinstance(codec["format"], int)
    ok = ingest._codec(codec)

    # Act / Assert: True == 1 must not reuse the cached descriptor
    with pytest.raises(CodecError, match="format True"):
        ingest._codec({**codec, "format": True})
    assert ingest._codec(codec)[0] is ok[0]  # the int form is served from the cache
