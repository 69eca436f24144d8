"""Durable state under DATA_DIR behind a small interface (load, store, list, delete, lock).

Like certmagic's ``Storage``: the issuer, the responder and the agent only speak to this
interface, so a directory shared between replicas can back it later without touching them.
Every write is atomic (temporary file, fsync, rename), so a kill -9 at any instant leaves
either the old or the new content, and secrets are created 0600 in 0700 directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol


class Storage(Protocol):
    def load(self, key: str) -> bytes | None: ...
    def store(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def lock(self, name: str) -> contextlib.AbstractContextManager[None]: ...


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


class FileStorage:
    """:class:`Storage` on a local directory; keys are relative paths with ``/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def load(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def store(self, key: str, data: bytes) -> None:
        path = self._path(key)
        ensure_private_dir(path.parent)
        write_atomic(path, data)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def list(self, prefix: str) -> list[str]:
        directory = self._path(prefix)
        if not directory.is_dir():
            return []
        return sorted(
            f"{prefix}/{p.name}"
            for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".")
        )

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock held by this process until the block ends (or it dies)."""
        path = self._path(f"locks/{name}")
        ensure_private_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load_json(self, key: str) -> dict[str, Any] | None:
        data = self.load(key)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def store_json(self, key: str, value: dict[str, Any]) -> None:
        self.store(key, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")
