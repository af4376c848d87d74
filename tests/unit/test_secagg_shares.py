"""The two shares: reconstruction, uniformity of the leader's share, the sealed seed."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.secagg import (
    SEALED_SIZE,
    HelperKeys,
    RingSpec,
    SecAggError,
    SecAggReason,
    ShareContext,
    decode_sum,
    encode,
    expand_mask,
    load_helper_public_key,
    make_shares,
    open_seed,
)
from edgefl.secagg.ring import from_bytes
from edgefl.security.keys import generate_private_key, private_key_pem, public_key_pem

P = 256
SPEC = RingSpec(bits=32, scale=2**16, clip_norm=1.0)
CTX = ShareContext(fleet="lab", device_id="pi-1", seq=7, model="mlp-100k", num_params=P, bits=32)
#: chi2.ppf(0.9999, 255) (scipy): a fair byte histogram exceeds it with probability 1e-4
CHI2_255_CRITICAL = 347.654

KEYS = HelperKeys.generate()


def _update(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(P).astype(np.float32) * 0.05
    return encode(x, SPEC, np.random.default_rng(seed + 1))


def _chi_square(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_the_two_shares_add_up_to_the_update() -> None:
    encoded = _update()
    shares = make_shares(encoded, SPEC, KEYS.public_key, CTX)

    seed = open_seed(shares.sealed, KEYS, CTX)
    rebuilt = from_bytes(shares.masked, SPEC, P) + expand_mask(seed, SPEC, P)

    assert np.array_equal(rebuilt, encoded)
    assert len(shares.masked) == 4 * P
    assert len(shares.sealed) == SEALED_SIZE == 80


def test_shares_are_deterministic_for_a_given_seed_and_fresh_otherwise() -> None:
    encoded = _update()
    a = make_shares(encoded, SPEC, KEYS.public_key, CTX, seed=bytes(range(32)))
    b = make_shares(encoded, SPEC, KEYS.public_key, CTX, seed=bytes(range(32)))
    c = make_shares(encoded, SPEC, KEYS.public_key, CTX)
    assert a.masked == b.masked
    assert a.sealed != b.sealed  # a fresh ephemeral key every time
    assert a.masked != c.masked


def test_the_mask_is_the_chacha20_keystream() -> None:
    # RFC 8439 appendix A.1, test vector 1: all-zero key, nonce and counter
    mask = expand_mask(bytes(32), SPEC, 8)
    assert (
        mask.tobytes().hex() == "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    )
    assert mask[0] == 0xADE0B876  # little-endian words


def test_the_leaders_share_of_one_update_is_uniform_bytes() -> None:
    # the most structured update there is (all zero) gives the least uniform x - m if m is weak
    encoded = np.zeros(P, dtype=SPEC.dtype)
    rng = np.random.default_rng(2026)
    data = b"".join(
        make_shares(encoded, SPEC, KEYS.public_key, CTX, seed=rng.bytes(32)).masked
        for _ in range(256)
    )  # 256 KiB of masked shares of the same update
    assert _chi_square(data) < CHI2_255_CRITICAL
    # and per coordinate: the top byte of coordinate 0 across the 256 shares
    top = np.frombuffer(data, np.uint8)[3 :: 4 * P]
    assert len(set(top.tolist())) > 128


def test_the_chi_square_statistic_catches_a_structured_share() -> None:
    # the test's own power: a share that is the update itself fails it
    encoded = _update()
    data = encoded.tobytes() * 64
    assert _chi_square(data) > CHI2_255_CRITICAL


def test_an_eavesdropper_without_the_helper_key_cannot_open_the_seed() -> None:
    shares = make_shares(_update(), SPEC, KEYS.public_key, CTX)
    with pytest.raises(SecAggError) as info:
        open_seed(shares.sealed, HelperKeys.generate(), CTX)
    assert info.value.reason is SecAggReason.BAD_SEAL


def test_the_masked_share_alone_does_not_decode() -> None:
    shares = make_shares(_update(), SPEC, KEYS.public_key, CTX)
    with pytest.raises(SecAggError) as info:  # uniform words fail the range check
        decode_sum(from_bytes(shares.masked, SPEC, P), SPEC, [1])
    assert info.value.reason is SecAggReason.OVERFLOW


@pytest.mark.parametrize(
    "other",
    [
        ShareContext("lab", "pi-2", 7, "mlp-100k", P, 32),  # another device
        ShareContext("lab", "pi-1", 8, "mlp-100k", P, 32),  # another seq
        ShareContext("lab", "pi-1", 7, "mlp-1m", P, 32),  # another model
        ShareContext("lab2", "pi-1", 7, "mlp-100k", P, 32),  # another fleet
        ShareContext("lab", "pi-1", 7, "mlp-100k", P + 1, 32),  # another length
    ],
)
def test_a_sealed_seed_cannot_be_replayed_under_another_update(other: ShareContext) -> None:
    shares = make_shares(_update(), SPEC, KEYS.public_key, CTX)
    with pytest.raises(SecAggError) as info:
        open_seed(shares.sealed, KEYS, other)
    assert info.value.reason is SecAggReason.BAD_SEAL


@pytest.mark.parametrize("position", [0, 31, 32, 63, 79])
def test_a_tampered_sealed_seed_does_not_open(position: int) -> None:
    sealed = bytearray(make_shares(_update(), SPEC, KEYS.public_key, CTX).sealed)
    sealed[position] ^= 0x01
    with pytest.raises(SecAggError) as info:
        open_seed(bytes(sealed), KEYS, CTX)
    assert info.value.reason is SecAggReason.BAD_SEAL


def test_a_sealed_seed_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(SecAggError) as info:
        open_seed(bytes(79), KEYS, CTX)
    assert info.value.reason is SecAggReason.BAD_SEAL


def test_helper_keys_round_trip_through_pem() -> None:
    loaded = HelperKeys.from_pem(KEYS.private_pem())
    public = load_helper_public_key(KEYS.public_pem())
    shares = make_shares(_update(), SPEC, public, CTX)
    assert open_seed(shares.sealed, loaded, CTX) == open_seed(shares.sealed, KEYS, CTX)
    signing_key = generate_private_key()  # an Ed25519 key is not a helper key
    with pytest.raises(ValueError, match="not an X25519"):
        load_helper_public_key(public_key_pem(signing_key.public_key()))
    with pytest.raises(ValueError, match="not an X25519"):
        HelperKeys.from_pem(private_key_pem(signing_key))


def test_a_wrong_length_masked_share_is_refused() -> None:
    with pytest.raises(SecAggError) as info:
        from_bytes(bytes(4 * P - 1), SPEC, P)
    assert info.value.reason is SecAggReason.BAD_SHARE


def test_the_seal_follows_the_documented_construction() -> None:
    # an independent opening: X25519, HKDF-SHA256(info = tag || eph_pub || helper_pub), AEAD
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    seed = bytes(range(32))
    sealed = make_shares(_update(), SPEC, KEYS.public_key, CTX, seed=seed).sealed
    eph_pub, ciphertext = sealed[:32], sealed[32:]
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    helper_pub = KEYS.public_key.public_bytes(*raw)
    shared = KEYS.private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    info = b"edgefl-secagg/1 seal" + eph_pub + helper_pub
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    ad = (
        b'{"bits":32,"device_id":"pi-1","fleet":"lab","model":"mlp-100k","num_params":256,'
        b'"protocol":"edgefl-secagg/1","seq":7}'
    )
    assert ChaCha20Poly1305(key).decrypt(bytes(12), ciphertext, ad) == seed
