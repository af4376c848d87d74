"""Process-level tuning for the aggregator (called by the blocking entry point only).

**BLAS threads.** numpy's bundled OpenBLAS runs vector products (e.g. the norm of the aggregate
at every FedBuff step) on a thread pool whose workers then busy-wait for about 0.1 s. With a
step every few hundred milliseconds they spin almost all the time and take a whole core from
ingest (measurements: docs/AGGREGATOR.md, "Tuning"). :func:`limit_blas_threads` sets the
pool to one thread through OpenBLAS's own API (what ``threadpoolctl`` does, without the
dependency).

**Memory.**
The aggregator allocates and frees many short-lived buffers of 100 kB to a few MB (MQTT
payloads, reassembled and decompressed bodies) and, at every server step, a few model-sized
arrays. glibc's defaults fit neither: its *dynamic* mmap threshold grows to the largest freed
block, after which big buffers come from the heap and fragment it (RSS stays far above what is
live), and its 128 KiB trim threshold hands the top of the heap back to the kernel at nearly
every free, so the next buffer page-faults in again. :func:`tune_malloc` fixes both: buffers
under 2 MiB come from the heap, whose top is trimmed only past 16 MiB free; model-sized arrays
(4 MB at 1M parameters) get their own mappings, returned when freed. The measured effect (page
faults, updates/s and peak RSS on ``bench/ingest.py``, against the alternatives tried) is in
docs/AGGREGATOR.md, "Tuning".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from pathlib import Path

__all__ = ["limit_blas_threads", "pin_mmap_threshold", "tune_malloc", "tune_process"]

log = logging.getLogger("edgefl.aggregator")

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(param, ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (disables its dynamic growth); False where not glibc."""
    ok = _mallopt(_M_MMAP_THRESHOLD, threshold)
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return ok


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Both glibc thresholds (see the module docstring); False where not glibc."""
    ok = pin_mmap_threshold(mmap_threshold)
    if not _mallopt(_M_TRIM_THRESHOLD, trim_threshold):
        log.debug("mallopt(M_TRIM_THRESHOLD) refused")
        return False
    return ok


_SET_THREADS = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
)


def limit_blas_threads(threads: int = 1) -> bool:
    """Set every loaded OpenBLAS to ``threads`` threads; False when none was found."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    done = False
    for path in sorted(set(re.findall(r"\S*openblas\S*\.so\S*", maps))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _SET_THREADS:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(threads))
                done = True
                break
    return done


def tune_process() -> None:
    """Everything above; call once at process start, before the service runs."""
    import numpy  # noqa: F401  (loads OpenBLAS, so that it can be found and limited)

    limit_blas_threads(1)
    tune_malloc()
