"""Token signing, the keyring's rollover, its storage and refresh tokens."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from acme_registry import tokens
from acme_registry.storage import FileStorage, StorageConflict
from acme_registry.tokenrollover import KeyringTimes
from acme_registry.tokens import (
    CERT_LIFETIME,
    NEXT_KEY_LEAD,
    FileBlob,
    KeyReference,
    Keyring,
    RefreshTokens,
    SigningKey,
    StorageBlob,
    TokenError,
    access_claims,
    b64url_decode,
    jwk_thumbprint,
    key_reference_for,
    load_keyring,
    update_keyring,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def decode(token: str) -> tuple[dict, dict, bytes]:
    header, claims, signature = token.split(".")
    return (
        json.loads(b64url_decode(header)),
        json.loads(b64url_decode(claims)),
        (b64url_decode(signature)),
    )


def verify(token: str, cert: x509.Certificate) -> None:
    """What the registry does: the key from x5c, then an ES256 check of R || S."""
    header, _, _ = decode(token)
    x5c = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    assert x5c == cert
    public = x5c.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verify_with(token, public)


def verify_with(token: str, public: ec.EllipticCurvePublicKey) -> None:
    """An ES256 check of R || S with ``public``."""
    header, _, signature = decode(token)
    assert header["alg"] == "ES256"
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    public.verify(
        encode_dss_signature(r, s),
        token.rpartition(".")[0].encode(),
        ec.ECDSA(hashes.SHA256()),
    )


def test_signed_token_verifies_and_carries_the_claims() -> None:
    key = SigningKey.generate(NOW)
    claims = access_claims(
        issuer="iss",
        subject="ci",
        audience="registry.test",
        access=[{"type": "repository", "name": "a", "actions": ["pull"]}],
        now=NOW,
        ttl=dt.timedelta(minutes=5),
    )
    token = key.sign(claims)
    verify(token, key.cert)
    header, decoded, signature = decode(token)
    assert header["typ"] == "JWT"
    assert len(signature) == 64
    assert decoded == claims
    assert decoded["exp"] - decoded["iat"] == 300 and decoded["nbf"] == decoded["iat"]
    assert decoded["aud"] == "registry.test"  # a string: registry 2.8 reads no list
    assert len(decoded["jti"]) >= 16


def rfc7638_thumbprint(public: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 section 3 written out: the required members, sorted, no spaces, SHA-256."""
    numbers = public.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": base64.urlsafe_b64encode(numbers.x.to_bytes(32, "big")).rstrip(b"=").decode(),
        "y": base64.urlsafe_b64encode(numbers.y.to_bytes(32, "big")).rstrip(b"=").decode(),
    }
    digest = hashlib.sha256(json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def test_kid_token_names_the_key_by_its_thumbprint() -> None:
    key = SigningKey.generate(NOW)
    claims = access_claims(
        issuer="iss", subject="ci", audience="registry.test", access=[], now=NOW,
        ttl=dt.timedelta(minutes=5),
    )  # fmt: skip
    token = key.sign(claims, KeyReference.KID)
    header, decoded, _ = decode(token)
    assert header == {
        "typ": "JWT",
        "alg": "ES256",
        "kid": rfc7638_thumbprint(key.cert.public_key()),
    }
    assert decoded == claims
    verify_with(token, key.key.public_key())
    assert "x5c" in decode(key.sign(claims))[0] and "kid" not in decode(key.sign(claims))[0]


def _key_with_a_leading_zero_coordinate() -> ec.EllipticCurvePrivateKey:
    while True:  # 1 key in 128: a few hundred tries at most, in practice
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        if numbers.x < 2**248 or numbers.y < 2**248:
            return key


def test_a_key_without_a_sure_kid_signs_with_x5c() -> None:
    """distribution drops leading zero bytes of a coordinate (Go's big.Int.Bytes): the
    thumbprint it computes for such a key is not the RFC's, so we send none."""
    raw = _key_with_a_leading_zero_coordinate()
    assert jwk_thumbprint(raw.public_key()) is None
    cert = SigningKey.generate(NOW).cert  # only its DER goes into the header
    header, _, _ = decode(SigningKey(raw, cert).sign({}, KeyReference.KID))
    assert "kid" not in header and "x5c" in header


def test_generated_keys_always_have_a_kid() -> None:
    for _ in range(300):  # about 2 raw keys in 300 have a leading zero coordinate
        key = SigningKey.generate(NOW)
        assert key.kid == rfc7638_thumbprint(key.key.public_key())


@pytest.mark.parametrize(
    ("major", "expected"),
    [(3, KeyReference.KID), (4, KeyReference.KID), (2, KeyReference.X5C), (None, KeyReference.X5C)],
)
def test_key_reference_by_registry_major(major: int | None, expected: KeyReference) -> None:
    assert key_reference_for(major) is expected


def test_signing_certificate() -> None:
    key = SigningKey.generate(NOW)
    assert key.cert.not_valid_after_utc - NOW == CERT_LIFETIME
    assert key.cert.not_valid_before_utc < NOW
    assert key.key.curve.name == "secp256r1"


def test_rollover_keeps_every_token_verifiable() -> None:
    ring = Keyring.create(NOW)
    first = ring.current
    assert ring.advance(NOW + dt.timedelta(days=300)) is ring  # nothing due yet

    lead = first.not_after - NEXT_KEY_LEAD
    ring = ring.advance(lead)
    assert ring.current is first and ring.next is not None
    second = ring.next
    bundle = ring.bundle_certs(lead)
    assert bundle == [first.cert, second.cert]

    # Not served yet: the old key keeps signing, however often advance() runs.
    later = lead + dt.timedelta(days=5)
    assert ring.advance(later).current is first

    served = ring.bundle_digest(later)
    ring = ring.mark_served(served).advance(later)
    assert ring.current is second and ring.next is None
    # The old certificate stays trusted until it expires: tokens it signed keep working.
    # The bundle is the same as before the switch: no registry generation to start.
    assert ring.bundle_certs(later) == [first.cert, second.cert]
    assert ring.bundle_digest(later) == served
    after_expiry = first.not_after + dt.timedelta(seconds=1)
    ring = ring.advance(after_expiry)
    assert ring.retired == ()
    assert ring.bundle_certs(after_expiry) == [second.cert]


def test_expired_keyring_switches_at_once() -> None:
    ring = Keyring.create(NOW)
    much_later = NOW + CERT_LIFETIME + dt.timedelta(days=10)
    ring2 = ring.advance(much_later)
    assert ring2.current is not ring.current
    assert ring2.current.not_after > much_later


def test_keyring_round_trip_and_file(tmp_path: Path) -> None:
    blob = FileBlob(tmp_path / "token" / "keyring.json")
    assert blob.load() is None
    ring = load_keyring(blob, NOW)
    path = tmp_path / "token" / "keyring.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_keyring(blob, NOW)
    assert again.current.cert == ring.current.cert
    assert again.refresh_secret == ring.refresh_secret
    # A rollover is stored by the next load.
    lead = ring.current.not_after - NEXT_KEY_LEAD
    rolled = load_keyring(blob, lead)
    assert rolled.next is not None
    assert Keyring.from_bytes(path.read_bytes()).next is not None


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"version": 2}', b'{"version": 1}', b'{"version": 1, "current": 3}']
)
def test_unreadable_keyring(data: bytes) -> None:
    with pytest.raises(TokenError):
        Keyring.from_bytes(data)


