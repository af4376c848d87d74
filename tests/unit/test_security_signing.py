"""Signed envelopes: framing (edgefl.protocol.envelope) and the Ed25519 seams (edgefl.security)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import samples

from edgefl.errors import EdgeflError, ProtocolError, RejectReason, UpdateRejected
from edgefl.protocol.chunking import Reassembler, depacketize, packetize
from edgefl.protocol.envelope import (
    FLAG_SIGNED,
    OVERHEAD,
    SIGNATURE_TRAILER_LEN,
    EnvelopeKind,
    decode_envelope,
    encode_envelope,
    encode_header,
    sign_envelope,
)
from edgefl.protocol.messages import (
    DeviceState,
    DeviceStatus,
    ModelManifest,
    UpdateHeader,
    decode_message,
    decode_update,
    encode_message,
)
from edgefl.security import (
    Ed25519ManifestVerifier,
    Ed25519Signer,
    KeyDirectoryAuthenticator,
    KeyFileError,
    generate_private_key,
    key_id,
    load_manifest_verifier,
    load_public_keys,
    load_signer,
    load_update_authenticator,
    write_private_key,
    write_public_key,
)
from edgefl.security.keys import public_key_pem


def update_header(device: str = "dev-a", seq: int = 3) -> UpdateHeader:
    return samples.update_header(device_id=device, seq=seq, base_version=7)


def manifest(version: int = 5) -> ModelManifest:
    return samples.fp32_manifest(version=version)


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer(generate_private_key())


# --- framing -----------------------------------------------------------------------------------


def test_signed_envelope_layout_is_the_unsigned_one_plus_a_72_byte_trailer() -> None:
    plain = encode_envelope(EnvelopeKind.UPDATE, {"a": 1}, b"payload")
    signed = sign_envelope(plain, key_id=b"K" * 8, sign=lambda data: b"S" * 64)
    assert len(signed) == len(plain) + SIGNATURE_TRAILER_LEN
    assert struct.unpack_from(">H", signed, 6) == (FLAG_SIGNED,)
    end = len(plain) - 4  # prefix + header + payload
    assert signed[8:end] == plain[8:end]  # lengths, header and payload unchanged
    assert signed[end : end + 8] == b"K" * 8
    assert signed[end + 8 : end + 72] == b"S" * 64
    assert struct.unpack(">I", signed[-4:]) == (zlib.crc32(signed[:-4]),)


def test_signature_covers_every_byte_before_it() -> None:
    plain = encode_envelope(EnvelopeKind.UPDATE, {"a": 1}, b"payload")
    seen: list[bytes] = []

    def sign(data: bytes) -> bytes:
        seen.append(data)
        return b"S" * 64

    signed = sign_envelope(plain, key_id=b"K" * 8, sign=sign)
    assert seen == [signed[: len(plain) - 4 + 8]]
    env = decode_envelope(signed, max_payload=100)
    assert env.signature is not None
    assert bytes(env.signature.signed) == seen[0]
    assert (env.signature.key_id, env.signature.signature) == (b"K" * 8, b"S" * 64)


def test_decoders_accept_signed_envelopes_and_ignore_the_signature(signer: Ed25519Signer) -> None:
    header = update_header()
    data = encode_message(header, b"\x01\x02", signer=signer)
    got, body = decode_update(data)
    assert got == header
    assert bytes(body) == b"\x01\x02"
    env = decode_envelope(data, max_payload=10)
    assert env.signed
    assert env.raw is not None
    assert bytes(env.raw) == data
    state = DeviceState(fleet="lab", device_id="d", status=DeviceStatus.IDLE, session=1, at=1.0)
    assert decode_message(encode_message(state, signer=signer), DeviceState) == state


def test_unsigned_envelopes_are_unchanged() -> None:
    header = update_header()
    data = encode_message(header, b"xy")
    assert data == encode_envelope(EnvelopeKind.UPDATE, header.to_header(), b"xy")
    assert len(data) == OVERHEAD + len(encode_header(header.to_header())) + 2
    env = decode_envelope(data, max_payload=10)
    assert not env.signed
    assert env.flags == 0
    assert env.signature is None


@pytest.mark.parametrize(
    ("cut", "reason"),
    # the whole trailer removed (flag kept): BAD_HEADER; one signature byte missing: TRUNCATED
    [(4 + SIGNATURE_TRAILER_LEN, RejectReason.BAD_HEADER), (5, RejectReason.TRUNCATED)],
)
def test_stripped_or_truncated_trailer_is_rejected(
    signer: Ed25519Signer, cut: int, reason: RejectReason
) -> None:
    data = bytearray(encode_message(update_header(), b"xy", signer=signer))[:-cut]
    data += struct.pack(">I", zlib.crc32(data))  # a valid CRC, so the framing check decides
    with pytest.raises(ProtocolError) as err:
        decode_envelope(bytes(data), max_payload=10)
    assert err.value.reason is reason


def test_unknown_flag_bits_are_still_rejected(signer: Ed25519Signer) -> None:
    data = bytearray(encode_message(update_header(), b"xy", signer=signer))
    struct.pack_into(">H", data, 6, FLAG_SIGNED | 0x0100)
    struct.pack_into(">I", data, len(data) - 4, zlib.crc32(data[:-4]))
    with pytest.raises(ProtocolError) as err:
        decode_envelope(bytes(data), max_payload=10)
    assert err.value.reason is RejectReason.BAD_HEADER


def test_signing_twice_or_with_bad_sizes_is_refused(signer: Ed25519Signer) -> None:
    data = encode_message(update_header(), signer=signer)
    with pytest.raises(ValueError, match="already signed"):
        signer.sign(data)
    plain = encode_message(update_header())
    with pytest.raises(ValueError, match="key id"):
        sign_envelope(plain, key_id=b"short", sign=lambda d: b"S" * 64)
    with pytest.raises(ValueError, match="64 bytes"):
        sign_envelope(plain, key_id=b"K" * 8, sign=lambda d: b"S" * 63)
    with pytest.raises(ProtocolError):
        signer.sign(plain[:-1])


def test_signed_update_survives_chunking(signer: Ed25519Signer) -> None:
    body = os.urandom(5000)
    data = encode_message(update_header(), body, signer=signer)
    packets = packetize(data, max_packet=1024)
    assert len(packets) > 1
    reasm = Reassembler()
    results = [
        depacketize(p, reassembler=reasm, source="dev-a", now=0.0, max_packet=1024)
        for p in reversed(packets)
    ]
    env = results[-1]
    assert env is not None
    assert env.raw is not None
    assert bytes(env.raw) == data
    auth_keys = {key_id(signer.public_key): signer.public_key}
    from edgefl.security import verify_envelope

    assert verify_envelope(env, auth_keys).payload == body


# --- signer and key files ------------------------------------------------------------------------


def test_key_id_is_sha256_prefix_of_raw_public_key(signer: Ed25519Signer) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    raw = signer.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signer.key_id == hashlib.sha256(raw).hexdigest()[:16]


def test_loaders_round_trip_key_files(tmp_path: Path) -> None:
    key = generate_private_key()
    write_private_key(tmp_path / "k.key", key)
    write_public_key(tmp_path / "k.pub", key.public_key())
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    signer = load_signer(tmp_path / "k.key")
    verifier = load_manifest_verifier(tmp_path / "k.pub")
    assert verifier.key_ids == (signer.key_id,)
    verifier.verify(encode_message(manifest(), signer=signer))


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"],
)
def test_bad_key_files_raise_key_file_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.pub").write_bytes(content)
    (tmp_path / "bad.key").write_bytes(content)
    with pytest.raises(KeyFileError):
        load_public_keys(tmp_path / "bad.pub")
    with pytest.raises(KeyFileError):
        load_signer(tmp_path / "bad.key")
    with pytest.raises(KeyFileError):
        load_signer(tmp_path / "missing.key")


def test_rsa_or_ec_keys_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pub").write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_public_keys(tmp_path / "ec.pub")


# --- manifest verifier ----------------------------------------------------------------------------


def test_manifest_verifier_accepts_only_the_trusted_key(signer: Ed25519Signer) -> None:
    verifier = Ed25519ManifestVerifier([signer.public_key])
    good = encode_message(manifest(), signer=signer)
    verifier.verify(good)
    forged = encode_message(manifest(), signer=Ed25519Signer(generate_private_key()))
    unsigned = encode_message(manifest())
    for data in (forged, unsigned):
        with pytest.raises(ProtocolError) as err:
            verifier.verify(data)
        assert err.value.reason is RejectReason.BAD_SIGNATURE


def test_manifest_verifier_rejects_tampering_even_with_a_fixed_crc(signer: Ed25519Signer) -> None:
    verifier = Ed25519ManifestVerifier([signer.public_key])
    good = encode_message(manifest(version=5), signer=signer)
    tampered = bytearray(good.replace(b'"version":5', b'"version":9'))
    struct.pack_into(">I", tampered, len(tampered) - 4, zlib.crc32(tampered[:-4]))
    assert decode_message(bytes(tampered), ModelManifest).version == 9  # decodes fine...
    with pytest.raises(ProtocolError) as err:
        verifier.verify(bytes(tampered))  # ...but the signature no longer verifies
    assert err.value.reason is RejectReason.BAD_SIGNATURE
    assert "does not verify" in err.value.detail


def test_manifest_verifier_maps_garbage_and_other_kinds_to_bad_signature(
    signer: Ed25519Signer,
) -> None:
    verifier = Ed25519ManifestVerifier([signer.public_key])
    state = DeviceState(fleet="lab", device_id="d", status=DeviceStatus.IDLE, session=1, at=1.0)
    for data in (b"", b"EDFL\x01", encode_message(state, signer=signer)):
        with pytest.raises(ProtocolError) as err:
            verifier.verify(data)
        assert err.value.reason is RejectReason.BAD_SIGNATURE


def test_manifest_verifier_trusts_two_keys_during_rotation(tmp_path: Path) -> None:
    old, new = generate_private_key(), generate_private_key()
    (tmp_path / "agg.pub").write_bytes(
        public_key_pem(old.public_key()) + public_key_pem(new.public_key())
    )
    verifier = load_manifest_verifier(tmp_path / "agg.pub")
    for key in (old, new):
        verifier.verify(encode_message(manifest(), signer=Ed25519Signer(key)))


# --- update authenticator ----------------------------------------------------------------------


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "device-keys"
    directory.mkdir()
    return directory


def register(keys_dir: Path, device: str) -> Ed25519Signer:
    key = generate_private_key()
    write_public_key(keys_dir / f"{device}.pub", key.public_key())
    return Ed25519Signer(key)


def rejection(auth: KeyDirectoryAuthenticator, header: UpdateHeader, data: bytes) -> RejectReason:
    with pytest.raises(UpdateRejected) as err:
        auth.authenticate(header, data)
    return err.value.reason


def test_authenticator_accepts_the_registered_device_key(keys_dir: Path) -> None:
    signer = register(keys_dir, "dev-a")
    auth = load_update_authenticator(keys_dir)
    header = update_header("dev-a")
    data = encode_message(header, b"body", signer=signer)
    auth.authenticate(header, data)
    auth.authenticate(header, decode_envelope(data, max_payload=100))  # decoded form too
    assert auth.device_keys("dev-a") == (signer.key_id,)


def test_authenticator_rejections(keys_dir: Path) -> None:
    signer_a = register(keys_dir, "dev-a")
    signer_b = register(keys_dir, "dev-b")
    auth = KeyDirectoryAuthenticator(keys_dir)
    header = update_header("dev-a")
    # a device nobody registered
    ghost = update_header("ghost")
    assert rejection(auth, ghost, encode_message(ghost, signer=signer_a)) is (
        RejectReason.UNKNOWN_DEVICE
    )
    # unsigned, signed by another device's key, or by an unknown key
    assert rejection(auth, header, encode_message(header)) is RejectReason.BAD_SIGNATURE
    assert rejection(auth, header, encode_message(header, signer=signer_b)) is (
        RejectReason.BAD_SIGNATURE
    )
    outsider = Ed25519Signer(generate_private_key())
    assert rejection(auth, header, encode_message(header, signer=outsider)) is (
        RejectReason.BAD_SIGNATURE
    )
    # a genuine envelope presented with another header (seq changed)
    genuine = encode_message(header, signer=signer_a)
    assert rejection(auth, update_header("dev-a", seq=4), genuine) is RejectReason.BAD_SIGNATURE
    # garbage, truncated, and a signed envelope of another kind
    state = DeviceState(fleet="lab", device_id="dev-a", status=DeviceStatus.IDLE, session=1, at=1.0)
    for data in (b"", genuine[:-3], encode_message(state, signer=signer_a)):
        assert rejection(auth, header, data) is RejectReason.BAD_SIGNATURE


def test_authenticator_rejects_every_single_byte_change(keys_dir: Path) -> None:
    signer = register(keys_dir, "dev-a")
    auth = KeyDirectoryAuthenticator(keys_dir)
    header = update_header("dev-a")
    good = encode_message(header, bytes(range(40)), signer=signer)
    for i in range(len(good) - 4):  # every byte before the CRC, CRC recomputed each time
        bad = bytearray(good)
        bad[i] ^= 0x01
        struct.pack_into(">I", bad, len(bad) - 4, zlib.crc32(bad[:-4]))
        with pytest.raises(UpdateRejected) as err:
            auth.authenticate(header, bytes(bad))
        assert err.value.reason is RejectReason.BAD_SIGNATURE, i


def test_authenticator_picks_up_new_and_revoked_keys(keys_dir: Path) -> None:
    now = [0.0]
    auth = KeyDirectoryAuthenticator(keys_dir, check_interval=1.0, clock=lambda: now[0])
    header = update_header("dev-a")
    signer = register(keys_dir, "dev-a")  # provisioned after the aggregator started
    data = encode_message(header, signer=signer)
    os.utime(keys_dir, ns=(1, 1))  # make the directory change visible regardless of fs timing
    now[0] = 0.5  # within check_interval: not re-read yet
    assert rejection(auth, header, data) is RejectReason.UNKNOWN_DEVICE
    now[0] = 2.0
    auth.authenticate(header, data)
    (keys_dir / "dev-a.pub").unlink()  # revoked
    os.utime(keys_dir, ns=(2, 2))
    now[0] = 4.0
    assert rejection(auth, header, data) is RejectReason.UNKNOWN_DEVICE
    assert auth.statistics().loads == 3


def test_authenticator_skips_bad_files_and_keeps_the_others(keys_dir: Path) -> None:
    signer = register(keys_dir, "dev-a")
    (keys_dir / "dev-b.pub").write_text("garbage")
    (keys_dir / "bad name!.pub").write_bytes(public_key_pem(signer.public_key))
    (keys_dir / "README").write_text("not a key")
    auth = KeyDirectoryAuthenticator(keys_dir)
    stats = auth.statistics()
    assert (stats.devices, stats.keys) == (1, 1)
    assert set(stats.bad_files) == {"dev-b.pub", "bad name!.pub"}
    header = update_header("dev-a")
    auth.authenticate(header, encode_message(header, signer=signer))


def test_authenticator_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_update_authenticator(tmp_path / "missing")


def test_all_rejections_are_edgefl_errors(keys_dir: Path) -> None:
    register(keys_dir, "dev-a")
    auth = KeyDirectoryAuthenticator(keys_dir)
    for data in (b"\x00" * 10, os.urandom(200)):
        with pytest.raises(EdgeflError):
            auth.authenticate(update_header("dev-a"), data)
