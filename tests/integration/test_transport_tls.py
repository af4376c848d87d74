"""MqttTransport over TLS (mqtts://) against Mosquitto with a throwaway CA."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest

from broker.launcher import MosquittoBroker
from edgefl.security.pki import issue_certificate, make_ca
from edgefl.transport import MqttConfig, MqttTransport, NotConnectedError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


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
    ca = make_ca("edgefl test CA", days=1)
    server = issue_certificate(ca, "localhost", server_names=["localhost", "127.0.0.1"], days=1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    (directory / "server.pem").write_bytes(server.cert_pem())
    (directory / "server.key").write_bytes(server.key_pem())


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