def test_keyring_error_never_quotes_key_material() -> None:
    ring = Keyring.create(NOW)
    obj = json.loads(ring.to_bytes())
    obj["current"]["key"] = obj["current"]["key"][:-40] + "garbage-----END PRIVATE KEY-----\n"
    with pytest.raises(TokenError) as info:
        Keyring.from_bytes(json.dumps(obj).encode())
    assert "PRIVATE" not in str(info.value) and "garbage" not in str(info.value)


def test_mismatched_certificate_is_refused() -> None:
    ring = Keyring.create(NOW)
    obj = json.loads(ring.to_bytes())
    other = Keyring.create(NOW)
    obj["current"]["cert"] = json.loads(other.to_bytes())["current"]["cert"]
    with pytest.raises(TokenError, match="does not match"):
        Keyring.from_bytes(json.dumps(obj).encode())


# -- refresh tokens ----------------------------------------------------------------------

HASH = "$2b$10$" + "a" * 53


def test_refresh_token_round_trip() -> None:
    refresh = RefreshTokens(b"k" * 32)
    token = refresh.issue("ci", HASH, "registry.test", NOW)
    assert refresh.verify(token, "registry.test", NOW, {"ci": HASH}.get) == "ci"
    assert "ci" not in token.split(".")[1]  # the MAC part


