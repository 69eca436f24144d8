"""Durable state behind one small protocol, :class:`Storage`, and its first backend.

Like certmagic's ``Storage``: the issuer, the responder, auth and the agent speak only to
this protocol, with keys built in :mod:`statekeys`, so a backend shared by several
replicas (object storage) plugs in without touching them. What such a backend needs is
in the protocol already:

- ``load`` returns the value with its version (:class:`Versioned`);
- ``store`` and ``delete`` can be conditional (only if absent, or only if still at a
  version) and raise :class:`StorageConflict` otherwise;
- ``lock`` takes a named lock with a holder id and a lease, renewed by its holder, with a
  ``lost`` signal;
- ``load_json`` / ``store_json`` come with the base class, for every backend.

:class:`FileStorage` is the local-directory backend (DATA_DIR). Every write is atomic
(temporary file, fsync, rename), so a kill -9 at any instant leaves the old or the new
content; secrets are created 0600 in 0700 directories. Conditions are checked under an
flock of the key's directory, and a version is the file's identity (inode, mtime_ns, size).
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from . import statekeys

DEFAULT_LEASE = 60.0


@dataclass(frozen=True)
class Versioned:
    """A stored value and the version it was read at (opaque; compare for equality only)."""

    data: bytes
    version: str


class StorageConflict(Exception):
    """A conditional store or delete found the key absent, present, or at another version."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"storage key {key!r} is not {expected}")
        self.key = key


class StoreUnavailable(OSError):
    """The store could not be reached or did not answer (connection refused, timeout, 5xx,
    credentials refused): unlike :class:`StorageConflict`, nothing is known about the key."""


class StoreUnsafe(RuntimeError):
    """The store does not honour conditional writes; running on it could double-order."""


class LockTimeout(TimeoutError):
    """The lock was still held by another holder when the wait ran out."""


class LockLost(Exception):
    """The lock is no longer ours (its lease ran out and another holder took it)."""


