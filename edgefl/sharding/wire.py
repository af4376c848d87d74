"""Bytes of a partial sum on ``edgefl/v1/<fleet>/shards/partial/<shard>`` (docs/SCALING.md).

Layout (all integers big-endian)::

    0   4  magic  b"EDFP"
    4   1  format version 1
    5   3  zero
    8   4  header length H (<= 1 MiB)
    12  H  header: canonical JSON {id: [shard, partition, epoch, number], version, weight_sum,
           count, staleness_sum, staleness_max, clipped, num_params, covered: [[device, seq]..]}
    12+H   4 * num_params bytes: the accumulator A_s, little-endian float32
    end-4  4  CRC-32 of everything before

Floats in the header are written with ``repr`` precision by ``json`` (a float64 round-trips
exactly), so ``decode_partial(encode_partial(p)) == p`` bit for bit. A future protocol revision
makes this an envelope kind; until then it is framed here. Every malformed input raises
``ProtocolError`` with a reason (TRUNCATED, BAD_MAGIC, BAD_VERSION, TOO_LARGE, BAD_CHECKSUM,
BAD_HEADER, SHAPE_MISMATCH); ``max_params`` bounds the allocation before anything is read.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Final

import numpy as np

from edgefl.errors import ProtocolError, RejectReason
from edgefl.sharding.partial import PartialId, PartialSum

MAGIC: Final = b"EDFP"
FORMAT_VERSION: Final = 1
MAX_HEADER: Final = 1 << 20
_PREFIX = struct.Struct(">4sB3xI")
_CRC = struct.Struct(">I")
_LE_F32 = np.dtype("<f4")


def encode_partial(partial: PartialSum) -> bytes:
    """The wire form of ``partial``."""
    pid = partial.id
    header = {
        "id": [pid.shard, pid.partition, pid.epoch, pid.number],
        "version": partial.version,
        "weight_sum": partial.weight_sum,
        "count": partial.count,
        "staleness_sum": partial.staleness_sum,
        "staleness_max": partial.staleness_max,
        "clipped": partial.clipped,
        "num_params": int(partial.accumulator.shape[0]),
        "covered": [[d, s] for d, s in partial.covered],
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(head) > MAX_HEADER:
        raise ValueError(f"partial header of {len(head)} B > {MAX_HEADER} B: close it earlier")
    body = partial.accumulator.astype(_LE_F32, copy=False).tobytes()
    data = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + body
    return data + _CRC.pack(zlib.crc32(data))


def decode_partial(data: bytes | bytearray | memoryview, *, max_params: int) -> PartialSum:
    """Parse :func:`encode_partial`'s bytes (see the module docstring for the checks)."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size + _CRC.size:
        raise ProtocolError(RejectReason.TRUNCATED, f"{len(view)} B is no partial")
    magic, version, head_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(RejectReason.BAD_MAGIC, f"magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise ProtocolError(RejectReason.BAD_VERSION, f"partial format {version}")
    if head_len > MAX_HEADER:
        raise ProtocolError(RejectReason.TOO_LARGE, f"header of {head_len} B")
    end_head = _PREFIX.size + head_len
    if len(view) < end_head + _CRC.size:
        raise ProtocolError(RejectReason.TRUNCATED, "partial shorter than its header")
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    if zlib.crc32(view[: len(view) - _CRC.size]) != crc:
        raise ProtocolError(RejectReason.BAD_CHECKSUM, "partial crc32 mismatch")
    header = _header(bytes(view[_PREFIX.size : end_head]))
    params = header["num_params"]
    if not isinstance(params, int) or not 0 < params <= max_params:
        raise ProtocolError(RejectReason.TOO_LARGE, f"num_params {params!r} > {max_params}")
    body = view[end_head : len(view) - _CRC.size]
    if len(body) != 4 * params:
        raise ProtocolError(RejectReason.SHAPE_MISMATCH, f"{len(body)} B for {params} params")
    accumulator = np.frombuffer(body, dtype=_LE_F32).astype(np.float32)
    return _partial(header, accumulator)


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(RejectReason.BAD_HEADER, f"partial header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(RejectReason.BAD_HEADER, "partial header is not an object")
    return header


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _partial(header: dict[str, Any], accumulator: np.ndarray) -> PartialSum:
    try:
        shard, partition, epoch, number = header["id"]
        return PartialSum(
            id=PartialId(str(shard), _nat(partition), _nat(epoch), _nat(number)),
            version=_nat(header["version"]),
            accumulator=accumulator,
            weight_sum=float(header["weight_sum"]),
            count=_nat(header["count"]),
            staleness_sum=_nat(header["staleness_sum"]),
            staleness_max=_nat(header["staleness_max"]),
            clipped=_nat(header["clipped"]),
            covered=tuple((str(d), _nat(s)) for d, s in header["covered"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(RejectReason.BAD_HEADER, f"partial header: {exc}") from None


def _nat(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an int >= 0, got {value!r}")
    return value
