"""S3Storage against a real SeaweedFS: conditional writes, lists, the lock, the probe, outages."""

from __future__ import annotations

import json
import threading
import time

import pytest

from acme_registry import statekeys
from acme_registry.s3storage import READ_TIMEOUT, S3Storage, probe_conditional_writes
from acme_registry.stateconfig import S3Location
from acme_registry.storage import (
    LockLost,
    LockTimeout,
    StorageConflict,
    StoreUnavailable,
    StoreUnsafe,
)
from tests.support.careless_s3 import CarelessS3
from tests.support.ports import free_port
from tests.support.seaweed import SeaweedS3

# Short enough for a test, long enough for one-second HTTP dates to judge it.
SHORT_LEASE = 3.0


@pytest.fixture
def storage(seaweed: SeaweedS3, s3_bucket: str) -> S3Storage:
    store = S3Storage(seaweed.location(s3_bucket))
    probe_conditional_writes(store)
    return store


def _raw_keys(seaweed: SeaweedS3, bucket: str) -> list[str]:
    listing = seaweed.client().list_objects_v2(Bucket=bucket)
    return sorted(entry["Key"] for entry in listing.get("Contents", []))


def test_conditional_create_and_overwrite(storage):
    key = "state/backoff.json"
    assert storage.load(key) is None
    first = storage.store(key, b"one", if_absent=True)
    with pytest.raises(StorageConflict):
        storage.store(key, b"two", if_absent=True)
    loaded = storage.load(key)
    assert loaded is not None and (loaded.data, loaded.version) == (b"one", first)
    second = storage.store(key, b"two", if_version=first)
    assert second != first
    with pytest.raises(StorageConflict):
        storage.store(key, b"three", if_version=first)  # a stale version loses
    assert storage.load_bytes(key) == b"two"
    third = storage.store(key, b"three")  # unconditional
    assert storage.load(key).version == third  # type: ignore[union-attr]


def test_only_one_of_many_concurrent_creates_wins(storage):
    results: list[str] = []

    def create(n: int) -> None:
        try:
            storage.store("issued/race.json", f"writer {n}".encode(), if_absent=True)
            results.append(f"won {n}")
        except StorageConflict:
            results.append("lost")

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and len(results) == 8
    assert storage.load_bytes("issued/race.json") == f"writer {winners[0][4:]}".encode()


def test_conditional_delete(storage):
    version = storage.store("orders/pending.json", b"{}")
    newer = storage.store("orders/pending.json", b'{"a": 1}', if_version=version)
    with pytest.raises(StorageConflict):
        storage.delete("orders/pending.json", if_version=version)
    assert storage.load_bytes("orders/pending.json") == b'{"a": 1}'
    storage.delete("orders/pending.json", if_version=newer)
    assert storage.load("orders/pending.json") is None
    with pytest.raises(StorageConflict):
        storage.delete("orders/pending.json", if_version=newer)  # absent: not at that version
    storage.delete("orders/pending.json")  # absent is fine without a condition


def test_tombstone_deletes_where_the_server_has_no_conditional_delete(storage, seaweed, s3_bucket):
    storage.conditional_delete = False
    version = storage.store("challenges/tok", b"auth")
    other = storage.store("challenges/tok", b"auth2", if_version=version)
    with pytest.raises(StorageConflict):
        storage.delete("challenges/tok", if_version=version)
    storage.delete("challenges/tok", if_version=other)
    assert storage.load("challenges/tok") is None
    assert "acme-registry/challenges/tok" not in _raw_keys(seaweed, s3_bucket)
    # A tombstone left behind (a crash between overwrite and delete) reads as absent,
    # is not listed, and an if_absent store replaces it.
    leftover = storage.store("challenges/tok", b"x")
    storage._put("challenges/tok", b"acme-registry tombstone " + b"0" * 32, IfMatch=leftover)
    assert storage.load("challenges/tok") is None
    assert storage.list("challenges") == []
    storage.store("challenges/tok", b"fresh", if_absent=True)
    assert storage.load_bytes("challenges/tok") == b"fresh"


