"""Fleet provisioning: everything a secure deployment needs, as files in one directory.

``init_fleet(out, fleet, broker_hosts)`` (``edgefl provision init``) creates::

    <out>/fleet.json                 fleet name, broker hosts and port (read by add_device)
    <out>/ca/ca.pem, ca.key          the fleet CA (keep ca.key offline once devices exist)
    <out>/broker/                    copy to the broker host, e.g. /etc/mosquitto/edgefl/
        ca.pem server.pem server.key   TLS (server.key 0600)
        passwd                         Mosquitto password file ($7$ PBKDF2-SHA512)
        acl                            ACL: devices publish only their own update/state/checkin
                                       and read only their own receipts
        mosquitto.conf                 broker/conf/secure.conf rendered for this directory
        mosquitto-mtls.conf            broker/conf/secure-mtls.conf (client certificates)
    <out>/aggregator/                copy to the aggregator host
        signing.key, signing.pub       Ed25519: signs every model manifest
        mqtt-password, ca.pem          MQTT login "aggregator"
        client.pem, client.key         client certificate (CN=aggregator) for the mTLS config
        device-keys/                   <device_id>.pub of every device: load_update_authenticator
    <out>/monitor/mqtt-password, ca.pem   read-only MQTT login "monitor"
    <out>/helper/                    the secure-aggregation helper (docs/PRIVACY.md): copy to a
        secagg.key, secagg.pub         host of *another* operator; X25519 (secagg.key 0600)
        mqtt-password, ca.pem          MQTT login "helper"
        client.pem, client.key         client certificate (CN=helper)
    <out>/aggregator/helper.pub      the helper's public key, for ``--role leader``

``add_device(out, device_id)`` (``edgefl provision device``) adds a password entry (via
``mosquitto_passwd -b`` when installed), an Ed25519 key pair whose public half goes to
``aggregator/device-keys/<id>.pub``, optionally a client certificate, and the bundle
``<out>/devices/<id>/`` (agent.toml, ca.pem, mqtt-password, signing.key, aggregator.pub,
helper.pub) to copy
to ``/etc/edgefl/`` on the device. Secrets are written ``0600``, directories holding them ``0700``.

The ``broker/`` directory can be used in place (``mosquitto -c <out>/broker/mosquitto.conf``):
Mosquitto started as root reads its config and TLS files, then drops to the ``mosquitto`` user
*before* it opens the password file and the ACL. So when provisioning runs as root and that user
exists (:func:`share_with_broker`), ``broker/`` is ``root:<its group>`` ``0750`` and the two
secrets in it (``server.key``, ``passwd``) are owned by the ``mosquitto`` user, still ``0600``:
readable by the broker, by no other user. Run as another user (an admin machine), nothing is
chowned: copy the files to the broker host as ``docs/SECURITY.md`` shows.

One fleet per provisioning directory (and per ACL file): Mosquitto's ACL patterns substitute the
username (``%u``) but cannot tie a username to a fleet, so the fleet name is written into each
pattern. See ``docs/SECURITY.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.launcher import CONF_DIR, MosquittoBroker, render_config
from edgefl.protocol.topics import fleet_name, validate_name

from . import passwords
from .keys import (
    generate_private_key,
    key_id,
    load_private_key,
    public_key_pem,
    write_private_key,
    write_public_key,
)
from .pki import CertifiedKey, issue_certificate, load_ca, make_ca

__all__ = [
    "AGGREGATOR_USER",
    "HELPER_USER",
    "MONITOR_USER",
    "RESERVED_USERS",
    "DeviceBundle",
    "FleetDirectory",
    "ProvisionError",
    "acl_text",
    "add_device",
    "init_fleet",
    "mosquitto_for_fleet",
    "render_broker_config",
    "share_with_broker",
]

AGGREGATOR_USER: Final = "aggregator"
MONITOR_USER: Final = "monitor"
HELPER_USER: Final = "helper"  # the secure-aggregation helper (docs/PRIVACY.md)
RESERVED_USERS: Final = frozenset({AGGREGATOR_USER, MONITOR_USER, HELPER_USER})
SECURE_CONF: Final = CONF_DIR / "secure.conf"
SECURE_MTLS_CONF: Final = CONF_DIR / "secure-mtls.conf"
DEFAULT_PORT: Final = 8883
BROKER_USER: Final = "mosquitto"
"""The account Mosquitto drops to when started as root (its ``user`` option's default)."""
BROKER_SECRETS: Final = ("server.key", "passwd")
LAYOUT_VERSION: Final = 1


class ProvisionError(RuntimeError):
    """Provisioning cannot proceed (existing files, unknown fleet directory, reserved name...)."""


class ProvisionUsageError(ProvisionError):
    """A provisioning request that contradicts its options (reserved or existing device id,
    no broker host, a fleet already there without ``--force``): a usage error, exit code 2."""


def acl_text(fleet: str) -> str:
    """The Mosquitto ACL for one fleet (``acl_file``).

    Patterns apply to every authenticated client with ``%u`` replaced by its username (the device
    id): a device may publish its own updates, state and check-ins, read its own receipts and
    leases, the fleet's models and the server's state, nothing else (no other device's topics,
    no receipt, lease or model topics for writing, no ``#``). The aggregator (the only
    publisher of receipts and leases) and the monitor get explicit ``user`` sections.
    """
    fleet = fleet_name(fleet)
    root = f"edgefl/v1/{fleet}"
    return f"""\
# edgefl ACL for fleet "{fleet}", generated by `edgefl provision`. One fleet per ACL file.
# Mosquitto checks `pattern` lines for every authenticated client, with %u replaced by its MQTT
# username (= the device id); anything not granted here is denied (publishes are dropped,
# subscriptions refused).

# --- every device ---------------------------------------------------------------------------
# (Mosquitto warns that the two `read` patterns contain neither %u nor %c: expected, they are
# the same for every client; plain `topic` lines here would apply to anonymous clients only.)
# Publish its own updates and presence (the Last Will goes to the state topic too).
pattern write {root}/device/%u/update/+
pattern readwrite {root}/device/%u/state
# Ask for / give back a training lease, and read its own leases (participation, protocol 1.2).
pattern write {root}/device/%u/checkin
pattern read {root}/device/%u/lease
# Read its own receipts (protocol 1.1), the fleet's models (manifest, weight and ONNX chunks)
# and the server's presence.
pattern read {root}/device/%u/receipt
pattern read {root}/model/#
pattern read {root}/server/state
# Secure aggregation (protocol 1.3): its own two shares of each update.
pattern write {root}/secagg/share/%u/+
pattern write {root}/secagg/seed/%u/+

# --- the aggregator: the only publisher of models, receipts, leases and server state/metrics ---
user {AGGREGATOR_USER}
topic read {root}/device/+/update/+
topic read {root}/device/+/state
topic read {root}/device/+/checkin
topic readwrite {root}/device/+/receipt
topic readwrite {root}/device/+/lease
topic readwrite {root}/model/#
topic readwrite {root}/server/#
# secure aggregation's leader: the masked shares (never a sealed seed), the helper's reports
topic read {root}/secagg/share/+/+
topic read {root}/secagg/report
topic write {root}/secagg/decision

# --- the secure-aggregation helper: the sealed seeds and decisions, never a masked share ------
user {HELPER_USER}
topic read {root}/secagg/seed/+/+
topic read {root}/secagg/decision
topic write {root}/secagg/report

# --- the monitor: reads the whole fleet but the shares, publishes nothing -------------------
user {MONITOR_USER}
topic deny {root}/secagg/share/#
topic deny {root}/secagg/seed/#
topic read {root}/#
topic read $SYS/#
"""


def render_broker_config(
    *,
    pki_dir: Path,
    port: int | str = DEFAULT_PORT,
    bind: str = "0.0.0.0",
    data_dir: Path | str = "/var/lib/mosquitto",
    template: Path = SECURE_CONF,
) -> str:
    """``broker/conf/secure.conf`` (or another template) with its placeholders filled in.

    Pass ``port="${port}"`` etc. to keep a placeholder for ``broker.launcher.MosquittoBroker``.
    """
    return render_config(
        template.read_text(), pki_dir=pki_dir, port=port, bind=bind, data_dir=data_dir
    )


def mosquitto_for_fleet(
    layout: FleetDirectory,
    state_dir: Path,
    *,
    mtls: bool = False,
    port: int | None = None,
    bind: str = "127.0.0.1",
) -> MosquittoBroker:
    """A (not yet started) ``MosquittoBroker`` running the fleet's secure config: TLS with the
    provisioned certificate, its password file (or client certificates with ``mtls``) and ACL;
    persistence and log in ``state_dir``, a free port unless ``port`` is given. For tests, demos
    and single-host deployments (``broker.start()``, ``broker.url`` is the plain ``mqtt://``
    form: connect with ``mqtts://`` and the fleet's ``ca.pem``)."""
    text = render_broker_config(
        pki_dir=layout.broker_dir.resolve(),
        port="${port}",
        bind="${bind}",
        data_dir="${data_dir}",
        template=SECURE_MTLS_CONF if mtls else SECURE_CONF,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    template = state_dir / ("secure-mtls.conf.in" if mtls else "secure.conf.in")
    template.write_text(text)
    return MosquittoBroker(port=port, bind=bind, state_dir=state_dir, config_template=template)


@dataclass(frozen=True)
class FleetDirectory:
    """Paths inside a provisioning directory (see the module docstring)."""

    root: Path

    @property
    def fleet_file(self) -> Path:
        return self.root / "fleet.json"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def password_file(self) -> Path:
        return self.broker_dir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def aggregator_dir(self) -> Path:
        return self.root / "aggregator"

    @property
    def aggregator_signing_key(self) -> Path:
        return self.aggregator_dir / "signing.key"

    @property
    def aggregator_public_key(self) -> Path:
        return self.aggregator_dir / "signing.pub"

    @property
    def device_keys_dir(self) -> Path:
        return self.aggregator_dir / "device-keys"

    @property
    def monitor_dir(self) -> Path:
        return self.root / "monitor"

    @property
    def helper_dir(self) -> Path:
        return self.root / "helper"

    @property
    def helper_private_key(self) -> Path:
        return self.helper_dir / "secagg.key"

    @property
    def helper_public_key(self) -> Path:
        return self.helper_dir / "secagg.pub"

    def device_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    def read_fleet(self) -> dict[str, object]:
        try:
            info = json.loads(self.fleet_file.read_text())
        except (OSError, ValueError) as exc:
            raise ProvisionError(
                f"{self.fleet_file}: not a provisioned fleet directory (run `edgefl provision"
                f" init` first): {exc}"
            ) from None
        if not isinstance(info, dict) or info.get("layout") != LAYOUT_VERSION:
            raise ProvisionError(f"{self.fleet_file}: unknown layout")
        return info

    def broker_url(self) -> str:
        info = self.read_fleet()
        hosts = info["broker_hosts"]
        if not isinstance(hosts, list) or not hosts:
            raise ProvisionError(f"{self.fleet_file}: no broker_hosts")
        host = str(hosts[0])
        host = f"[{host}]" if ":" in host else host
        return f"mqtts://{host}:{info['port']}"


def _write_secret(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, raw)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    path.chmod(0o644)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def share_with_broker(layout: FleetDirectory, user: str = BROKER_USER) -> bool:
    """Make ``broker/`` usable in place by a Mosquitto that starts as root and drops to ``user``.

    Only when this process is root and ``user`` exists (else returns False and changes nothing):
    the directory becomes ``root:<user's group>`` mode ``0750`` (the broker can read it but not
    create or replace files in it, e.g. its own config), ``server.key`` and ``passwd`` are owned
    by ``user`` and its group with mode ``0600`` (no other account can read them), the public
    files stay ``root`` ``0644``. Called after every change of the directory (``init_fleet``,
    ``add_device``: the password file is replaced atomically, so it is root's again until then).
    """
    if sys.platform == "win32" or os.geteuid() != 0:
        return False
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return False
    broker = layout.broker_dir
    os.chown(broker, 0, account.pw_gid)
    broker.chmod(0o750)
    for name in BROKER_SECRETS:
        path = broker / name
        if path.exists():
            os.chown(path, account.pw_uid, account.pw_gid)
            path.chmod(0o600)
    return True


def _load_fleet_ca(layout: FleetDirectory) -> CertifiedKey:
    try:
        return load_ca(
            (layout.ca_dir / "ca.pem").read_bytes(), (layout.ca_dir / "ca.key").read_bytes()
        )
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot load the fleet CA from {layout.ca_dir}: {exc}") from None


def init_fleet(
    out: str | os.PathLike[str],
    fleet: str,
    broker_hosts: Sequence[str],
    *,
    port: int = DEFAULT_PORT,
    data_dir: str = "/var/lib/mosquitto",
    broker_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    use_mosquitto_passwd: bool = True,
) -> FleetDirectory:
    """Create a fleet's CA, broker certificate and config, aggregator and monitor credentials.

    ``broker_hosts`` are the names (and/or IP addresses) devices use to reach the broker; the
    first one goes into device bundles. ``broker_dir`` is where the ``broker/`` files will live
    on the broker host (the paths written into ``mosquitto.conf``; default: ``<out>/broker``).
    Refuses to overwrite an existing fleet unless ``force``.
    """
    fleet = fleet_name(fleet)
    if not broker_hosts:
        raise ProvisionUsageError("at least one --broker-host is needed")
    if not 0 < port < 65536:
        raise ProvisionUsageError(f"bad port {port}")
    layout = FleetDirectory(Path(out))
    if layout.fleet_file.exists() and not force:
        raise ProvisionUsageError(
            f"{layout.root} already holds a fleet (use --force to replace it)"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    ca = make_ca(f"edgefl fleet {fleet} CA")
    ca_pem = ca.cert_pem()
    _private_dir(layout.ca_dir)
    _write_public(layout.ca_dir / "ca.pem", ca_pem)
    _write_secret(layout.ca_dir / "ca.key", ca.key_pem())
    _write_broker_files(
        layout, ca, fleet, broker_hosts, port=port, data_dir=data_dir, broker_dir=broker_dir
    )
    signing = _write_service_accounts(layout, ca, use_mosquitto_passwd=use_mosquitto_passwd)
    info = {
        "layout": LAYOUT_VERSION,
        "fleet": fleet,
        "broker_hosts": list(broker_hosts),
        "port": port,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "aggregator_key_id": key_id(signing.public_key()).hex(),
    }
    _write_public(layout.fleet_file, json.dumps(info, indent=2) + "\n")
    share_with_broker(layout)
    return layout


def _write_broker_files(
    layout: FleetDirectory,
    ca: CertifiedKey,
    fleet: str,
    broker_hosts: Sequence[str],
    *,
    port: int,
    data_dir: str,
    broker_dir: str | os.PathLike[str] | None,
) -> None:
    """``broker/``: CA, server certificate for every host name, ACL, and both Mosquitto configs
    (password-only and mutual TLS) pointing at ``broker_dir`` (default: this directory)."""
    broker = _private_dir(layout.broker_dir)
    server = issue_certificate(ca, str(broker_hosts[0]), server_names=broker_hosts)
    _write_public(broker / "ca.pem", ca.cert_pem())
    _write_public(broker / "server.pem", server.cert_pem())
    _write_secret(broker / "server.key", server.key_pem())
    _write_public(layout.acl_file, acl_text(fleet))
    layout.password_file.unlink(missing_ok=True)
    pki_dir = broker.resolve() if broker_dir is None else Path(broker_dir)
    for name, template in (
        ("mosquitto.conf", SECURE_CONF),
        ("mosquitto-mtls.conf", SECURE_MTLS_CONF),
    ):
        text = render_broker_config(
            pki_dir=pki_dir, port=port, data_dir=data_dir, template=template
        )
        _write_public(broker / name, text)


def _write_service_accounts(
    layout: FleetDirectory, ca: CertifiedKey, *, use_mosquitto_passwd: bool
) -> Ed25519PrivateKey:
    """``aggregator/`` (signing key pair, client certificate, empty device-keys directory) and
    ``monitor/`` (client certificate), each with an MQTT password; returns the signing key."""
    ca_pem = ca.cert_pem()
    agg = _private_dir(layout.aggregator_dir)
    signing = generate_private_key()
    write_private_key(layout.aggregator_signing_key, signing)
    write_public_key(layout.aggregator_public_key, signing.public_key())
    _write_public(agg / "ca.pem", ca_pem)
    client = issue_certificate(ca, AGGREGATOR_USER, client=True)
    _write_public(agg / "client.pem", client.cert_pem())
    _write_secret(agg / "client.key", client.key_pem())
    if layout.device_keys_dir.exists():
        shutil.rmtree(layout.device_keys_dir)
    layout.device_keys_dir.mkdir()
    mon = _private_dir(layout.monitor_dir)
    helper = _private_dir(layout.helper_dir)
    for user, directory in ((MONITOR_USER, mon), (HELPER_USER, helper)):
        _write_public(directory / "ca.pem", ca_pem)
        account_client = issue_certificate(ca, user, client=True)
        _write_public(directory / "client.pem", account_client.cert_pem())
        _write_secret(directory / "client.key", account_client.key_pem())
    _write_helper_keys(layout)
    accounts = ((AGGREGATOR_USER, agg), (MONITOR_USER, mon), (HELPER_USER, helper))
    for user, directory in accounts:
        password = passwords.generate_password()
        passwords.set_password(
            layout.password_file, user, password, use_mosquitto_passwd=use_mosquitto_passwd
        )
        _write_secret(directory / "mqtt-password", password + "\n")
    return signing


def _write_helper_keys(layout: FleetDirectory) -> None:
    """The helper's X25519 identity (secure aggregation): private key in ``helper/`` (0600),
    public key next to it and in ``aggregator/helper.pub`` (the leader announces it)."""
    from edgefl.secagg import HelperKeys

    keys = HelperKeys.generate()
    _write_secret(layout.helper_private_key, keys.private_pem())
    _write_public(layout.helper_public_key, keys.public_pem())
    _write_public(layout.aggregator_dir / "helper.pub", keys.public_pem())


@dataclass(frozen=True)
class DeviceBundle:
    """What :func:`add_device` produced for one device."""

    device_id: str
    directory: Path  # the bundle to copy to /etc/edgefl/ on the device
    key_id: str  # of the device's Ed25519 signing key
    public_key_file: Path  # registered in aggregator/device-keys/
    client_certificate: Path | None
    password_writer: str  # "mosquitto_passwd" or "python"


def _agent_toml(
    fleet: str, device_id: str, url: str, *, client_cert: bool, data_path: str, helper: bool = True
) -> str:
    cert = (
        'cert_file = "client.pem"\nkey_file = "client.key"\n'
        if client_cert
        else '# cert_file = "client.pem"   # with `edgefl provision device --client-cert`\n'
        '# key_file = "client.key"\n'
    )
    return f"""\
# edgefl device bundle for "{device_id}" in fleet "{fleet}", generated by `edgefl provision`.
# Install: copy this directory to /etc/edgefl/ on the device, owned by the agent's user, mode
# 0700 (it holds the MQTT password and the device's signing key), then edit [data] below.
# Relative paths are relative to this file. Full reference: device_agent/examples/agent.toml.
fleet = "{fleet}"
device_id = "{device_id}"

[broker]
url = "{url}"
ca_file = "ca.pem"
username = "{device_id}"
password_file = "mqtt-password"
{cert}
[data]
# Where this device's local training data lives (npz with arrays x and y, or csv).
kind = "npz"
path = "{data_path}"

[security]
# Every update is signed with this key; the aggregator knows its public half.
signing_key_file = "signing.key"
# Model manifests not signed by the fleet's aggregator are rejected.
aggregator_public_key_file = "aggregator.pub"
{_HELPER_TOML if helper else ""}"""


_HELPER_TOML: Final = """\
# Secure aggregation: updates are sealed to this helper key only (docs/PRIVACY.md).
helper_public_key_file = "helper.pub"
"""


def _fresh_bundle_dir(layout: FleetDirectory, device_id: str, *, force: bool) -> tuple[Path, Path]:
    """An empty private bundle directory for ``device_id`` and the path its public key will be
    registered under; refuses reserved ids and existing devices unless ``force``."""
    if device_id in RESERVED_USERS:
        raise ProvisionUsageError(f"{device_id!r} is reserved for the {device_id} account")
    bundle = layout.device_dir(device_id)
    registered = layout.device_keys_dir / f"{device_id}.pub"
    if (bundle.exists() or registered.exists()) and not force:
        raise ProvisionUsageError(f"device {device_id!r} exists (use --force to re-provision it)")
    if bundle.exists():
        shutil.rmtree(bundle)
    _private_dir(bundle.parent)
    _private_dir(bundle)
    return bundle, registered


def add_device(
    out: str | os.PathLike[str],
    device_id: str,
    *,
    client_cert: bool = False,
    force: bool = False,
    data_path: str = "/var/lib/edgefl/data/train.npz",
    use_mosquitto_passwd: bool = True,
) -> DeviceBundle:
    """Provision one device: MQTT password, Ed25519 key pair, optional client certificate, and
    its bundle directory. ``force`` re-provisions (new password and keys: the old ones stop
    working once the broker reloads)."""
    layout = FleetDirectory(Path(out))
    info = layout.read_fleet()
    fleet = str(info["fleet"])
    device_id = validate_name(device_id, "device id")
    bundle, registered = _fresh_bundle_dir(layout, device_id, force=force)
    password = passwords.generate_password()
    writer = passwords.set_password(
        layout.password_file, device_id, password, use_mosquitto_passwd=use_mosquitto_passwd
    )
    _write_secret(bundle / "mqtt-password", password + "\n")
    share_with_broker(layout)  # the password file was replaced: the broker must read it again

    signing = generate_private_key()
    write_private_key(bundle / "signing.key", signing)
    write_public_key(bundle / "signing.pub", signing.public_key())
    # Register with the aggregator last, atomically (temp file + rename): a half-provisioned
    # device is never trusted.
    write_public_key(registered, signing.public_key())
    agg_key = load_private_key(layout.aggregator_signing_key).public_key()
    _write_public(bundle / "aggregator.pub", public_key_pem(agg_key))
    _write_public(bundle / "ca.pem", (layout.ca_dir / "ca.pem").read_bytes())
    helper = layout.helper_public_key.exists()  # none in fleets provisioned before secagg
    if helper:
        _write_public(bundle / "helper.pub", layout.helper_public_key.read_bytes())

    cert_path = None
    if client_cert:
        ca = _load_fleet_ca(layout)
        cert = issue_certificate(ca, device_id, client=True)
        cert_path = bundle / "client.pem"
        _write_public(cert_path, cert.cert_pem())
        _write_secret(bundle / "client.key", cert.key_pem())

    url = layout.broker_url()
    _write_public(
        bundle / "agent.toml",
        _agent_toml(
            fleet, device_id, url, client_cert=client_cert, data_path=data_path, helper=helper
        ),
    )
    return DeviceBundle(
        device_id=device_id,
        directory=bundle,
        key_id=key_id(signing.public_key()).hex(),
        public_key_file=registered,
        client_certificate=cert_path,
        password_writer=writer,
    )


def certificate_common_name(path: Path) -> str:
    """The Common Name of a PEM certificate (for messages and tests)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    attrs = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
