"""MqttTransport over TLS (mqtts://) against Mosquitto with a throwaway CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest

from broker.launcher import MosquittoBroker
from edgefl.transport import MqttConfig, MqttTransport, NotConnectedError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TLS_CONF = """per_listener_settings false
listener ${port} ${bind}
allow_anonymous true
cafile ${certs}/ca.pem
certfile ${certs}/server.pem
keyfile ${certs}/server.key
persistence false
# state: ${data_dir}
log_dest stderr
"""


def _write_pki(directory: Path) -> None:
    """A CA and a server certificate for localhost/127.0.0.1, as PEM files in ``directory``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefl test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    needs.mosquitto()
    certs = tmp_path / "certs"
    _write_pki(certs)
    template = tmp_path / "tls.conf"
    template.write_text(TLS_CONF.replace("${certs}", str(certs)))
    broker = MosquittoBroker(state_dir=tmp_path / "state", config_template=template)
    broker.start()
    yield broker
    broker.stop()


async def test_tls_roundtrip_with_ca_file_and_hostname_check(tls_broker: MosquittoBroker) -> None:
    ca = tls_broker.state_dir.parent / "certs" / "ca.pem"
    url = f"mqtts://localhost:{tls_broker.port}"
    payload = os.urandom(300_000)  # several TLS records: exercises the decrypted-bytes path

    cfg = MqttConfig.from_url(url, ca_file=ca, start_timeout=10.0)
    async with MqttTransport(cfg) as sub, MqttTransport(cfg) as pub:
        await sub.subscribe("tls/#")
        for i in range(3):
            await pub.publish(f"tls/{i}", payload)
        got = []
        async with asyncio.timeout(10):
            async for message in sub.messages():
                got.append(message.payload)
                if len(got) == 3:
                    break
        assert got == [payload] * 3
        assert sub.statistics().protocol == "5"


async def test_tls_rejects_an_untrusted_broker_unless_insecure(tls_broker: MosquittoBroker) -> None:
    url = f"mqtts://localhost:{tls_broker.port}"

    strict = MqttConfig.from_url(url, start_timeout=1.0, reconnect_min_delay=0.1)
    with pytest.raises(NotConnectedError, match="CERTIFICATE_VERIFY_FAILED"):
        async with MqttTransport(strict):
            pass
    insecure = MqttConfig.from_url(url, tls_insecure=True, start_timeout=5.0)
    async with MqttTransport(insecure) as t:
        await t.publish("tls/x", b"1")