def test_refresh_token_invalidated() -> None:
    refresh = RefreshTokens(b"k" * 32)
    token = refresh.issue("ci", HASH, "registry.test", NOW)
    new_hash = "$2b$10$" + "b" * 53
    with pytest.raises(TokenError, match="password changed"):
        refresh.verify(token, "registry.test", NOW, {"ci": new_hash}.get)
    with pytest.raises(TokenError, match="user removed"):
        refresh.verify(token, "registry.test", NOW, {}.get)
    with pytest.raises(TokenError, match="expired"):
        refresh.verify(token, "registry.test", NOW + tokens.REFRESH_LIFETIME, {"ci": HASH}.get)
    with pytest.raises(TokenError, match="another service"):
        refresh.verify(token, "other", NOW, {"ci": HASH}.get)
    with pytest.raises(TokenError, match="invalid"):
        RefreshTokens(b"x" * 32).verify(token, "registry.test", NOW, {"ci": HASH}.get)


@pytest.mark.parametrize("token", ["", ".", "abc", "a.b", "é.é", "x" * 2000 + ".y"])
def test_garbage_refresh_tokens(token: str) -> None:
    with pytest.raises(TokenError):
        RefreshTokens(b"k" * 32).verify(token, "s", NOW, {"ci": HASH}.get)


def test_forged_claims_fail_the_mac() -> None:
    refresh = RefreshTokens(b"k" * 32)
    token = refresh.issue("ci", HASH, "s", NOW)
    body, mac = token.split(".")
    claims = json.loads(b64url_decode(body))
    claims["sub"] = "admin"
    forged = tokens.b64url(json.dumps(claims).encode()) + "." + mac
    with pytest.raises(TokenError, match="invalid"):
        refresh.verify(forged, "s", NOW, {"admin": HASH}.get)


# -- the keyring in a shared store ------------------------------------------------------


def test_two_replicas_creating_at_once_end_with_one_keyring(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)  # conditional writes, as the shared store's
    first, second = (
        StorageBlob(storage, "token/keyring.json"),
        StorageBlob(storage, "token/keyring.json"),
    )
    assert first.load() is None and second.load() is None  # both see none
    first.store(Keyring.create(NOW).to_bytes())
    with pytest.raises(StorageConflict):
        second.store(Keyring.create(NOW).to_bytes())  # only if absent: refused
    # load_keyring re-reads after the conflict and takes the winner's.
    fresh = StorageBlob(storage, "token/keyring.json")
    fresh.load()
    winner = Keyring.from_bytes(storage.load_bytes("token/keyring.json") or b"")
    assert load_keyring(second, NOW).current.cert == winner.current.cert
    assert load_keyring(fresh, NOW).refresh_secret == winner.refresh_secret


def test_update_is_redone_on_what_another_replica_wrote(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    blob = StorageBlob(storage, "token/keyring.json")
    ring = load_keyring(blob, NOW)
    other = StorageBlob(storage, "token/keyring.json")
    lead = ring.current.not_after - NEXT_KEY_LEAD
    seen: list[Keyring | None] = []

    def advance(stored: Keyring | None) -> Keyring:
        seen.append(stored)
        if len(seen) == 1:
            # Another replica publishes its next key between our read and our write.
            update_keyring(other, lambda r: (r or ring).advance(lead))
        assert stored is not None
        return stored.advance(lead)

    result = update_keyring(blob, advance)
    # The first attempt's write was refused; the second read the other's next key and
    # had nothing left to do: one next key, the other replica's.
    assert len(seen) == 2 and seen[1] is not None and seen[1].next is not None
    assert result.next is not None and result.next.cert == seen[1].next.cert
    stored = Keyring.from_bytes(storage.load_bytes("token/keyring.json") or b"")
    assert stored.next is not None and stored.next.cert == result.next.cert


def test_shared_switch_waits_for_the_grace(tmp_path: Path) -> None:
    times = KeyringTimes(grace=dt.timedelta(days=7))
    ring = Keyring.create(NOW, times.lifetime)
    lead = ring.current.not_after - times.lead
    ring = ring.advance(lead, times=times, served="")
    assert ring.next is not None and ring.next_since == lead
    assert Keyring.from_bytes(ring.to_bytes()).next_since == lead
    here = ring.bundle_digest(lead)
    # This replica's registry trusts the next key, others may not have followed yet.
    assert ring.advance(lead + dt.timedelta(days=6), times=times, served=here) is ring
    # A replica whose registry does not trust it never switches.
    after = lead + dt.timedelta(days=7)
    assert ring.advance(after, times=times, served="").current == ring.current
    switched = ring.advance(after, times=times, served=here)
    assert switched.current == ring.next and switched.next is None
    assert switched.bundle_digest(after) == here