def test_polling_with_a_conditional_get(storage):
    key = statekeys.CERTIFICATE
    assert storage.load_if_changed(key, None) == (False, None)  # still absent
    version = storage.store(key, b"v1")
    changed, found = storage.load_if_changed(key, None)
    assert changed and found is not None and (found.data, found.version) == (b"v1", version)
    assert storage.load_if_changed(key, version) == (False, None)  # a 304, no body
    newer = storage.store(key, b"v2", if_version=version)
    changed, found = storage.load_if_changed(key, version)
    assert changed and found is not None and (found.data, found.version) == (b"v2", newer)
    storage.delete(key)
    assert storage.load_if_changed(key, newer) == (True, None)


def test_list_is_one_level_under_the_prefix(storage, seaweed, s3_bucket):
    for key in ("issued/a.json", "issued/b.json", "issued/deeper/c.json", "issuedx/d.json"):
        storage.store(key, b"{}")
    assert storage.list("issued") == ["issued/a.json", "issued/b.json"]
    assert storage.list("nothing") == []
    # Everything lives under the prefix, nothing at the bucket's root.
    assert all(key.startswith("acme-registry/") for key in _raw_keys(seaweed, s3_bucket))


def test_list_pages_through_many_keys(storage):
    storage.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2",
        lambda params, **kwargs: params.setdefault("MaxKeys", 7),
    )
    names = [f"challenges/t{n:02d}" for n in range(20)]
    for name in names:
        storage.store(name, b"x")
    assert storage.list("challenges") == names


def test_invalid_keys_are_refused(storage):
    for key in ("", "a//b", "../x", "a/./b"):
        with pytest.raises(ValueError):
            storage.store(key, b"x")


# -- the lock ----------------------------------------------------------------------------


def _record(storage: S3Storage, name: str) -> dict[str, object]:
    data = storage.load_bytes(statekeys.lock(name))
    assert data is not None
    return json.loads(data)


def test_lock_record_changes_with_every_write(storage):
    lock = storage.lock("issuance", holder="replica-1", lease=SHORT_LEASE, keep_alive=False)
    first = storage.load(statekeys.lock("issuance"))
    lock.renew()
    second = storage.load(statekeys.lock("issuance"))
    assert first is not None and second is not None and first.version != second.version
    record = json.loads(second.data)
    assert record["holder"] == "replica-1" and record["state"] == "held" and record["seq"] == 2
    assert record["nonce"] != json.loads(first.data)["nonce"]
    lock.release()
    assert _record(storage, "issuance")["state"] == "released"


def test_second_holder_waits_then_gets_a_released_lock(storage):
    first = storage.lock("issuance", holder="replica-1", lease=30)
    with pytest.raises(LockTimeout) as waited:
        storage.lock("issuance", holder="replica-2", lease=30, timeout=1.5)
    assert "replica-1" in str(waited.value)
    got: list[str] = []

    def wait_for_it() -> None:
        with storage.lock("issuance", holder="replica-2", lease=30, timeout=30) as second:
            got.append(second.holder)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(1.0)
    assert got == []  # still waiting while replica-1 holds it
    first.release()
    waiter.join(timeout=30)
    assert got == ["replica-2"]
    assert _record(storage, "issuance")["state"] == "released"


def test_keep_alive_holds_the_lock_beyond_its_lease(storage):
    lock = storage.lock("issuance", holder="replica-1", lease=SHORT_LEASE)
    try:
        with pytest.raises(LockTimeout):
            storage.lock("issuance", holder="replica-2", lease=SHORT_LEASE, timeout=3 * SHORT_LEASE)
        assert not lock.lost.is_set()
        assert _record(storage, "issuance")["holder"] == "replica-1"
    finally:
        lock.release()


def test_stale_lock_is_taken_over_and_the_old_holder_learns_it(storage):
    silent = storage.lock("issuance", holder="replica-1", lease=SHORT_LEASE, keep_alive=False)
    started = time.monotonic()
    taker = storage.lock("issuance", holder="replica-2", lease=SHORT_LEASE, timeout=30)
    waited = time.monotonic() - started
    # Judged by the server's clock with one-second dates: more than the lease has passed.
    assert waited >= SHORT_LEASE - 1.0
    record = _record(storage, "issuance")
    assert record["holder"] == "replica-2" and record["seq"] == 2
    with pytest.raises(LockLost):
        silent.renew()
    assert silent.lost.is_set()
    # Its release must not remove or free the new holder's lock.
    silent.release()
    assert _record(storage, "issuance")["holder"] == "replica-2"
    assert _record(storage, "issuance")["state"] == "held"
    assert not taker.lost.is_set()
    taker.release()
    assert _record(storage, "issuance")["state"] == "released"


