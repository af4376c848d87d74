"""``edgefl.aggregator.memory``: malloc tuning."""

from __future__ import annotations

from edgefl.aggregator.memory import tune_malloc


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    # glibc is what this project's machines and Raspberry Pi OS run; elsewhere it must say no
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
