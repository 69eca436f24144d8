"""The shared certificate record: its format, its conditional commit, the replica's mirror."""

import datetime as dt
from pathlib import Path

import pytest

from acme_registry import sharedcert, statekeys
from acme_registry.certstore import CertificatePair, CertStore, parse_pair
from acme_registry.storage import FileStorage, StorageConflict, Versioned
from tests.support.tls import TestCA

NAMES = ("registry.test",)
DIRECTORY = "https://ca.test/directory"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def make_pair(ca: TestCA, names: tuple[str, ...] = NAMES) -> CertificatePair:
    leaf, key = ca.issue_pair(names, ips=())
    return parse_pair(leaf + ca.pem, key)


def test_record_round_trip(ca: TestCA) -> None:
    pair = make_pair(ca)
    record = sharedcert.decode(Versioned(sharedcert.encode(pair, DIRECTORY, NOW), "v1"))
    assert record.pair.fingerprint == pair.fingerprint
    assert record.pair.key_pem == pair.key_pem
    assert record.directory == DIRECTORY
    assert record.committed_at == NOW
    assert record.version == "v1"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"format": 2}', "unknown format"),
        (b'{"format": 1, "chain": "x"}', "lacks its chain"),
    ],
)
def test_malformed_records_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        sharedcert.decode(Versioned(data, "v"))
    assert "\n" not in str(caught.value)


def test_a_record_whose_fingerprint_is_not_its_pair_is_refused(ca: TestCA) -> None:
    pair = make_pair(ca)
    data = sharedcert.encode(pair, DIRECTORY, NOW)
    forged = data.replace(pair.fingerprint.encode(), b"0" * 64)
    with pytest.raises(ValueError, match="another fingerprint"):
        sharedcert.decode(Versioned(forged, "v"))


def test_commit_is_conditional_on_the_version_read(tmp_path: Path, ca: TestCA) -> None:
    storage = FileStorage(tmp_path)
    first, second, late = make_pair(ca), make_pair(ca), make_pair(ca)
    v1 = sharedcert.commit(storage, first, DIRECTORY, None, NOW)
    with pytest.raises(StorageConflict):  # "only if absent", and it is not
        sharedcert.commit(storage, late, DIRECTORY, None, NOW)
    sharedcert.commit(storage, second, DIRECTORY, v1, NOW)
    # An orderer that read v1 and lost its lock meanwhile cannot overwrite the newer one.
    with pytest.raises(StorageConflict):
        sharedcert.commit(storage, late, DIRECTORY, v1, NOW)
    loaded = sharedcert.load(storage)
    assert loaded is not None and loaded.pair.fingerprint == second.fingerprint


def test_the_mirror_writes_a_new_record_into_cert_dir_once(tmp_path: Path, ca: TestCA) -> None:
    storage = FileStorage(tmp_path / "shared")
    store = CertStore(tmp_path / "certs")
    mirror = sharedcert.CertificateMirror(storage, store, NAMES)
    assert mirror.sync() is False and mirror.seen and mirror.version is None
    pair = make_pair(ca)
    version = sharedcert.commit(storage, pair, DIRECTORY, None, NOW)
    assert mirror.sync() is True
    assert mirror.version == version
    served = store.load()
    assert served is not None and served.fingerprint == pair.fingerprint
    assert mirror.sync() is False  # unchanged record: nothing written


def test_the_mirror_ignores_a_record_for_other_names(tmp_path: Path, ca: TestCA) -> None:
    storage = FileStorage(tmp_path / "shared")
    store = CertStore(tmp_path / "certs")
    mirror = sharedcert.CertificateMirror(storage, store, NAMES)
    sharedcert.commit(storage, make_pair(ca, ("other.test",)), DIRECTORY, None, NOW)
    assert mirror.sync() is False
    assert store.load() is None


def test_the_mirror_keeps_cert_dir_when_the_record_is_broken(tmp_path: Path, ca: TestCA) -> None:
    storage = FileStorage(tmp_path / "shared")
    store = CertStore(tmp_path / "certs")
    pair = make_pair(ca)
    store.save(pair)
    storage.store(statekeys.CERTIFICATE, b"garbage")
    assert sharedcert.CertificateMirror(storage, store, NAMES).sync() is False
    kept = store.load()
    assert kept is not None and kept.fingerprint == pair.fingerprint
