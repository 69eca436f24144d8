"""Registry tokens: ES256 JWTs naming their key by ``x5c`` or ``kid``, the signing keyring,
refresh tokens.

**Access tokens** follow distribution's "Token Authentication Specification": a compact JWS
signed with ES256 whose header names the signing key in one of two ways
(:class:`KeyReference`):

- ``x5c`` (the signing certificate, DER in base64): the registry (2.8 and 3.x) parses it
  and verifies it against ``auth.token.rootcertbundle`` on every request;
- ``kid`` (the key's JWK thumbprint as distribution 3.x computes it, :func:`jwk_thumbprint`):
  3.x puts every key of the root bundle into a map by that thumbprint when it starts, so a
  request costs one map lookup instead of a certificate parse and chain verification, and
  the token is 490 bytes instead of 1,144. Measured (``bench.auth_rate --key-references``)
  the saving is small: 0-120 us of the registry's CPU per request, of the 330-540 us that
  token authentication adds to the 670-870 us 3.1.1 spends on a manifest GET without it
  (the whole token check timed alone: about 170 us, 130 of them the ES256 signature;
  README, "Measured against the alternatives"). 2.8 keys that map by another ID
  (libtrust's), so it gets ``x5c`` (:func:`key_reference_for`, from ``registry --version``).

Either way the registry then checks the signature with that key, then ``iss``, ``aud`` (its
``service``), ``exp`` and ``nbf`` (each with 60 s of leeway). With ``kid`` it does not look
at the certificates' dates: a key is trusted while it is in the bundle a generation started
with, which is why the bundle drops retired certificates when they expire (a new bundle
starts a new generation). Signing uses ``cryptography`` directly: a JWS is three base64url
parts and one ECDSA signature, less code than a JWT library's options, and no new
dependency.

**The keyring** (:class:`Keyring`) holds the signing key (EC P-256) and its self-signed
certificate, valid :data:`CERT_LIFETIME` (one year). Rollover, without a refused token:

1. :data:`NEXT_KEY_LEAD` (30 days) before the current certificate expires,
   :meth:`Keyring.advance` creates the next key and certificate. The root bundle
   (:meth:`Keyring.bundle_pem`) now holds both; the current key still signs.
2. The registry reads its root bundle only when it starts, so the agent starts a registry
   generation with the new bundle (a rotation, as for a new TLS certificate) and then calls
   :meth:`Keyring.mark_served` with :meth:`Keyring.bundle_digest`.
3. The next :meth:`Keyring.advance` after that switches: the next key signs, and the old
   certificate stays in the bundle until it expires (30 days on), far longer than any token
   it signed lives.

A keyring whose current certificate has expired (the agent was off for a month) switches
to a fresh key at once: tokens signed by an expired certificate are refused anyway. The
bundle lists its certificates oldest first, so the switch itself leaves it as it is.

**Several replicas** (``STATE_STORE=s3``) share one keyring in the store, and each runs its
own registry generations, which read the bundle only when they start. Step 2 then cannot
be known for all of them by any one replica: the next key carries the instant it was
published (``next_since``); every replica follows the stored keyring each poll interval
and starts a generation when the bundle changed; the mark of step 2 is each replica's own,
in memory (``served`` of :meth:`Keyring.advance`, never written to the store), and step 3
also waits until the next key has been in the store for :attr:`KeyringTimes.grace` (7
days, far longer than a poll interval: :mod:`tokenrollover`). By then every replica that
can reach the store trusts it; the old certificate stays trusted for the 23 days left.

The keyring is stored as one JSON object (keys in PEM, so the object is secret: 0600)
through :class:`SecretBlob`, a two-method interface (``load() -> bytes | None``,
``store(bytes)``): :class:`FileBlob` keeps it in a file; :class:`StorageBlob` under a
storage key (the shared store seals it), where every write is conditional on the version
read: :func:`update_keyring` re-reads and redoes a change on a conflict, so replicas that
create or advance the keyring at once end with one keyring.

**Refresh tokens** (``access_type=offline``; docker keeps one as its identity token) are
``base64url(claims).base64url(HMAC-SHA256)`` under a secret kept in the keyring, with the
user's name, the service, an expiry (:data:`REFRESH_LIFETIME`, 90 days from the login)
and a digest of the user's password hash at the time. :meth:`RefreshTokens.verify` takes
the user's *current* hash: a changed password or a removed user invalidates the token.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .storage import Storage, StorageConflict
from .tokenrollover import CERT_LIFETIME, KeyringTimes, next_key_due, switch_due
from .tokenrollover import NEXT_KEY_LEAD as NEXT_KEY_LEAD

# Clocks of the registry and the agent are the same host's, but a restored backup or a
# replica may be off: the certificate starts an hour early.
BACKDATE = dt.timedelta(hours=1)
REFRESH_LIFETIME = dt.timedelta(days=90)
KEYRING_VERSION = 1
SIGNER_NAME = "acme-registry token signer"


class TokenError(ValueError):
    """A token or the keyring is unusable; ``str()`` never holds a key or a token."""


# -- encoding ----------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not text or any(c not in _B64URL for c in text):
        raise TokenError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# -- signing -----------------------------------------------------------------------------


class KeyReference(StrEnum):
    """How a token's header names its signing key for the registry."""

    X5C = "x5c"  # the certificate itself: 2.8 and 3.x, a chain verification per request
    KID = "kid"  # the key's thumbprint: 3.x, a map lookup per request