def new_holder_id() -> str:
    """A holder id unique to this process: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Lock(abc.ABC):
    """A held lock. Release it (or leave its ``with`` block); renew it before the lease ends.

    ``lost`` is set once the backend knows the lock is no longer held by us; work done
    under it must stop then.
    """

    def __init__(self, name: str, holder: str, lease: float) -> None:
        self.name = name
        self.holder = holder
        self.lease = lease
        self.lost = threading.Event()

    @abc.abstractmethod
    def renew(self) -> None:
        """Extend the lease by ``lease`` seconds from now; :class:`LockLost` if it is gone."""

    @abc.abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Storage(abc.ABC):
    """Keys are relative paths with ``/`` (see :mod:`statekeys`); values are bytes."""

    @abc.abstractmethod
    def load(self, key: str) -> Versioned | None:
        """The value and its version, or None when the key is absent."""

    @abc.abstractmethod
    def store(
        self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> str:
        """Write ``data``; return its new version.

        ``if_absent``: only if the key does not exist. ``if_version``: only if the key is
        still at that version. Otherwise :class:`StorageConflict`, and nothing is written.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, if_version: str | None = None) -> None:
        """Remove the key (absent is fine, unless ``if_version`` is given)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """The keys directly under ``prefix``, sorted."""

    @abc.abstractmethod
    def lock(
        self,
        name: str,
        holder: str | None = None,
        lease: float = DEFAULT_LEASE,
        timeout: float | None = None,
    ) -> Lock:
        """Wait for the named lock and hold it; :class:`LockTimeout` (naming the holder)
        after ``timeout`` seconds, or never when it is None."""

    def where(self, key: str) -> str:
        """Where the key lives, for messages to the operator (a path, a URL)."""
        return key

    # -- helpers every backend gets ----------------------------------------------------

    def load_if_changed(self, key: str, version: str | None) -> tuple[bool, Versioned | None]:
        """For polling: ``(False, None)`` while the key is still at ``version`` (None: still
        absent), else ``(True, what load returns)``. A shared backend answers "unchanged"
        with a conditional GET, without sending the value again."""
        found = self.load(key)
        if (found.version if found is not None else None) == version:
            return False, None
        return True, found

    def load_bytes(self, key: str) -> bytes | None:
        found = self.load(key)
        return found.data if found is not None else None

    def load_json(self, key: str) -> dict[str, Any] | None:
        """A JSON object, or None when the key is absent or does not hold one."""
        data = self.load_bytes(key)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def store_json(
        self,
        key: str,
        value: dict[str, Any],
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> str:
        return self.store(key, json_bytes(value), if_absent=if_absent, if_version=if_version)


def json_bytes(value: dict[str, Any]) -> bytes:
    """How a stored JSON record is written: sorted keys, indented, a final newline."""
    return json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The thread id too: two threads of one process may write the same path.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and any missing parents) as 0700; make an existing one 0700 too."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    # A volume root may belong to root with our group (Kubernetes fsGroup): its mode is
    # the platform's to set, and the 0700 folders inside it keep the secrets private.
    if path.stat().st_uid == os.getuid():
        os.chmod(path, 0o700)
    return path


def _version(st: os.stat_result) -> str:
    # Every store renames a new file into place, so the inode changes with each write;
    # mtime and size guard against an inode reused after a delete.
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


class FileStorage(Storage):
    """:class:`Storage` on a local directory; keys are relative paths with ``/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def where(self, key: str) -> str:
        return str(self._path(key))

    def load(self, key: str) -> Versioned | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        with os.fdopen(fd, "rb") as handle:
            # The identity of the file we read, not of whatever the path names a moment later.
            version = _version(os.fstat(handle.fileno()))
            return Versioned(handle.read(), version)

    def _current_version(self, path: Path) -> str | None:
        try:
            return _version(path.stat())
        except (FileNotFoundError, NotADirectoryError):
            return None

    @contextlib.contextmanager
    def _guard(self, directory: Path) -> Iterator[None]:
        """Conditions and writes in one directory, one at a time (processes and threads)."""
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _check(key: str, current: str | None, if_absent: bool, if_version: str | None) -> None:
        if if_absent and current is not None:
            raise StorageConflict(key, "absent")
        if if_version is not None and current != if_version:
            raise StorageConflict(key, f"at version {if_version}")

    def store(
        self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> str:
        path = self._path(key)
        ensure_private_dir(path.parent)
        with self._guard(path.parent):
            self._check(key, self._current_version(path), if_absent, if_version)
            write_atomic(path, data)
            version = self._current_version(path)
        assert version is not None
        return version

    def delete(self, key: str, *, if_version: str | None = None) -> None:
        path = self._path(key)
        if not path.parent.is_dir():
            self._check(key, None, False, if_version)
            return
        with self._guard(path.parent):
            self._check(key, self._current_version(path), False, if_version)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def list(self, prefix: str) -> list[str]:
        directory = self._path(prefix)
        if not directory.is_dir():
            return []
        return sorted(
            f"{prefix}/{p.name}"
            for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".")
        )

    def lock(
        self,
        name: str,
        holder: str | None = None,
        lease: float = DEFAULT_LEASE,
        timeout: float | None = None,
    ) -> Lock:
        path = self._path(statekeys.lock(name))
        ensure_private_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock(fd, timeout, name)
        except BaseException:
            os.close(fd)
            raise
        held = _FileLock(name, holder or new_holder_id(), lease, fd, path)
        held.renew()
        return held


def _flock(fd: int, timeout: float | None, name: str) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _read_record(fd).get("holder") or "another process"
                raise LockTimeout(
                    f"lock {name!r} is still held by {holder} after {timeout:g} s"
                ) from None
            time.sleep(0.01)


def _read_record(fd: int) -> dict[str, Any]:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class _FileLock(Lock):
    """An flock on ``locks/<name>``, with the holder and its lease written into the file.

    The kernel releases an flock when its holder dies, so a live holder never loses it and
    a dead one never blocks the next: the lease here is a record for operators (and the
    same contract a shared backend enforces with its conditional writes).
    """

    def __init__(self, name: str, holder: str, lease: float, fd: int, path: Path) -> None:
        super().__init__(name, holder, lease)
        self._fd: int | None = fd
        self._path = path
        self._inode = os.fstat(fd).st_ino

    def renew(self) -> None:
        fd = self._fd
        if fd is None:
            raise LockLost(f"lock {self.name!r} was released")
        try:
            still_ours = os.stat(self._path).st_ino == self._inode
        except FileNotFoundError:
            still_ours = False
        if not still_ours:
            # Someone removed the lock file: a new holder can flock a new file.
            self.lost.set()
            raise LockLost(f"lock {self.name!r}: its file was replaced")
        record = {"holder": self.holder, "pid": os.getpid(), "expires": time.time() + self.lease}
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
