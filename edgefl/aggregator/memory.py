"""Process-level tuning for the aggregator (called by the blocking entry point only).

**BLAS threads.** numpy's bundled OpenBLAS runs vector products (e.g. the norm of the aggregate
at every FedBuff step) on a thread pool whose workers then busy-wait for about 0.1 s. With a
step every few hundred milliseconds they spin almost all the time and take a whole core from
ingest: measured 357 -> 660 updates/s (100k parameters) and 2.9 -> 1.3 ms CPU per update with
one BLAS thread. :func:`limit_blas_threads` sets the pool to one thread through OpenBLAS's own
API (what ``threadpoolctl`` does, without the dependency).

**Memory.**
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
import re
from pathlib import Path

__all__ = ["limit_blas_threads", "pin_mmap_threshold", "tune_process"]

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
    pin_mmap_threshold()
