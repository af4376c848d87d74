"""Codec vocabulary: what a device is asked to send and what travels in the envelope header.

* :class:`Quantization` names the value encoding (fp32, fp16, int8, int4, int2).
* :class:`CodecConfig` is the sender's recipe (quantization, top-k fraction, block size, zstd
  level, clipping). The aggregator may publish it in the model manifest, so it has a validated
  ``to_dict``/``from_dict`` too.
* :class:`CodecDescriptor` is the receiver's view of one encoded body: everything needed to
  decode it and, crucially, the **exact decompressed size**. ``from_dict`` validates every field
  and recomputes that size from the layout, so a receiver knows how many bytes it is about to
  inflate before it calls zstd.

Every validation failure raises :class:`edgefl.errors.CodecError` with ``BAD_CODEC``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, TypeAlias, TypeVar

from edgefl.codec.layout import (
    MAX_BLOCK_SIZE,
    MAX_NUM_PARAMS,
    MIN_BLOCK_SIZE,
    IndexDtype,
    Quantization,
    body_layout,
)
from edgefl.errors import CodecError, RejectReason

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"

#: Version of the descriptor/body format. Bump it for any incompatible change to the layout.
CODEC_FORMAT: Final = 1
#: zstd levels a sender may use. Negative levels are zstd's "fast" modes; 20-22 ("ultra") are
#: excluded because their windows (up to 128 MiB) exceed what a receiver agrees to allocate.
MIN_ZSTD_LEVEL: Final = -7
MAX_ZSTD_LEVEL: Final = 19

__all__ = [
    "CODEC_FORMAT",
    "CodecConfig",
    "CodecDescriptor",
    "Compression",
    "IndexDtype",
    "JSONValue",
    "Quantization",
]


class Compression(StrEnum):
    """Entropy coder over the body. Only zstd exists; the field keeps the header self-describing."""

    ZSTD = "zstd"


def _bad(detail: str) -> CodecError:
    return CodecError(RejectReason.BAD_CODEC, detail)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise _bad(f"{name} must be an integer, got {type(value).__name__}")
    assert isinstance(value, int)
    if not lo <= value <= hi:
        raise _bad(f"{name}={value} outside [{lo}, {hi}]")
    return value


def _check_block_size(value: object) -> int:
    block_size = _check_int("block_size", value, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
    if block_size & (block_size - 1):
        raise _bad(f"block_size={block_size} is not a power of two")
    return block_size


_E = TypeVar("_E", bound=StrEnum)


def _check_enum(name: str, enum: type[_E], value: object) -> _E:
    if isinstance(value, enum):
        return value
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string, got {type(value).__name__}")
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(member.value for member in enum)
        raise _bad(f"unknown {name} {value!r} (known: {known})") from None


def _check_positive_float(name: str, value: object, *, upper: float = math.inf) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 < number <= upper):
        raise _bad(f"{name}={value!r} must be finite and in (0, {upper}]")
    return number


def _check_keys(data: object, required: frozenset[str], optional: frozenset[str]) -> None:
    if not isinstance(data, Mapping):
        raise _bad(f"expected a JSON object, got {type(data).__name__}")
    keys = set(data)
    if not all(isinstance(key, str) for key in keys):
        raise _bad("keys must be strings")
    missing = required - keys
    unknown = keys - required - optional
    if missing:
        raise _bad(f"missing fields: {sorted(missing)}")
    if unknown:
        raise _bad(f"unknown fields: {sorted(unknown)}")


@dataclass(frozen=True, slots=True)
class CodecConfig:
    """What a device is asked to send.

    Pipeline (in this order): L2 clip to ``clip_norm`` → add the error-feedback residual →
    keep the ``topk_fraction`` largest magnitudes (``ceil(fraction · n)``, at least 1) →
    quantize the kept values with ``quantization`` (per-block scales over ``block_size``
    values) → zstd at ``zstd_level``.

    ``block_size`` must be a power of two in [4, 2**24]; that keeps packed int4/int2 blocks
    byte-aligned and lets the decoder work in fixed-size slices.
    """

    quantization: Quantization = Quantization.INT8
    topk_fraction: float | None = None
    block_size: int = 4096
    zstd_level: int = 1
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "quantization", _check_enum("quantization", Quantization, self.quantization)
        )
        if self.topk_fraction is not None:
            fraction = _check_positive_float("topk_fraction", self.topk_fraction, upper=1.0)
            object.__setattr__(self, "topk_fraction", fraction)
        _check_block_size(self.block_size)
        _check_int("zstd_level", self.zstd_level, MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL)
        if self.clip_norm is not None:
            object.__setattr__(
                self, "clip_norm", _check_positive_float("clip_norm", self.clip_norm)
            )

    def topk_count(self, num_params: int) -> int | None:
        """Number of values kept for a vector of ``num_params`` (None without top-k)."""
        if self.topk_fraction is None:
            return None
        # the small epsilon keeps e.g. 0.07 * 100 (= 7.000000000000001) at 7
        return max(1, min(num_params, math.ceil(self.topk_fraction * num_params - 1e-9)))

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "quantization": self.quantization.value,
            "topk_fraction": self.topk_fraction,
            "block_size": self.block_size,
            "zstd_level": self.zstd_level,
            "clip_norm": self.clip_norm,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CodecConfig:
        """Parse and validate; absent optional fields take their defaults."""
        _check_keys(data, frozenset(), _CONFIG_KEYS)
        quantization = _check_enum(
            "quantization", Quantization, data.get("quantization", Quantization.INT8.value)
        )
        topk = data.get("topk_fraction")
        clip = data.get("clip_norm")
        return cls(
            quantization=quantization,
            topk_fraction=None if topk is None else _check_positive_float("topk_fraction", topk),
            block_size=_check_block_size(data.get("block_size", 4096)),
            zstd_level=_check_int(
                "zstd_level", data.get("zstd_level", 1), MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL
            ),
            clip_norm=None if clip is None else _check_positive_float("clip_norm", clip),
        )


_CONFIG_KEYS: Final = frozenset(
    {"quantization", "topk_fraction", "block_size", "zstd_level", "clip_norm"}
)
_DESCRIPTOR_REQUIRED: Final = frozenset(
    {"format", "quantization", "num_params", "block_size", "compression", "raw_size"}
)
_DESCRIPTOR_OPTIONAL: Final = frozenset({"topk", "index_dtype"})


@dataclass(frozen=True, slots=True)
class CodecDescriptor:
    """How one update body is encoded; travels as a JSON object in the envelope header.

    Fields:
        quantization: value encoding of the body.
        num_params: length of the dense delta vector (must match the model spec).
        block_size: values per fp32 scale (int quantizations; carried but unused for fp).
        raw_size: exact size in bytes of the decompressed body. It must equal the size the
            layout implies (see :mod:`edgefl.codec.layout`), so a receiver can bound
            decompression before it starts.
        topk: number of (index, value) pairs for a sparse body; None for a dense body.
        index_dtype: unsigned dtype of the index gaps of a sparse body; None for dense.
        compression: entropy coder over the body (zstd).

    Construction validates everything and raises ``CodecError(BAD_CODEC)``; every instance is
    therefore internally consistent.
    """

    quantization: Quantization
    num_params: int
    block_size: int
    raw_size: int
    topk: int | None = None
    index_dtype: IndexDtype | None = None
    compression: Compression = Compression.ZSTD

    def __post_init__(self) -> None:
        quantization = _check_enum("quantization", Quantization, self.quantization)
        object.__setattr__(self, "quantization", quantization)
        object.__setattr__(
            self, "compression", _check_enum("compression", Compression, self.compression)
        )
        num_params = _check_int("num_params", self.num_params, 1, MAX_NUM_PARAMS)
        block_size = _check_block_size(self.block_size)
        raw_size = _check_int("raw_size", self.raw_size, 0, 2**62)
        if (self.topk is None) != (self.index_dtype is None):
            raise _bad("topk and index_dtype must both be set (sparse) or both be null (dense)")
        index_dtype: IndexDtype | None = None
        if self.topk is not None:
            _check_int("topk", self.topk, 1, num_params)
            index_dtype = _check_enum("index_dtype", IndexDtype, self.index_dtype)
            object.__setattr__(self, "index_dtype", index_dtype)
        expected = body_layout(
            quantization,
            num_values=num_params if self.topk is None else self.topk,
            block_size=block_size,
            index_dtype=index_dtype,
        ).raw_size
        if raw_size != expected:
            raise _bad(f"raw_size={raw_size} but the declared layout needs {expected} bytes")

    @property
    def is_sparse(self) -> bool:
        return self.topk is not None

    @property
    def num_values(self) -> int:
        """Number of coded values: topk for a sparse body, num_params for a dense one."""
        return self.num_params if self.topk is None else self.topk

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "format": CODEC_FORMAT,
            "quantization": self.quantization.value,
            "num_params": self.num_params,
            "block_size": self.block_size,
            "topk": self.topk,
            "index_dtype": None if self.index_dtype is None else self.index_dtype.value,
            "compression": self.compression.value,
            "raw_size": self.raw_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CodecDescriptor:
        """Parse and validate a descriptor from untrusted JSON; raises CodecError(BAD_CODEC)."""
        _check_keys(data, _DESCRIPTOR_REQUIRED, _DESCRIPTOR_OPTIONAL)
        version = data["format"]
        if not _is_int(version) or version != CODEC_FORMAT:
            raise _bad(f"unsupported codec format {version!r} (this build reads {CODEC_FORMAT})")
        topk = data.get("topk")
        index_dtype = data.get("index_dtype")
        return cls(
            quantization=_check_enum("quantization", Quantization, data["quantization"]),
            num_params=_check_int("num_params", data["num_params"], 1, MAX_NUM_PARAMS),
            block_size=_check_block_size(data["block_size"]),
            raw_size=_check_int("raw_size", data["raw_size"], 0, 2**62),
            topk=None if topk is None else _check_int("topk", topk, 1, MAX_NUM_PARAMS),
            index_dtype=(
                None if index_dtype is None else _check_enum("index_dtype", IndexDtype, index_dtype)
            ),
            compression=_check_enum("compression", Compression, data["compression"]),
        )
