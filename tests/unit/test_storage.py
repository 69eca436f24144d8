"""The storage protocol on its file backend: versions, conditional writes, locks."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from acme_registry import statekeys
from acme_registry.storage import (
    FileStorage,
    LockLost,
    LockTimeout,
    StorageConflict,
    Versioned,
)

RACERS = 8


def test_load_returns_the_value_with_a_version(tmp_path):
    storage = FileStorage(tmp_path)
    assert storage.load("state/x.json") is None
    version = storage.store("state/x.json", b"one")
    found = storage.load("state/x.json")
    assert found == Versioned(b"one", version)
    again = storage.store("state/x.json", b"two")
    assert again != version
    assert storage.load("state/x.json") == Versioned(b"two", again)


def test_files_are_private_and_where_names_the_path(tmp_path):
    storage = FileStorage(tmp_path / "data")
    storage.store(statekeys.HTTP_SECRET, b"s")
    path = tmp_path / "data" / "registry" / "http-secret"
    assert storage.where(statekeys.HTTP_SECRET) == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_store_if_absent(tmp_path):
    storage = FileStorage(tmp_path)
    storage.store("k/a", b"first", if_absent=True)
    with pytest.raises(StorageConflict):
        storage.store("k/a", b"second", if_absent=True)
    assert storage.load_bytes("k/a") == b"first"


def test_store_if_version(tmp_path):
    storage = FileStorage(tmp_path)
    old = storage.store("k/a", b"1")
    new = storage.store("k/a", b"2", if_version=old)
    # A writer that read the old version loses: the value it saw is gone.
    with pytest.raises(StorageConflict):
        storage.store("k/a", b"3", if_version=old)
    assert storage.load("k/a") == Versioned(b"2", new)
    # Same size, same content: still a new version (a new file took the key).
    newer = storage.store("k/a", b"2", if_version=new)
    assert newer != new
    with pytest.raises(StorageConflict):
        storage.store("k/absent", b"x", if_version=new)
    assert storage.load("k/absent") is None


def test_delete_if_version(tmp_path):
    storage = FileStorage(tmp_path)
    version = storage.store("k/a", b"1")
    storage.store("k/a", b"2")
    with pytest.raises(StorageConflict):
        storage.delete("k/a", if_version=version)
    assert storage.load_bytes("k/a") == b"2"
    storage.delete("k/a", if_version=storage.load("k/a").version)
    assert storage.load("k/a") is None
    storage.delete("k/a")  # absent is fine
    storage.delete("never/there")
    with pytest.raises(StorageConflict):
        storage.delete("never/there", if_version=version)


def test_list_and_json_helpers(tmp_path):
    storage = FileStorage(tmp_path)
    storage.store_json("issued/b.json", {"directory": "x"})
    storage.store("issued/a.json", b"not json")
    assert storage.list("issued") == ["issued/a.json", "issued/b.json"]
    assert storage.list("nothing") == []
    assert storage.load_json("issued/b.json") == {"directory": "x"}
    assert storage.load_json("issued/a.json") is None
    version = storage.store_json("state/s.json", {"n": 1}, if_absent=True)
    storage.store_json("state/s.json", {"n": 2}, if_version=version)
    with pytest.raises(StorageConflict):
        storage.store_json("state/s.json", {"n": 3}, if_version=version)
    assert storage.load_json("state/s.json") == {"n": 2}


def test_keys_cannot_leave_the_root(tmp_path):
    storage = FileStorage(tmp_path)
    for key in ("", "../x", "a/../../x", "/abs", "a//b"):
        with pytest.raises(ValueError):
            storage.store(key, b"x")


def _race_if_absent(root: str, key: str, me: int, start: object, results: object) -> None:
    storage = FileStorage(Path(root))
    start.wait()  # type: ignore[attr-defined]
    try:
        storage.store(key, f"racer {me}".encode(), if_absent=True)
        results.put(me)  # type: ignore[attr-defined]
    except StorageConflict:
        results.put(-1)  # type: ignore[attr-defined]


def test_processes_racing_to_create_a_key_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        key = f"race/key-{round_}"
        start = context.Barrier(RACERS)
        results = context.Queue()
        racers = [
            context.Process(target=_race_if_absent, args=(str(tmp_path), key, i, start, results))
            for i in range(RACERS)
        ]
        for racer in racers:
            racer.start()
        outcomes = [results.get(timeout=60) for _ in racers]
        for racer in racers:
            racer.join(timeout=60)
            assert racer.exitcode == 0
        winners = [o for o in outcomes if o >= 0]
        assert len(winners) == 1, outcomes
        assert FileStorage(tmp_path).load_bytes(key) == f"racer {winners[0]}".encode()


def test_threads_racing_on_one_version_exactly_one_wins(tmp_path):
    storage = FileStorage(tmp_path)
    version = storage.store("k/counter", b"0")
    start = threading.Barrier(RACERS)
    won: list[int] = []

    def racer(me: int) -> None:
        start.wait()
        try:
            storage.store("k/counter", str(me).encode(), if_version=version)
            won.append(me)
        except StorageConflict:
            pass

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert storage.load_bytes("k/counter") == str(won[0]).encode()


def recorded(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "locks" / name).read_text())


def test_a_lock_has_a_holder_and_a_lease(tmp_path):
    storage = FileStorage(tmp_path)
    with storage.lock("issuance", holder="agent-1", lease=30) as held:
        assert held.holder == "agent-1"
        record = recorded(tmp_path, "issuance")
        assert record["holder"] == "agent-1" and record["pid"] == os.getpid()
        assert 0 < record["expires"] - time.time() <= 30
        # Anyone else waits, and gives up at its timeout with the holder's name.
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="held by agent-1"):
            storage.lock("issuance", holder="agent-2", timeout=0.2)
        assert time.monotonic() - started >= 0.2
        time.sleep(0.05)
        held.renew()
        assert recorded(tmp_path, "issuance")["expires"] > record["expires"]
        assert not held.lost.is_set()
    with storage.lock("issuance", holder="agent-2", timeout=1) as second:
        assert recorded(tmp_path, "issuance")["holder"] == "agent-2"
    with pytest.raises(LockLost):
        second.renew()  # released: nothing left to renew


def test_a_lock_waits_for_its_holder_then_passes_on(tmp_path):
    storage = FileStorage(tmp_path)
    order: list[str] = []
    first = storage.lock("users", holder="first")

    def second() -> None:
        with storage.lock("users", holder="second"):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.1)
    order.append("first")
    first.release()
    thread.join(timeout=10)
    assert order == ["first", "second"]


def _hold_and_die(root: str, ready: object, die: object) -> None:
    FileStorage(Path(root)).lock("issuance", holder="doomed")
    ready.set()  # type: ignore[attr-defined]
    die.wait(60)  # type: ignore[attr-defined]
    os._exit(9)  # as a kill -9: no release


def test_a_dead_holder_never_blocks_the_next(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, die = context.Event(), context.Event()
    child = context.Process(target=_hold_and_die, args=(str(tmp_path), ready, die))
    child.start()
    assert ready.wait(timeout=30)
    with pytest.raises(LockTimeout, match="held by doomed"):
        FileStorage(tmp_path).lock("issuance", timeout=0.01)
    die.set()
    child.join(timeout=30)
    assert child.exitcode == 9
    with FileStorage(tmp_path).lock("issuance", holder="next", timeout=10) as held:
        assert held.holder == "next"


def test_a_lock_whose_file_was_removed_is_lost(tmp_path):
    storage = FileStorage(tmp_path)
    held = storage.lock("issuance", holder="me")
    (tmp_path / "locks" / "issuance").unlink()
    with pytest.raises(LockLost):
        held.renew()
    assert held.lost.is_set()
    held.release()
