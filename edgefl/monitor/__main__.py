"""``python -m edgefl.monitor --fleet NAME ...``: the same as ``edgefl monitor``."""

from __future__ import annotations

import typer

from edgefl.monitor.cli import monitor_command


def main() -> None:
    typer.run(monitor_command)


if __name__ == "__main__":
    main()
