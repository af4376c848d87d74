"""The provisioned ``broker/`` directory runs in place under a Mosquitto started as root.

``mosquitto -c <out>/broker/mosquitto.conf`` as root: Mosquitto reads the config and the TLS
files as root, drops to the ``mosquitto`` user, and only then opens the password file and the
ACL. With the files root-owned ``0600`` it stopped with "Unable to open pwfile" (issue 15).
:func:`edgefl.security.provision.share_with_broker` (run by ``init_fleet`` and ``add_device``)
gives the broker's user its two secrets and the directory's group; this test starts the real
broker from the generated, unmodified config as root, checks that it dropped privileges, that a
provisioned device logs in (and a wrong password does not), and that no other user can read the
secrets.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest

from broker.launcher import BrokerStartError, free_port, wait_for_port
from edgefl.security.provision import FleetDirectory, add_device, init_fleet
from edgefl.transport import MqttConfig, MqttTransport, NotConnectedError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FLEET = "lab"


def _require_root_and_broker_user() -> pwd.struct_passwd:
    """The test is about a root-started broker dropping to ``mosquitto``: it needs both."""
    needs.mosquitto()
    if os.geteuid() != 0:
        pytest.skip("starts Mosquitto as root (run the integration tests as root, as CI does)")
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.fail(f"no 'mosquitto' user on this host: {needs.SETUP_HINT}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are 0700 root, and the broker's user must reach the
    # directory as it would reach /etc/mosquitto/edgefl.
    path = Path(tempfile.mkdtemp(prefix="edgefl-inplace-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _mosquitto_as_root(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [needs.mosquitto(), "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        try:
            wait_for_port("127.0.0.1", port, 10.0, alive=lambda: proc.poll() is None)
        except BrokerStartError as exc:
            raise AssertionError(f"{exc}; broker log:\n{log.read_text(errors='replace')}") from None
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError(f"no Uid line for pid {pid}")


def _config(layout: FleetDirectory, port: int, user: str, password: str) -> MqttConfig:
    return MqttConfig.from_url(
        f"mqtts://localhost:{port}",
        ca_file=layout.broker_dir / "ca.pem",
        username=user,
        password=password,
        start_timeout=5.0,
        operation_timeout=5.0,
    )


async def test_root_started_mosquitto_runs_the_provisioned_directory_in_place(
    workdir: Path,
) -> None:
    account = _require_root_and_broker_user()
    port = free_port()
    data = workdir / "data"  # /var/lib/mosquitto on a broker host: the broker user's
    data.mkdir()
    os.chown(data, account.pw_uid, account.pw_gid)
    layout = init_fleet(
        workdir / "fleet", FLEET, ["localhost", "127.0.0.1"], port=port, data_dir=str(data)
    )
    add_device(layout.root, "dev-a")  # rewrites the password file after init
    password = (layout.device_dir("dev-a") / "mqtt-password").read_text().strip()

    with _mosquitto_as_root(
        layout.broker_dir / "mosquitto.conf", port, workdir / "mosquitto.log"
    ) as proc:
        assert _uid_of(proc.pid) == account.pw_uid  # it did drop privileges
        async with MqttTransport(_config(layout, port, "dev-a", password)) as device:
            assert device.connected
        with pytest.raises(NotConnectedError, match=r"refused|closed"):
            async with MqttTransport(_config(layout, port, "dev-a", "not-the-password")):
                pass

    log = (workdir / "mosquitto.log").read_text(errors="replace")
    assert "Unable to open" not in log
    # the secrets stay private: the broker's user reads them, nobody else (the group neither)
    for name in ("server.key", "passwd"):
        info = (layout.broker_dir / name).stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (account.pw_uid, 0o600), name
    info = layout.broker_dir.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, account.pw_gid, 0o750)
