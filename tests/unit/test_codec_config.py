"""CodecConfig / CodecDescriptor validation and the body layout sizes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.codec import CodecConfig, CodecDescriptor, IndexDtype, Quantization
from edgefl.codec.layout import body_layout
from edgefl.errors import CodecError, RejectReason

# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize(
    ("quantization", "num_values", "block_size", "index_dtype", "raw_size"),
    [
        # dense fp32: 5 values = 20 bytes, padded to 24
        (Quantization.FP32, 5, 4, None, 24),
        # dense fp16: 5 values = 10 bytes -> 16
        (Quantization.FP16, 5, 4, None, 16),
        # int8, 10 values, block 4: 3 scales (12 -> 16) + 10 codes (-> 16)
        (Quantization.INT8, 10, 4, None, 32),
        # int4, 5 values, block 4: 2 scales (8) + 3 bytes (-> 8)
        (Quantization.INT4, 5, 4, None, 16),
        # int2, 9 values, block 8: 2 scales (8) + 3 bytes (-> 8)
        (Quantization.INT2, 9, 8, None, 16),
        # sparse int8, 3 values, uint16 gaps: 1 scale (4 -> 8) + 6 bytes (-> 8) + 3 codes (-> 8)
        (Quantization.INT8, 3, 4096, IndexDtype.UINT16, 24),
        # sparse fp32, 2 values, uint32 gaps: 8 + 8
        (Quantization.FP32, 2, 4096, IndexDtype.UINT32, 16),
    ],
)
def test_body_layout_raw_size_by_hand(
    quantization: Quantization,
    num_values: int,
    block_size: int,
    index_dtype: IndexDtype | None,
    raw_size: int,
) -> None:
    layout = body_layout(
        quantization, num_values=num_values, block_size=block_size, index_dtype=index_dtype
    )

    assert layout.raw_size == raw_size
    for section in (layout.floats, layout.indices, layout.codes):
        if section is not None:
            assert section.offset % 8 == 0


def test_index_dtype_smallest_for() -> None:
    assert IndexDtype.smallest_for(0) is IndexDtype.UINT8
    assert IndexDtype.smallest_for(255) is IndexDtype.UINT8
    assert IndexDtype.smallest_for(256) is IndexDtype.UINT16
    assert IndexDtype.smallest_for(65536) is IndexDtype.UINT32


# ---------------------------------------------------------------------------------------------
# CodecConfig


def test_config_defaults() -> None:
    config = CodecConfig()

    assert config.quantization is Quantization.INT8
    assert config.block_size == 4096
    assert config.zstd_level == 1
    assert config.topk_fraction is None
    assert config.clip_norm is None


def test_config_round_trip_and_string_quantization() -> None:
    config = CodecConfig(quantization="int4", topk_fraction=0.01, block_size=256, clip_norm=2.5)  # type: ignore[arg-type]

    again = CodecConfig.from_dict(json.loads(json.dumps(config.to_dict())))

    assert again == config
    assert again.quantization is Quantization.INT4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quantization": "int3"},
        {"topk_fraction": 0.0},
        {"topk_fraction": 1.5},
        {"topk_fraction": float("nan")},
        {"block_size": 3},
        {"block_size": 96},  # not a power of two
        {"block_size": 2},
        {"block_size": 1 << 25},
        {"zstd_level": 20},
        {"zstd_level": 1.0},
        {"clip_norm": 0.0},
        {"clip_norm": float("inf")},
        {"clip_norm": True},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(CodecError) as info:
        CodecConfig(**kwargs)

    assert info.value.reason is RejectReason.BAD_CODEC


def test_config_topk_count() -> None:
    assert CodecConfig(topk_fraction=0.01).topk_count(4298) == 43
    assert CodecConfig(topk_fraction=0.07).topk_count(100) == 7
    assert CodecConfig(topk_fraction=1e-9).topk_count(10) == 1
    assert CodecConfig(topk_fraction=1.0).topk_count(10) == 10
    assert CodecConfig().topk_count(10) is None


def test_config_from_dict_rejects_unknown_field() -> None:
    with pytest.raises(CodecError):
        CodecConfig.from_dict({"quantization": "int8", "speed": "fast"})


# ---------------------------------------------------------------------------------------------
# CodecDescriptor


def _valid_dict() -> dict[str, Any]:
    return {
        "format": 1,
        "quantization": "int8",
        "num_params": 10,
        "block_size": 4,
        "topk": None,
        "index_dtype": None,
        "compression": "zstd",
        "raw_size": 32,
    }


def test_descriptor_from_valid_dict() -> None:
    descriptor = CodecDescriptor.from_dict(_valid_dict())

    assert descriptor.quantization is Quantization.INT8
    assert descriptor.num_params == 10
    assert descriptor.raw_size == 32
    assert not descriptor.is_sparse
    assert descriptor.to_dict() == _valid_dict()


@st.composite
def descriptors(draw: st.DrawFn) -> CodecDescriptor:
    quantization = draw(st.sampled_from(list(Quantization)))
    num_params = draw(st.integers(1, 2**32 - 1))
    block_size = 1 << draw(st.integers(2, 24))
    topk = draw(st.none() | st.integers(1, num_params))
    index_dtype = None if topk is None else draw(st.sampled_from(list(IndexDtype)))
    layout = body_layout(
        quantization,
        num_values=num_params if topk is None else topk,
        block_size=block_size,
        index_dtype=index_dtype,
    )
    return CodecDescriptor(
        quantization=quantization,
        num_params=num_params,
        block_size=block_size,
        raw_size=layout.raw_size,
        topk=topk,
        index_dtype=index_dtype,
    )


@settings(max_examples=60, deadline=None)
@given(descriptors())
def test_descriptor_round_trips_through_json(descriptor: CodecDescriptor) -> None:
    wire = json.dumps(descriptor.to_dict())

    again = CodecDescriptor.from_dict(json.loads(wire))

    assert again == descriptor


_MUTATIONS: list[tuple[str, object]] = [
    ("format", 2),
    ("format", "1"),
    ("format", True),
    ("quantization", "int16"),
    ("quantization", 8),
    ("num_params", 0),
    ("num_params", -5),
    ("num_params", 2**32),
    ("num_params", 10.0),
    ("num_params", True),
    ("num_params", "10"),
    ("block_size", 6),
    ("block_size", 0),
    ("block_size", None),
    ("raw_size", 31),  # lies about the layout
    ("raw_size", 10**9),
    ("raw_size", -1),
    ("compression", "gzip"),
    ("compression", None),
    ("topk", 3),  # topk without index_dtype
    ("index_dtype", "uint16"),  # index_dtype without topk
]


@pytest.mark.parametrize(("key", "value"), _MUTATIONS)
def test_descriptor_from_dict_rejects_each_bad_field(key: str, value: object) -> None:
    data = _valid_dict()
    data[key] = value

    with pytest.raises(CodecError) as info:
        CodecDescriptor.from_dict(data)

    assert info.value.reason is RejectReason.BAD_CODEC


def test_descriptor_from_dict_rejects_sparse_inconsistencies() -> None:
    base = {**_valid_dict(), "topk": 3, "index_dtype": "uint16", "raw_size": 24}
    assert CodecDescriptor.from_dict(base).topk == 3

    for key, value in [("topk", 11), ("topk", 0), ("index_dtype", "uint64"), ("topk", 3.0)]:
        with pytest.raises(CodecError):
            CodecDescriptor.from_dict({**base, key: value})


def test_descriptor_from_dict_rejects_missing_and_unknown_keys() -> None:
    missing = _valid_dict()
    del missing["raw_size"]
    with pytest.raises(CodecError):
        CodecDescriptor.from_dict(missing)
    with pytest.raises(CodecError):
        CodecDescriptor.from_dict({**_valid_dict(), "extra": 1})
    with pytest.raises(CodecError):
        CodecDescriptor.from_dict([1, 2, 3])  # type: ignore[arg-type]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*_valid_dict().keys(), "junk"]) | st.text(max_size=5), _json, max_size=9
    )
)
def test_descriptor_from_garbage_raises_codec_error_only(data: dict[str, Any]) -> None:
    reason = RejectReason.BAD_CODEC
    try:
        CodecDescriptor.from_dict(data)
    except CodecError as exc:
        reason = exc.reason

    assert reason is RejectReason.BAD_CODEC


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(list(_valid_dict())), _json)
def test_descriptor_with_one_garbage_field_never_crashes(key: str, value: object) -> None:
    data = {**_valid_dict(), key: value}

    try:
        descriptor = CodecDescriptor.from_dict(data)
    except CodecError as exc:
        reason: RejectReason | None = exc.reason
    else:
        reason = None
        assert descriptor.to_dict()[key] == value

    assert reason in (None, RejectReason.BAD_CODEC)
