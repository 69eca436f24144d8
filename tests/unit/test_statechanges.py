"""The change record: writers bump it, a replica's watch counts the changes it sees."""

from pathlib import Path

from acme_registry import statechanges, statekeys
from acme_registry.storage import FileStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_watch_counts_each_bump_once(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    watch = statechanges.ChangeWatch(storage, clock=Clock())
    first = watch.look()
    assert first == 1  # the first look: every follower reads its record once
    assert watch.look() == first
    statechanges.bump(storage)
    assert watch.look() == first + 1
    assert watch.look() == first + 1
    assert watch.error is None


def test_the_first_look_creates_the_record_so_later_looks_find_one(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    assert storage.load(statekeys.CHANGES) is None
    watch = statechanges.ChangeWatch(storage, clock=Clock())
    watch.look()
    assert storage.load(statekeys.CHANGES) is not None
    assert watch.look() == 1


def test_a_full_look_counts_as_a_change_without_a_bump(tmp_path: Path) -> None:
    clock = Clock()
    watch = statechanges.ChangeWatch(FileStorage(tmp_path), full_look=60, clock=clock)
    assert watch.look() == 1
    clock.now += 59
    assert watch.look() == 1
    clock.now += 1
    assert watch.look() == 2
    clock.now += 30
    assert watch.look() == 2


def test_an_unreachable_store_is_the_watchs_error_until_a_look_succeeds(tmp_path: Path) -> None:
    # A file where the store's directory must be: every read fails with an OSError.
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    watch = statechanges.ChangeWatch(FileStorage(blocked), clock=Clock())
    try:
        watch.look()
    except OSError:
        pass
    else:
        raise AssertionError("a look on an unreachable store must raise")
    assert watch.error is not None and watch.serial == 0
    watch.storage = FileStorage(tmp_path / "store")
    assert watch.look() == 1
    assert watch.error is None


def test_a_failed_bump_is_logged_not_raised(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    statechanges.bump(FileStorage(blocked))
    assert "could not mark the shared state changed" in caplog.text
