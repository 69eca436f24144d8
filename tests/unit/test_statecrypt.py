import os

import pytest

from acme_registry import statekeys
from acme_registry.statecrypt import (
    HEADER_SIZE,
    MAGIC,
    EncryptedStorage,
    StateDecryptionError,
    open_sealed,
    seal,
)
from acme_registry.storage import FileStorage, StorageConflict

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ACCOUNT_KEY = statekeys.account_key("0123456789abcdef")
PEM = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI...\n-----END EC PRIVATE KEY-----\n"


@pytest.fixture
def inner(tmp_path):
    return FileStorage(tmp_path / "state")


@pytest.fixture
def store(inner):
    return EncryptedStorage(inner, KEY)


def test_secret_keys_are_the_ones_the_issue_names():
    for key in (
        ACCOUNT_KEY,
        statekeys.CERTIFICATE,
        statekeys.PENDING_ORDER,
        statekeys.TOKEN_KEYRING,
        statekeys.HTTP_SECRET,
        statekeys.USERS,
        statekeys.INITIAL_ADMIN_PASSWORD,
    ):
        assert statekeys.is_secret(key), key
    for key in (
        statekeys.account_registration("0123456789abcdef"),
        statekeys.issued("ab" * 32),
        statekeys.challenge("tok"),
        statekeys.BACKOFF,
        statekeys.ARI,
        statekeys.ORDER_IN_FLIGHT,
        statekeys.lock(statekeys.ISSUANCE_LOCK),
        "accounts/key.pem",
        "accounts/a/b/key.pem",
    ):
        assert not statekeys.is_secret(key), key


def test_round_trip_seals_secret_values(store, inner):
    version = store.store(ACCOUNT_KEY, PEM, if_absent=True)
    raw = inner.load(ACCOUNT_KEY)
    assert raw is not None and raw.version == version
    assert raw.data.startswith(MAGIC) and b"PRIVATE" not in raw.data and PEM not in raw.data
    loaded = store.load(ACCOUNT_KEY)
    assert loaded is not None and loaded.data == PEM and loaded.version == version
    # Versions are the inner store's: conditions work through the wrapper.
    with pytest.raises(StorageConflict):
        store.store(ACCOUNT_KEY, PEM, if_absent=True)
    newer = store.store(ACCOUNT_KEY, PEM + b"\n", if_version=version)
    assert store.load_bytes(ACCOUNT_KEY) == PEM + b"\n" and newer != version


def test_every_write_has_a_fresh_nonce(store, inner):
    store.store(statekeys.HTTP_SECRET, b"s3cr3t")
    first = inner.load_bytes(statekeys.HTTP_SECRET)
    store.store(statekeys.HTTP_SECRET, b"s3cr3t")
    assert first != inner.load_bytes(statekeys.HTTP_SECRET)


def test_other_values_pass_through(store, inner):
    store.store_json(statekeys.BACKOFF, {"failures": 2})
    assert inner.load_json(statekeys.BACKOFF) == {"failures": 2}
    assert store.load_json(statekeys.BACKOFF) == {"failures": 2}
    assert store.list("state") == ["state/backoff.json"]
    store.delete(statekeys.BACKOFF)
    assert store.load(statekeys.BACKOFF) is None


@pytest.mark.parametrize("offset", [HEADER_SIZE, HEADER_SIZE + 12, -1])
def test_tampering_is_a_clear_error(store, inner, offset):
    store.store(statekeys.USERS, b'{"alice": "$2b$04$hash"}')
    raw = bytearray(inner.load_bytes(statekeys.USERS) or b"")
    raw[offset] ^= 0x01
    inner.store(statekeys.USERS, bytes(raw))
    with pytest.raises(StateDecryptionError) as caught:
        store.load(statekeys.USERS)
    assert "integrity" in str(caught.value) and "users.json" in str(caught.value)
    assert "$2b" not in str(caught.value)


def test_a_value_moved_to_another_key_does_not_open(store, inner):
    store.store(statekeys.CERTIFICATE, b'{"key": "PEM"}')
    inner.store(ACCOUNT_KEY, inner.load_bytes(statekeys.CERTIFICATE) or b"")
    with pytest.raises(StateDecryptionError, match="moved"):
        store.load(ACCOUNT_KEY)


def test_wrong_key_is_named_as_such(inner):
    EncryptedStorage(inner, KEY).store(ACCOUNT_KEY, PEM)
    with pytest.raises(StateDecryptionError, match="another key"):
        EncryptedStorage(inner, OTHER_KEY).load(ACCOUNT_KEY)


def test_plaintext_under_a_secret_key_is_refused(store, inner):
    inner.store(ACCOUNT_KEY, PEM)  # planted by someone with write access to the bucket
    with pytest.raises(StateDecryptionError, match="not encrypted"):
        store.load(ACCOUNT_KEY)


def test_truncated_or_unknown_format_is_refused():
    blob = seal(KEY, "k", b"data")
    with pytest.raises(StateDecryptionError, match="format"):
        open_sealed(KEY, "k", blob[: HEADER_SIZE + 5])
    future = blob[: len(MAGIC)] + bytes([99]) + blob[len(MAGIC) + 1 :]
    with pytest.raises(StateDecryptionError, match="format"):
        open_sealed(KEY, "k", future)


def test_secret_looking_plaintext_under_an_open_key_is_refused(store, inner):
    for data in (PEM, b'{"hash": "$2b$12$abcdefghijklmnopqrstuv"}'):
        with pytest.raises(ValueError, match="is_secret"):
            store.store(statekeys.issued("ab" * 32), data)
    assert inner.list("issued") == []


def test_key_must_be_32_bytes(inner):
    with pytest.raises(ValueError):
        EncryptedStorage(inner, os.urandom(16))


def test_polling_opens_what_changed(store):
    assert store.load_if_changed(statekeys.CERTIFICATE, None) == (False, None)
    version = store.store(statekeys.CERTIFICATE, b'{"key": "k"}')
    changed, found = store.load_if_changed(statekeys.CERTIFICATE, None)
    assert changed and found is not None and found.data == b'{"key": "k"}'
    assert store.load_if_changed(statekeys.CERTIFICATE, version) == (False, None)
