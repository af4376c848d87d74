"""A minimal X.509 PKI for a fleet: one CA, a broker (server) certificate, client certificates.

Meant for tests, labs and small deployments; a deployment with its own PKI (an enterprise CA,
step-ca, Vault, cert-manager) simply puts its CA bundle, broker certificate and key where the
broker config expects them (``docs/SECURITY.md``, "Bring your own PKI").

Keys are ECDSA P-256 (small, fast on a Raspberry Pi, accepted by every TLS stack). Client
certificates carry the device id as Common Name, which is what Mosquitto's
``use_identity_as_username`` turns into the MQTT username the ACL patterns match (``%u``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertifiedKey",
    "issue_certificate",
    "load_ca",
    "make_ca",
]

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest lifetime browsers' baseline requirements allow; fine for MQTT


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _builder(
    common_name: str,
    issuer: x509.Name | None,
    key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    days: int,
) -> x509.CertificateBuilder:
    """A certificate for ``key`` named ``common_name`` (self-issued when ``issuer`` is None),
    valid from 5 minutes ago (clock skew) for ``days``: a CA signs certificates only, a leaf
    signs (ECDSA) and agrees keys (ECDH)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
    )


def make_ca(common_name: str, *, days: int = CA_DAYS) -> CertifiedKey:
    """A self-signed CA certificate (path length 0: it signs leaves only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, None, key, ca=True, days=days)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(cert, key)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue_certificate(
    ca: CertifiedKey,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
    days: int = LEAF_DAYS,
) -> CertifiedKey:
    """A leaf certificate signed by ``ca``.

    ``server_names`` (host names or IP addresses) make it a TLS server certificate with those
    subject alternative names; ``client=True`` makes it a TLS client certificate (it may be
    both). The Common Name is ``common_name`` (the device id for clients).
    """
    if not server_names and not client:
        raise ValueError("a certificate needs server names or client=True")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = []
    if server_names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        _builder(common_name, ca.certificate.subject, key, ca=False, days=days)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(_san(server_names), critical=False)
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def load_ca(cert_pem: bytes, key_pem: bytes) -> CertifiedKey:
    """A CA from its PEM certificate and (unencrypted) PEM private key."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the fleet CA key must be an EC key")
    return CertifiedKey(cert, key)
