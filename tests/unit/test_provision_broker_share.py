"""``share_with_broker``: what the provisioned ``broker/`` directory looks like to its broker.

The real-broker check (Mosquitto started as root, in place) is
``tests/integration/test_broker_provisioned_in_place.py``; here, the cases that change nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgefl.security.provision import FleetDirectory, init_fleet, share_with_broker


def _modes(layout: FleetDirectory) -> dict[str, tuple[int, int, int]]:
    paths = [layout.broker_dir, *sorted(layout.broker_dir.iterdir())]
    return {
        p.name: (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode)) for p in paths
    }


def test_an_unknown_broker_user_changes_nothing(tmp_path: Path) -> None:
    layout = init_fleet(tmp_path / "fleet", "lab", ["localhost"], use_mosquitto_passwd=False)
    before = _modes(layout)

    shared = share_with_broker(layout, user="no-such-user-edgefl")

    assert shared is False
    assert _modes(layout) == before


def test_secrets_are_never_readable_by_other_users(tmp_path: Path) -> None:
    # as root with a mosquitto user the secrets become the broker's, otherwise they stay
    # root's (or the caller's): in both cases 0600
    layout = init_fleet(tmp_path / "fleet", "lab", ["localhost"], use_mosquitto_passwd=False)

    for name in ("server.key", "passwd"):
        mode = stat.S_IMODE((layout.broker_dir / name).stat().st_mode)
        assert mode == 0o600, name
    assert stat.S_IMODE(layout.broker_dir.stat().st_mode) & 0o007 == 0
    if os.geteuid() != 0:
        assert layout.broker_dir.stat().st_uid == os.geteuid()
