"""Coverage-guided fuzzing harness (atheris) over every decoder a network peer can reach.

The hypothesis properties (``test_fuzz_*.py``) run in CI; this harness is for long runs with
libFuzzer's coverage feedback when ``atheris`` is installed (``pip install atheris``)::

    mkdir -p /tmp/corpus
    .venv/bin/python tests/unit/test_fuzz_atheris.py /tmp/corpus -max_total_time=600

The first input byte picks the target: envelope + every message type, topic parsing, chunk
reassembly (one long-lived bounded ``Reassembler``, so sequences matter), codec bodies and codec
descriptors. Anything but an ``EdgeflError`` with a ``RejectReason`` is a crash. Under pytest,
the harness runs over a small seed corpus so it cannot rot.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import numpy as np

from edgefl.codec import CodecConfig, CodecDescriptor, Quantization, encode_update, open_update
from edgefl.errors import EdgeflError, RejectReason
from edgefl.protocol.chunking import Reassembler, ReassemblyConfig, depacketize, split_message
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope, encode_envelope
from edgefl.protocol.messages import (
    DeviceState,
    ModelManifest,
    ServerMetrics,
    ServerState,
    UpdateHeader,
    decode_message,
    decode_update,
)
from edgefl.protocol.topics import parse_topic

N = 64
_REASSEMBLER = Reassembler(
    ReassemblyConfig(max_message_size=1 << 16, max_buffered_bytes=1 << 17, max_partials=8)
)
_DESCRIPTOR = encode_update(
    np.linspace(-1, 1, N, dtype=np.float32),
    CodecConfig(quantization=Quantization.INT8, block_size=16),
    rng=np.random.default_rng(0),
)[0].descriptor
_clock = [0.0]


def _envelope(data: bytes) -> None:
    decode_envelope(data, max_payload=1 << 16)
    decode_update(data, max_payload=1 << 16)


def _messages(data: bytes) -> None:
    for decode in (
        partial(decode_message, data, UpdateHeader),
        partial(decode_message, data, ModelManifest),
        partial(decode_message, data, DeviceState),
        partial(decode_message, data, ServerState),
        partial(decode_message, data, ServerMetrics),
    ):
        try:
            decode()
        except EdgeflError as exc:
            _typed(exc)


def _topic(data: bytes) -> None:
    parse_topic(data, expected_fleet="lab")


def _chunks(data: bytes) -> None:
    _clock[0] += 0.5
    _REASSEMBLER.expire(_clock[0])
    depacketize(data, reassembler=_REASSEMBLER, source=str(len(data) % 3), now=_clock[0])


def _codec_body(data: bytes) -> None:
    update = open_update(_DESCRIPTOR, data, num_params=N, max_decompressed=1 << 16)
    dense = update.to_dense()
    if not np.isfinite(dense).all():
        raise AssertionError("non-finite values accepted")


def _codec_descriptor(data: bytes) -> None:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return
    if isinstance(obj, dict):
        CodecDescriptor.from_dict(obj)


TARGETS = (_envelope, _messages, _topic, _chunks, _codec_body, _codec_descriptor)


def _typed(exc: EdgeflError) -> None:
    if not isinstance(exc.reason, RejectReason):
        raise AssertionError(f"untyped rejection {exc!r}")


def fuzz_one_input(data: bytes) -> None:
    """The libFuzzer entry point: run one target on ``data[1:]``."""
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    try:
        target(data[1:])
    except EdgeflError as exc:
        _typed(exc)


def _seeds() -> list[bytes]:
    update = encode_envelope(EnvelopeKind.UPDATE, {"a": 1}, b"x" * 3000)
    chunked = split_message(update, kind=EnvelopeKind.UPDATE_CHUNK, max_packet=1024).packets
    return [
        bytes([0]) + update,
        bytes([1]) + encode_envelope(EnvelopeKind.METRICS, {"fleet": "lab"}),
        bytes([2]) + b"edgefl/v1/lab/device/d1/update/7",
        bytes([2]) + b"edgefl/v1/lab/\xff\xfe/state",
        *(bytes([3]) + p for p in chunked),
        bytes([4]) + b"\x28\xb5\x2f\xfd" + bytes(20),
        bytes([5]) + json.dumps(_DESCRIPTOR.to_dict()).encode(),
        bytes([5]) + b'{"format": 1, "num_params": 1e999}',
    ]


def test_harness_runs_over_the_seed_corpus() -> None:
    for seed in _seeds():
        fuzz_one_input(seed)
        for cut in (1, len(seed) // 2, len(seed) - 1):
            fuzz_one_input(seed[:cut])


def main() -> None:  # pragma: no cover - run by hand
    from pathlib import Path

    import atheris  # type: ignore[import-not-found,unused-ignore]

    for arg in sys.argv[1:]:  # corpus directories: start an empty one from the seeds
        corpus = Path(arg)
        if not arg.startswith("-") and corpus.is_dir() and not any(corpus.iterdir()):
            for i, seed in enumerate(_seeds()):
                (corpus / f"seed-{i:03d}").write_bytes(seed)
    atheris.instrument_all()  # coverage feedback from every module loaded above
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
