"""systemd service notifications for the agent: re-exports :mod:`edgefl.sdnotify`.

The generic sd_notify(3) client lives in :mod:`edgefl.sdnotify` (the aggregator uses it too);
this module keeps the agent's import path working.
"""

from __future__ import annotations

from edgefl.sdnotify import SystemdNotifier

__all__ = ["SystemdNotifier"]