def test_two_takers_of_a_stale_lock_one_wins(storage):
    storage.lock("issuance", holder="dead", lease=SHORT_LEASE, keep_alive=False)
    winners: list[str] = []
    blocked: list[str] = []

    def take(name: str) -> None:
        try:
            lock = storage.lock("issuance", holder=name, lease=30, timeout=SHORT_LEASE + 4)
            winners.append(name)
            time.sleep(SHORT_LEASE + 6)  # hold it past the others' timeout
            lock.release()
        except LockTimeout:
            blocked.append(name)

    threads = [threading.Thread(target=take, args=(f"taker-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(winners) == 1 and len(blocked) == 2


# -- the probe ---------------------------------------------------------------------------


def test_probe_passes_on_seaweedfs_and_leaves_nothing(seaweed, s3_bucket):
    store = S3Storage(seaweed.location(s3_bucket))
    probe_conditional_writes(store)
    assert store.conditional_delete is True  # SeaweedFS 4.48 refuses a wrong-ETag DELETE
    assert _raw_keys(seaweed, s3_bucket) == []


def test_probe_refuses_a_server_that_ignores_conditions():
    with CarelessS3() as careless:
        location = S3Location(
            endpoint=careless.endpoint,
            bucket="state",
            prefix="acme-registry/",
            region="us-east-1",
            access_key="any",
            secret_key="any",
        )
        with pytest.raises(StoreUnsafe) as refused:
            probe_conditional_writes(S3Storage(location))
        assert careless.conditions_seen >= 1  # the header was sent, and ignored
    message = str(refused.value)
    assert "ignores If-None-Match" in message and careless.endpoint in message
    assert "STATE_STORE=s3" in message


# -- the store down ----------------------------------------------------------------------


def test_store_down_is_store_unavailable_quickly(seaweed_factory):
    server = seaweed_factory()
    bucket = server.new_bucket("outage")
    store = S3Storage(server.location(bucket))
    store.store("state/ari.json", b"{}")
    server.stop()
    timings = {}
    for name, call in (
        ("load", lambda: store.load("state/ari.json")),
        ("store", lambda: store.store("state/ari.json", b"{}", if_absent=True)),
        ("list", lambda: store.list("state")),
        ("lock", lambda: store.lock("issuance", timeout=1)),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as down:
            call()
        timings[name] = time.monotonic() - started
        assert "state store" in str(down.value) and server.endpoint in str(down.value)
    print(f"\nstore down (connection refused) -> StoreUnavailable in: {timings}")
    assert max(timings.values()) < 15, timings  # generous: never a hang
    server.start()  # back on the same endpoint, with the data
    assert store.load_bytes("state/ari.json") == b"{}"


def test_hung_store_is_store_unavailable_within_the_timeouts(seaweed_factory):
    server = seaweed_factory()
    bucket = server.new_bucket("hung")
    store = S3Storage(server.location(bucket))
    store.store("state/ari.json", b"{}")
    server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.load("state/ari.json")
        took = time.monotonic() - started
    finally:
        server.resume()
    print(f"\nstore hung (SIGSTOP) -> StoreUnavailable in {took:.1f} s")
    # Two attempts of READ_TIMEOUT each, plus a retry's backoff: bounded, never a hang.
    assert took < 2 * READ_TIMEOUT + 10
    assert store.load_bytes("state/ari.json") == b"{}"


def test_unreachable_endpoint_is_store_unavailable():
    location = S3Location(
        endpoint=f"http://127.0.0.1:{free_port()}",
        bucket="state",
        prefix="acme-registry/",
        region="us-east-1",
        access_key="a",
        secret_key="b",
    )
    with pytest.raises(StoreUnavailable):
        S3Storage(location).load("state/ari.json")


def test_wrong_credentials_are_store_unavailable_naming_the_reason(seaweed, s3_bucket):
    location = seaweed.location(s3_bucket)
    wrong = S3Location(
        endpoint=location.endpoint,
        bucket=location.bucket,
        prefix=location.prefix,
        region=location.region,
        access_key=location.access_key,
        secret_key="not-the-secret",
    )
    with pytest.raises(StoreUnavailable) as refused:
        S3Storage(wrong).load("state/ari.json")
    assert "403" in str(refused.value)
