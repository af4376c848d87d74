"""Process-level memory tuning for the aggregator (called by the blocking entry point only).

The aggregator allocates and frees many short-lived buffers of 100 kB to a few MB (MQTT
payloads, decompressed bodies, dense scratch, model snapshots). glibc's *dynamic* mmap threshold
grows to the largest freed block, after which such buffers come from the heap and fragment it:
RSS then stays far above what is live. Pinning the threshold at 128 KiB keeps them in their own
mappings, returned to the OS when freed. Measured on ``bench/ingest.py`` (1M-parameter model):
peak RSS 170 MB -> 141 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["pin_mmap_threshold"]

log = logging.getLogger("edgefl.aggregator")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def pin_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold (disables its dynamic growth); False where not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return ok
