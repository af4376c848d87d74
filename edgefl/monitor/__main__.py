"""``python -m edgefl.monitor --fleet NAME ...``: the same as ``edgefl monitor``, with the same
error lines and exit codes."""

from __future__ import annotations

from edgefl.monitor.cli import main

if __name__ == "__main__":
    main()