def key_reference_for(registry_major: int | None) -> KeyReference:
    """``kid`` for registry 3.x; ``x5c`` for 2.x and for a release not recognised (every
    release understands ``x5c``)."""
    if registry_major is not None and registry_major >= 3:
        return KeyReference.KID
    return KeyReference.X5C


def jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str | None:
    """The key's RFC 7638 thumbprint (SHA-256) as distribution 3.x computes it, or None
    when that differs from the RFC's.

    distribution encodes the coordinates with Go's ``big.Int.Bytes()``, which drops leading
    zero bytes; RFC 7638 keeps all 32. The two agree unless a coordinate starts with a zero
    byte (1 key in 128): for such a key there is no ``kid`` we could be sure of, and it
    signs with ``x5c`` (:meth:`SigningKey.generate` makes no such keys).
    """
    numbers = public_key.public_numbers()
    coordinates = [n.to_bytes(32, "big") for n in (numbers.x, numbers.y)]
    if any(c[0] == 0 for c in coordinates):
        return None
    x, y = (b64url(c) for c in coordinates)
    jwk = f'{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}'
    return b64url(hashlib.sha256(jwk.encode("ascii")).digest())


@dataclass(frozen=True)
class SigningKey:
    """One EC P-256 key and its self-signed certificate (equal when the certificates are:
    a certificate names its key, and key objects compare by identity)."""

    key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)
    cert: x509.Certificate

    @classmethod
    def generate(cls, now: dt.datetime, lifetime: dt.timedelta = CERT_LIFETIME) -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        while jwk_thumbprint(key.public_key()) is None:  # so that it can sign with a kid
            key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SIGNER_NAME)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def kid(self) -> str | None:
        return jwk_thumbprint(self.key.public_key())

    def sign(self, claims: dict[str, Any], reference: KeyReference = KeyReference.X5C) -> str:
        """The compact JWS of ``claims``: header.claims.signature, ES256, the key named as
        ``reference`` says (``x5c`` for a key that has no sure ``kid``)."""
        kid = self.kid if reference is KeyReference.KID else None
        header: dict[str, Any] = {"typ": "JWT", "alg": "ES256"}
        if kid is not None:
            header["kid"] = kid
        else:
            header["x5c"] = [base64.b64encode(self.cert_der).decode()]
        signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}"
        der = self.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        # JWS wants R || S, 32 bytes each, not the DER that cryptography produces.
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _to_json(self) -> dict[str, str]:
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {"key": key_pem.decode(), "cert": self.cert_pem.decode()}

    @classmethod
    def _from_json(cls, obj: Any) -> SigningKey:
        key = serialization.load_pem_private_key(str(obj["key"]).encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise TokenError("the signing key is not EC P-256")
        cert = x509.load_pem_x509_certificate(str(obj["cert"]).encode())
        if cert.public_key() != key.public_key():
            raise TokenError("the signing certificate does not match its key")
        return cls(key, cert)


def access_claims(
    *,
    issuer: str,
    subject: str,
    audience: str,
    access: Sequence[dict[str, Any]],
    now: dt.datetime,
    ttl: dt.timedelta,
) -> dict[str, Any]:
    """The claim set of an access token. ``aud`` is one string: 2.8 reads no list."""
    issued = int(now.timestamp())
    return {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": issued + int(ttl.total_seconds()),
        "nbf": issued,
        "iat": issued,
        "jti": secrets.token_urlsafe(16),
        "access": list(access),
    }


# -- the keyring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Keyring:
    """The signing key, the next one during a rollover, and retired certificates."""

    current: SigningKey
    next: SigningKey | None = None
    retired: tuple[x509.Certificate, ...] = ()
    served_bundle: str = ""  # bundle_digest() a registry generation has started with
    refresh_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    next_since: dt.datetime | None = None  # when ``next`` was made (and published)

    @classmethod
    def create(cls, now: dt.datetime, lifetime: dt.timedelta = CERT_LIFETIME) -> Keyring:
        return cls(current=SigningKey.generate(now, lifetime))

    def bundle_certs(self, now: dt.datetime) -> list[x509.Certificate]:
        """Oldest first: the switch to the next key leaves the bundle as it is, so it
        starts no registry generation."""
        certs = [self.current.cert]
        if self.next is not None:
            certs.append(self.next.cert)
        certs += [c for c in self.retired if c.not_valid_after_utc > now]
        return sorted(certs, key=lambda c: (c.not_valid_before_utc, c.serial_number))

    def bundle_pem(self, now: dt.datetime) -> bytes:
        """What ``auth.token.rootcertbundle`` must hold now."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.bundle_certs(now))

    def bundle_digest(self, now: dt.datetime) -> str:
        return hashlib.sha256(self.bundle_pem(now)).hexdigest()

    def mark_served(self, digest: str) -> Keyring:
        """Record that a registry generation runs with the bundle of ``digest``."""
        return replace(self, served_bundle=digest)

    def published_at(self) -> dt.datetime | None:
        """When the next key was made; for a keyring written before that was recorded,
        from its certificate (backdated by :data:`BACKDATE`)."""
        if self.next is None:
            return None
        return self.next_since or self.next.cert.not_valid_before_utc + BACKDATE

    def advance(
        self,
        now: dt.datetime,
        generate: Callable[[dt.datetime], SigningKey] | None = None,
        *,
        times: KeyringTimes | None = None,
        served: str | None = None,
    ) -> Keyring:
        """The keyring as it should be at ``now`` (itself when nothing is due).

        ``times``: the lifetimes (one instance: :meth:`KeyringTimes.single`, no grace).
        ``served``: the bundle digest this agent's registry runs with; None: the one
        recorded in the keyring (:meth:`mark_served`, one instance). When the result's
        bundle differs from the one served, the caller writes it and starts a registry
        generation with it.
        """
        times = times or KeyringTimes().single()
        if generate is None:
            lifetime = times.lifetime

            def generate(at: dt.datetime) -> SigningKey:
                return SigningKey.generate(at, lifetime)

        served_digest = self.served_bundle if served is None else served
        ring = self
        if ring.current.not_after <= now:
            # Expired: nothing it signs is accepted, so waiting for a bundle buys nothing.
            fresh = ring.next if ring.next is not None and ring.next.not_after > now else None
            ring = replace(ring, current=fresh or generate(now), next=None, next_since=None)
        elif ring.next is None and next_key_due(now, ring.current.not_after, times):
            ring = replace(ring, next=generate(now), next_since=now)
        elif ring.next is not None and switch_due(
            now,
            next_since=ring.published_at() or now,
            served_here=served_digest == ring.bundle_digest(now),
            grace=times.grace,
        ):
            # Every registry trusts the next certificate: switch, keep the old one trusted.
            ring = replace(
                ring,
                current=ring.next,
                next=None,
                next_since=None,
                retired=(*ring.retired, ring.current.cert),
            )
        kept = tuple(c for c in ring.retired if c.not_valid_after_utc > now)
        return ring if kept == ring.retired else replace(ring, retired=kept)

    def to_bytes(self) -> bytes:
        obj = {
            "version": KEYRING_VERSION,
            "current": self.current._to_json(),
            "next": self.next._to_json() if self.next else None,
            "retired": [c.public_bytes(serialization.Encoding.PEM).decode() for c in self.retired],
            "served_bundle": self.served_bundle,
            "refresh_secret": b64url(self.refresh_secret),
            "next_since": self.next_since.isoformat() if self.next_since else None,
        }
        return json.dumps(obj, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Keyring:
        try:
            obj = json.loads(data)
            if obj.get("version") != KEYRING_VERSION:
                raise TokenError(f"keyring version {obj.get('version')!r} is not supported")
            return cls(
                current=SigningKey._from_json(obj["current"]),
                next=SigningKey._from_json(obj["next"]) if obj.get("next") else None,
                retired=tuple(
                    x509.load_pem_x509_certificate(str(pem).encode()) for pem in obj["retired"]
                ),
                served_bundle=str(obj.get("served_bundle", "")),
                refresh_secret=b64url_decode(str(obj["refresh_secret"])),
                next_since=_instant(obj.get("next_since")),
            )
        except TokenError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The message of a PEM or JSON error could quote key material: name the kind only.
            raise TokenError(f"the keyring is unreadable ({type(exc).__name__})") from None


def _instant(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    instant = dt.datetime.fromisoformat(str(value))
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=dt.UTC)


class SecretBlob(Protocol):
    """Where the keyring lives: bytes in, bytes out, private (0600 or equivalent).

    ``store`` may be conditional on what ``load`` read last (:class:`StorageBlob`) and then
    raises :class:`~.storage.StorageConflict` when someone else wrote in between.
    """

    def load(self) -> bytes | None: ...

    def store(self, data: bytes) -> None: ...


class FileBlob:
    """A :class:`SecretBlob` in one file: written 0600 by rename, folder made 0700."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def store(self, data: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keyring-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class StorageBlob:
    """A :class:`SecretBlob` under one key of a :class:`~.storage.Storage` (the shared
    store; its encrypting wrapper seals :data:`statekeys.TOKEN_KEYRING`).

    ``store`` is conditional on the version ``load`` (or the last ``store``) saw: only if
    absent, or only if still at that version; :class:`~.storage.StorageConflict` otherwise.
    Two replicas creating or advancing the keyring at once thus end with one keyring.
    """

    def __init__(
        self, storage: Storage, key: str, stored: Callable[[], None] | None = None
    ) -> None:
        self.storage = storage
        self.key = key
        # Called after each successful store: the other replicas' cue to read it again.
        self.stored = stored
        self.version: str | None = None  # None: absent when last looked at
        self._seen = False

    def load(self) -> bytes | None:
        found = self.storage.load(self.key)
        self.version = found.version if found is not None else None
        self._seen = True
        return found.data if found is not None else None

    def load_if_changed(self) -> tuple[bool, bytes | None]:
        """For polling: ``(False, None)`` while the stored keyring is still the one last
        read or written (a conditional GET), else ``(True, its bytes or None)``."""
        if not self._seen:
            return True, self.load()
        changed, found = self.storage.load_if_changed(self.key, self.version)
        if changed:
            self.version = found.version if found is not None else None
        return changed, (found.data if found is not None else None)

    def store(self, data: bytes) -> None:
        if self.version is None:
            self.version = self.storage.store(self.key, data, if_absent=True)
        else:
            self.version = self.storage.store(self.key, data, if_version=self.version)
        self._seen = True
        if self.stored is not None:
            self.stored()


UPDATE_ATTEMPTS = 10


def update_keyring(blob: SecretBlob, change: Callable[[Keyring | None], Keyring]) -> Keyring:
    """Read the keyring, apply ``change`` (given None when there is none yet), write the
    result unless ``change`` returned what it was given; on a conflict (another replica
    wrote in between) read again and apply ``change`` to that. The keyring now stored."""
    for _ in range(UPDATE_ATTEMPTS):
        data = blob.load()
        ring = None if data is None else Keyring.from_bytes(data)
        changed = change(ring)
        if changed is ring:
            return changed
        try:
            blob.store(changed.to_bytes())
        except StorageConflict:
            continue
        return changed
    raise TokenError(f"the keyring changed {UPDATE_ATTEMPTS} times while being updated")


def load_keyring(
    blob: SecretBlob,
    now: dt.datetime,
    times: KeyringTimes | None = None,
    served: str | None = None,
    seed: Keyring | None = None,
) -> Keyring:
    """The stored keyring advanced to ``now``; on first use ``seed`` or a new one, stored.
    With a conditional ``blob``, replicas starting at once all end with the one that was
    stored first."""
    times = times or KeyringTimes().single()

    def change(ring: Keyring | None) -> Keyring:
        base = ring or seed or Keyring.create(now, times.lifetime)
        return base.advance(now, times=times, served=served)

    return update_keyring(blob, change)


# -- refresh tokens ----------------------------------------------------------------------


def password_digest(password_hash: str) -> str:
    """A digest of the stored hash: in the token instead of the hash itself."""
    return hashlib.sha256(b"acme-registry refresh\0" + password_hash.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class RefreshTokens:
    """Issue and check refresh tokens under ``secret`` (the keyring's)."""

    secret: bytes = field(repr=False)
    lifetime: dt.timedelta = REFRESH_LIFETIME

    def issue(self, user: str, password_hash: str, service: str, now: dt.datetime) -> str:
        claims = {
            "sub": user,
            "aud": service,
            "pwd": password_digest(password_hash),
            "exp": int((now + self.lifetime).timestamp()),
            "jti": secrets.token_urlsafe(12),
        }
        body = b64url(_json(claims))
        return f"{body}.{self._mac(body)}"

    def verify(
        self,
        token: str,
        service: str,
        now: dt.datetime,
        current_hash: Callable[[str], str | None],
    ) -> str:
        """The user ``token`` stands for; TokenError when forged, expired, for another
        service, or when the user is gone or its password changed since."""
        body, dot, mac = token.partition(".")
        if (
            not dot
            or len(token) > 1024
            or not token.isascii()
            or not hmac.compare_digest(mac, self._mac(body))
        ):
            raise TokenError("invalid refresh token")
        try:
            claims = json.loads(b64url_decode(body))
            user, audience, digest, expiry = (
                str(claims["sub"]),
                str(claims["aud"]),
                str(claims["pwd"]),
                int(claims["exp"]),
            )
        except (ValueError, KeyError, TypeError):
            raise TokenError("invalid refresh token") from None
        if audience != service:
            raise TokenError("refresh token for another service")
        if now.timestamp() >= expiry:
            raise TokenError("refresh token expired")
        stored = current_hash(user)
        if stored is None or not hmac.compare_digest(password_digest(stored), digest):
            raise TokenError("refresh token no longer valid (user removed or password changed)")
        return user

    def _mac(self, body: str) -> str:
        return b64url(hmac.new(self.secret, body.encode("ascii"), hashlib.sha256).digest())
