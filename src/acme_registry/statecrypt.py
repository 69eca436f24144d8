"""Secrets encrypted by the agent before they reach a shared store (AES-256-GCM).

:class:`EncryptedStorage` wraps any :class:`~.storage.Storage`: the values of the keys
:func:`statekeys.is_secret` names are sealed, every other value passes through as it is
(the certificate chain alone, issuance records, locks: an operator may read those). Whoever
can read the bucket then learns no private key, no password hash, no signing key.

A sealed value is ``MAGIC | version | key id | nonce | ciphertext+tag``:

- a random 96-bit nonce per write (at 2**32 writes under one key the collision chance is
  still negligible; the state is written a few times a day);
- the associated data is the header and the storage key's name, so a value moved to another
  key (say the certificate's key copied over the account key) fails to open;
- the key id (4 bytes of a hash of the key, not the key) tells "encrypted under another
  STATE_ENCRYPTION_KEY_FILE" apart from "altered".

A secret key whose stored value is not sealed is refused on read: a planted plaintext
account key must not be taken for ours. A non-secret key is refused on write when the value
looks like a PEM private key or a bcrypt hash, so a key missing from ``is_secret`` is a
loud error, not a leak.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import statekeys
from .storage import DEFAULT_LEASE, Lock, Storage, Versioned

MAGIC = b"\x89ARS"  # "acme-registry secret", with a non-text first byte as PNG does
VERSION = 1
KEY_ID_SIZE = 4
NONCE_SIZE = 12
HEADER_SIZE = len(MAGIC) + 1 + KEY_ID_SIZE
_PLAINTEXT_SECRET = re.compile(rb"PRIVATE KEY-----|\$2[abxy]?\$\d\d\$")


class StateDecryptionError(Exception):
    """A sealed value cannot be opened (another key, or altered). Names the key, not data."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"acme-registry state key id\0" + key).digest()[:KEY_ID_SIZE]


def seal(key: bytes, name: str, data: bytes) -> bytes:
    """``data`` encrypted for the storage key ``name``."""
    header = MAGIC + bytes([VERSION]) + key_id(key)
    nonce = os.urandom(NONCE_SIZE)
    return header + nonce + AESGCM(key).encrypt(nonce, data, header + name.encode())


def open_sealed(key: bytes, name: str, blob: bytes, where: str | None = None) -> bytes:
    """The plaintext of a :func:`seal` result; :class:`StateDecryptionError` otherwise."""
    place = where or name
    if not blob.startswith(MAGIC):
        raise StateDecryptionError(f"{place} is not encrypted, but it holds a secret: refused")
    if len(blob) < HEADER_SIZE + NONCE_SIZE + 16 or blob[len(MAGIC)] != VERSION:
        raise StateDecryptionError(f"{place}: unknown or truncated encrypted format")
    header, rest = blob[:HEADER_SIZE], blob[HEADER_SIZE:]
    if header[len(MAGIC) + 1 :] != key_id(key):
        raise StateDecryptionError(
            f"{place} was encrypted under another key (STATE_ENCRYPTION_KEY_FILE differs "
            "between replicas?)"
        )
    nonce, sealed = rest[:NONCE_SIZE], rest[NONCE_SIZE:]
    try:
        return AESGCM(key).decrypt(nonce, sealed, header + name.encode())
    except InvalidTag:
        raise StateDecryptionError(
            f"{place} fails its integrity check: altered, or moved from another key"
        ) from None


class EncryptedStorage(Storage):
    """``inner`` with the secret keys' values sealed under ``key`` (32 bytes, AES-256)."""

    def __init__(self, inner: Storage, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the state encryption key must be 32 bytes")
        self.inner = inner
        self._key = key

    def __repr__(self) -> str:
        return f"EncryptedStorage({self.inner!r})"

    def load(self, key: str) -> Versioned | None:
        found = self.inner.load(key)
        if found is None or not statekeys.is_secret(key):
            return found
        data = open_sealed(self._key, key, found.data, self.inner.where(key))
        return Versioned(data, found.version)

    def load_if_changed(self, key: str, version: str | None) -> tuple[bool, Versioned | None]:
        changed, found = self.inner.load_if_changed(key, version)
        if found is None or not statekeys.is_secret(key):
            return changed, found
        data = open_sealed(self._key, key, found.data, self.inner.where(key))
        return changed, Versioned(data, found.version)

    def store(
        self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> str:
        if statekeys.is_secret(key):
            data = seal(self._key, key, data)
        elif _PLAINTEXT_SECRET.search(data):
            raise ValueError(
                f"refusing to store what looks like a private key or password hash under "
                f"{key!r} in the clear: list it in statekeys.is_secret"
            )
        return self.inner.store(key, data, if_absent=if_absent, if_version=if_version)

    def delete(self, key: str, *, if_version: str | None = None) -> None:
        self.inner.delete(key, if_version=if_version)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def lock(
        self,
        name: str,
        holder: str | None = None,
        lease: float = DEFAULT_LEASE,
        timeout: float | None = None,
        **options: Any,
    ) -> Lock:
        # A lock record is no secret: it passes through (the backend writes it itself).
        return self.inner.lock(name, holder, lease, timeout, **options)

    def where(self, key: str) -> str:
        return self.inner.where(key)
