"""`edgefl provision`: password hashes, ACL, PKI, fleet directory and device bundles."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import needs
import pytest
import samples
from cryptography import x509
from typer.testing import CliRunner

from edgefl.cli import main
from edgefl.clierror import ExitCode
from edgefl.errors import ProtocolError
from edgefl.protocol.messages import encode_message
from edgefl.provision_cli import provision_app
from edgefl.secagg import HelperKeys, load_helper_public_key
from edgefl.security import (
    load_manifest_verifier,
    load_public_keys,
    load_signer,
    load_update_authenticator,
)
from edgefl.security.passwords import (
    hash_password,
    read_password_file,
    remove_user,
    set_password,
    verify_password,
)
from edgefl.security.provision import (
    FleetDirectory,
    ProvisionError,
    acl_text,
    add_device,
    certificate_common_name,
    init_fleet,
    render_broker_config,
)

# --- passwords -----------------------------------------------------------------------------------


def test_hash_matches_the_mosquitto_format_by_hand() -> None:
    salt = bytes(range(12))
    hashed = hash_password("secret", salt=salt, iterations=101)
    _, seven, iterations, b64salt, b64hash = hashed.split("$")
    assert (seven, iterations) == ("7", "101")
    assert base64.b64decode(b64salt) == salt
    expected = hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, 64)
    assert base64.b64decode(b64hash) == expected
    assert verify_password(hashed, "secret")
    assert not verify_password(hashed, "Secret")
    for malformed in ("", "$6$x$y", "$7$abc$AAAA$AAAA", "$7$101$!!$AAAA", "$7$0$AAAA$AAAA"):
        assert not verify_password(malformed, "secret")


def test_our_verifier_accepts_mosquitto_passwd_output(tmp_path: Path) -> None:
    tool = needs.tool("mosquitto_passwd")
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run([tool, "-b", str(path), "alice", "pa:ss w0rd"], check=True)
    assert verify_password(read_password_file(path)["alice"], "pa:ss w0rd")


@pytest.mark.parametrize("use_tool", [True, False])
def test_set_password_adds_replaces_and_keeps_others(tmp_path: Path, use_tool: bool) -> None:
    path = tmp_path / "passwd"
    set_password(path, "a", "one", use_mosquitto_passwd=use_tool)
    writer = set_password(path, "b", "two", use_mosquitto_passwd=use_tool)
    assert writer == (
        "mosquitto_passwd" if use_tool and shutil.which("mosquitto_passwd") else "python"
    )
    set_password(path, "a", "three", use_mosquitto_passwd=use_tool)
    entries = read_password_file(path)
    assert set(entries) == {"a", "b"}
    assert verify_password(entries["a"], "three")
    assert verify_password(entries["b"], "two")
    assert path.stat().st_mode & 0o777 == 0o600
    assert remove_user(path, "a")
    assert not remove_user(path, "a")
    assert set(read_password_file(path)) == {"b"}


def test_usernames_that_break_the_file_are_refused(tmp_path: Path) -> None:
    for bad in ("", "a:b", "a\nb"):
        with pytest.raises(ValueError, match="username"):
            set_password(tmp_path / "passwd", bad, "x", use_mosquitto_passwd=False)


# --- ACL and broker config -----------------------------------------------------------------------


def test_acl_grants_devices_only_their_own_topics() -> None:
    text = acl_text("greenhouse")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    patterns = [line for line in lines if line.startswith("pattern")]
    assert patterns == [
        "pattern write edgefl/v1/greenhouse/device/%u/update/+",
        "pattern readwrite edgefl/v1/greenhouse/device/%u/state",
        "pattern write edgefl/v1/greenhouse/device/%u/checkin",
        "pattern read edgefl/v1/greenhouse/device/%u/lease",
        "pattern read edgefl/v1/greenhouse/device/%u/receipt",
        "pattern read edgefl/v1/greenhouse/model/#",
        "pattern read edgefl/v1/greenhouse/server/state",
        "pattern write edgefl/v1/greenhouse/secagg/share/%u/+",
        "pattern write edgefl/v1/greenhouse/secagg/seed/%u/+",
    ]
    aggregator = lines[lines.index("user aggregator") + 1 : lines.index("user helper")]
    assert "topic readwrite edgefl/v1/greenhouse/model/#" in aggregator
    assert "topic readwrite edgefl/v1/greenhouse/device/+/receipt" in aggregator
    assert "topic read edgefl/v1/greenhouse/device/+/checkin" in aggregator
    assert "topic readwrite edgefl/v1/greenhouse/device/+/lease" in aggregator
    assert all("write" not in line for line in lines[lines.index("user monitor") :])


def test_acl_refuses_a_fleet_name_that_would_widen_it() -> None:
    for fleet in ("+", "#", "a/b", "", "%u"):
        with pytest.raises(ProtocolError):
            acl_text(fleet)


def test_rendered_broker_config_has_no_placeholders_left(tmp_path: Path) -> None:
    text = render_broker_config(pki_dir=tmp_path, port=8883, data_dir="/var/lib/mosquitto")
    assert "${" not in text
    assert f"password_file {tmp_path}/passwd" in text
    assert "allow_anonymous false" in text
    assert "listener 8883 0.0.0.0" in text
    kept = render_broker_config(pki_dir=tmp_path, port="${port}", bind="${bind}")
    assert "listener ${port} ${bind}" in kept


# --- fleet directory -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> FleetDirectory:
    root = tmp_path_factory.mktemp("prov") / "fleet"
    layout = init_fleet(root, "greenhouse", ["broker.example.net", "10.0.0.5"])
    add_device(root, "pi-07", client_cert=True)
    add_device(root, "pi-08", use_mosquitto_passwd=False)
    return layout


def test_init_writes_a_ca_and_a_broker_certificate_for_every_host(
    fleet_dir: FleetDirectory,
) -> None:
    ca = x509.load_pem_x509_certificate((fleet_dir.ca_dir / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((fleet_dir.broker_dir / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_secrets_are_private(fleet_dir: FleetDirectory) -> None:
    secrets = [
        fleet_dir.ca_dir / "ca.key",
        fleet_dir.broker_dir / "server.key",
        fleet_dir.password_file,
        fleet_dir.aggregator_signing_key,
        fleet_dir.aggregator_dir / "mqtt-password",
        fleet_dir.device_dir("pi-07") / "signing.key",
        fleet_dir.device_dir("pi-07") / "mqtt-password",
        fleet_dir.device_dir("pi-07") / "client.key",
        fleet_dir.helper_private_key,
        fleet_dir.helper_dir / "mqtt-password",
        fleet_dir.helper_dir / "client.key",
    ]
    for path in secrets:
        assert path.stat().st_mode & 0o077 == 0, path
    assert fleet_dir.device_dir("pi-07").stat().st_mode & 0o777 == 0o700


def test_every_account_has_a_working_password(fleet_dir: FleetDirectory) -> None:
    entries = read_password_file(fleet_dir.password_file)
    assert set(entries) == {"aggregator", "monitor", "helper", "pi-07", "pi-08"}
    for user, directory in [
        ("aggregator", fleet_dir.aggregator_dir),
        ("monitor", fleet_dir.monitor_dir),
        ("helper", fleet_dir.helper_dir),
        ("pi-07", fleet_dir.device_dir("pi-07")),
        ("pi-08", fleet_dir.device_dir("pi-08")),
    ]:
        password = (directory / "mqtt-password").read_text().strip()
        assert len(password) >= 32
        assert verify_password(entries[user], password), user


def test_device_keys_pair_up_with_the_aggregator(fleet_dir: FleetDirectory) -> None:
    bundle = fleet_dir.device_dir("pi-07")
    device = load_signer(bundle / "signing.key")
    (registered,) = load_public_keys(fleet_dir.device_keys_dir / "pi-07.pub")
    assert registered == device.public_key
    header = samples.update_header(fleet="greenhouse", device_id="pi-07")
    load_update_authenticator(fleet_dir.device_keys_dir).authenticate(
        header, encode_message(header, signer=device)
    )
    manifest = samples.fp32_manifest(fleet="greenhouse")
    aggregator = load_signer(fleet_dir.aggregator_signing_key)
    verifier = load_manifest_verifier(bundle / "aggregator.pub")
    verifier.verify(encode_message(manifest, signer=aggregator))
    with pytest.raises(ProtocolError):
        verifier.verify(encode_message(manifest, signer=device))


def test_client_certificates_name_their_owner(fleet_dir: FleetDirectory) -> None:
    bundle = fleet_dir.device_dir("pi-07")
    assert certificate_common_name(bundle / "client.pem") == "pi-07"
    assert certificate_common_name(fleet_dir.aggregator_dir / "client.pem") == "aggregator"
    assert not (fleet_dir.device_dir("pi-08") / "client.pem").exists()
    ca = x509.load_pem_x509_certificate((fleet_dir.ca_dir / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((bundle / "client.pem").read_bytes()).verify_directly_issued_by(
        ca
    )


def test_bundle_agent_toml_loads_with_the_device_agent(
    fleet_dir: FleetDirectory, tmp_path: Path
) -> None:
    import device_agent.config as config_mod

    assert "security" in config_mod._SECTIONS  # the bundle's [security] section must load
    data = tmp_path / "train.npz"
    data.write_bytes(b"placeholder")
    bundle = fleet_dir.device_dir("pi-07")
    config = config_mod.load_config(
        bundle / "agent.toml", {}, {"data.path": str(data), "state_dir": str(tmp_path)}
    )
    assert (config.fleet, config.device_id) == ("greenhouse", "pi-07")
    assert config.broker.url == "mqtts://broker.example.net:8883"
    assert config.broker.username == "pi-07"
    assert config.broker.ca_file == bundle / "ca.pem"
    assert config.broker.cert_file == bundle / "client.pem"
    assert config.security.signing_key_file == bundle / "signing.key"
    assert config.security.aggregator_public_key_file == bundle / "aggregator.pub"
    load_signer(config.security.signing_key_file)
    load_manifest_verifier(config.security.aggregator_public_key_file)
    # secure aggregation: the bundle's helper key is the helper's, and the leader's copy too
    assert config.security.helper_public_key_file == bundle / "helper.pub"
    helper = HelperKeys.from_pem(fleet_dir.helper_private_key.read_bytes())
    for copy in (bundle / "helper.pub", fleet_dir.aggregator_dir / "helper.pub"):
        assert load_helper_public_key(copy.read_bytes()) == helper.public_key


def test_reserved_duplicate_and_invalid_devices_are_refused(fleet_dir: FleetDirectory) -> None:
    for name in ("aggregator", "monitor"):
        with pytest.raises(ProvisionError, match="reserved"):
            add_device(fleet_dir.root, name)
    with pytest.raises(ProvisionError, match="exists"):
        add_device(fleet_dir.root, "pi-07")
    with pytest.raises(ProtocolError):
        add_device(fleet_dir.root, "pi/07")
    with pytest.raises(ProvisionError, match="already holds a fleet"):
        init_fleet(fleet_dir.root, "greenhouse", ["x"])


def test_reprovisioning_a_device_replaces_its_key_and_password(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    init_fleet(root, "lab", ["localhost"], use_mosquitto_passwd=False)
    first = add_device(root, "d1", use_mosquitto_passwd=False)
    old_password = (first.directory / "mqtt-password").read_text().strip()
    second = add_device(root, "d1", force=True, use_mosquitto_passwd=False)
    assert second.key_id != first.key_id
    entries = read_password_file(FleetDirectory(root).password_file)
    assert not verify_password(entries["d1"], old_password)


def test_add_device_needs_an_initialised_directory(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="provision init"):
        add_device(tmp_path, "d1")


def test_cli_init_and_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = CliRunner()
    out = tmp_path / "fleet"
    result = runner.invoke(
        provision_app,
        [
            "init",
            "--out",
            str(out),
            "--fleet",
            "lab",
            "--broker-host",
            "mqtt.local",
            "--broker-dir",
            "/etc/mosquitto/edgefl",
        ],
    )
    assert result.exit_code == 0, result.output
    conf = (out / "broker" / "mosquitto.conf").read_text()
    assert "password_file /etc/mosquitto/edgefl/passwd" in conf
    result = runner.invoke(provision_app, ["device", "--out", str(out), "--device", "s-1"])
    assert result.exit_code == 0, result.output
    assert "signing key id" in result.output
    assert (out / "devices" / "s-1" / "agent.toml").is_file()
    with pytest.raises(SystemExit) as exited:
        main(["provision", "device", "--out", str(out), "--device", "monitor"])
    assert exited.value.code == ExitCode.USAGE
    assert "reserved" in capsys.readouterr().err
