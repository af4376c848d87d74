"""zstd over update bodies, with decompression that can never inflate past a known size.

Receiver rules (all before a single output byte is produced):

1. the caller passes the exact ``expected_size`` it computed from the descriptor; if that is over
   its own ``max_decompressed`` budget the body is refused (``DECOMPRESSION_BOMB``);
2. the zstd frame header is parsed; a declared content size different from ``expected_size``
   is refused (bigger: ``DECOMPRESSION_BOMB``; smaller: ``BAD_COMPRESSION``). This matters
   because python-zstandard's one-shot ``decompress`` allocates the *declared* size and ignores
   ``max_output_size`` when the header carries one;
3. decompression runs with ``max_output_size=expected_size`` and ``allow_extra_data=False``
   (trailing bytes are refused); frames without a declared size that fail are re-read through a
   streaming reader capped at ``expected_size + 1`` bytes, only to tell a bomb
   (``DECOMPRESSION_BOMB``) from corruption (``BAD_COMPRESSION``);
4. the decompressor's window is capped (:data:`MAX_WINDOW_SIZE`), bounding its own memory.
"""

from __future__ import annotations

from typing import Final

import zstandard

from edgefl.errors import CodecError, RejectReason
from edgefl.perthread import PerThread

__all__ = ["MAX_WINDOW_SIZE", "compress", "decompress_bounded"]

#: Largest zstd window a receiver accepts (level 19 on a large body uses 8 MiB).
MAX_WINDOW_SIZE: Final = 1 << 23
_PROBE_READ: Final = 1 << 20

_compressors: PerThread[int, zstandard.ZstdCompressor] = PerThread(
    lambda level: zstandard.ZstdCompressor(
        level=level, write_content_size=True, write_checksum=False
    )
)
_decompressors: PerThread[int, zstandard.ZstdDecompressor] = PerThread(
    lambda window: zstandard.ZstdDecompressor(max_window_size=window)
)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    return _compressors.get(level)


def _decompressor() -> zstandard.ZstdDecompressor:
    return _decompressors.get(MAX_WINDOW_SIZE)


def compress(raw: bytes | bytearray | memoryview, level: int) -> bytes:
    """One zstd frame with the content size in its header (receivers check it)."""
    return _compressor(level).compress(raw)


def decompress_bounded(
    body: bytes | bytearray | memoryview, *, expected_size: int, max_decompressed: int
) -> bytes:
    """Decompress one zstd frame that must inflate to exactly ``expected_size`` bytes.

    Never allocates more than ``expected_size`` output bytes (plus zstd's bounded window).
    Raises ``CodecError`` with ``DECOMPRESSION_BOMB`` or ``BAD_COMPRESSION``.
    """
    if expected_size > max_decompressed:
        raise CodecError(
            RejectReason.DECOMPRESSION_BOMB,
            f"declared body of {expected_size} bytes exceeds the limit of {max_decompressed}",
        )
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise CodecError(RejectReason.BAD_COMPRESSION, f"not a zstd frame: {exc}") from None
    declared = params.content_size
    known = declared != zstandard.CONTENTSIZE_UNKNOWN
    if known and declared > expected_size:
        raise CodecError(
            RejectReason.DECOMPRESSION_BOMB,
            f"zstd frame declares {declared} bytes, descriptor says {expected_size}",
        )
    if known and declared < expected_size:
        raise CodecError(
            RejectReason.BAD_COMPRESSION,
            f"zstd frame declares {declared} bytes, descriptor says {expected_size}",
        )
    if params.window_size > MAX_WINDOW_SIZE:
        raise CodecError(
            RejectReason.BAD_COMPRESSION,
            f"zstd window of {params.window_size} bytes exceeds {MAX_WINDOW_SIZE}",
        )
    if expected_size == 0 and not known:
        # zstandard refuses max_output_size=0 for frames without a size; nothing legal is empty
        raise CodecError(RejectReason.BAD_COMPRESSION, "empty body without a declared size")
    try:
        raw = _decompressor().decompress(
            body, max_output_size=expected_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        if not known and _inflates_beyond(body, expected_size):
            raise CodecError(
                RejectReason.DECOMPRESSION_BOMB,
                f"zstd frame inflates beyond the declared {expected_size} bytes",
            ) from None
        raise CodecError(RejectReason.BAD_COMPRESSION, f"zstd: {exc}") from None
    if len(raw) != expected_size:
        raise CodecError(
            RejectReason.BAD_COMPRESSION,
            f"body inflated to {len(raw)} bytes, descriptor says {expected_size}",
        )
    return raw


def _inflates_beyond(body: bytes | bytearray | memoryview, limit: int) -> bool:
    """Whether the first frame of ``body`` produces more than ``limit`` bytes.

    Reads at most ``limit + 1`` bytes through a streaming reader, in pieces of at most 1 MiB,
    so a bomb is detected without being inflated.
    """
    produced = 0
    try:
        with _decompressor().stream_reader(body, read_across_frames=False) as reader:
            while produced <= limit:
                piece = reader.read(min(_PROBE_READ, limit + 1 - produced))
                if not piece:
                    break
                produced += len(piece)
    except zstandard.ZstdError:
        return produced > limit
    return produced > limit
