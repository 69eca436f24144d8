"""A read-only snapshot of the registry's storage tree: repositories, tags, manifests, blobs.

The distribution registry lays its storage out as (paths under ``docker/registry/v2``)::

    repositories/<repo>/_manifests/tags/<tag>/current/link          digest the tag points at;
                                                                    its mtime: when it last moved
    repositories/<repo>/_manifests/revisions/sha256/<hex>/link      a manifest in the repository
                                                                    (a deleted one keeps the
                                                                    directory, loses the link)
    repositories/<repo>/_layers/sha256/<hex>/link                   a blob linked into it
    blobs/sha256/<xx>/<hex>/data                                    every blob, manifests included

Reading goes through :class:`TreeStore` (list / read / stat by path) so that an S3 listing
can back it later, its ``LastModified`` as the time; only :class:`FilesystemTree` exists now.
Nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

V2_ROOT = "docker/registry/v2"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")

INDEX_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
IMAGE_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
SCHEMA1_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)


@dataclass(frozen=True)
class Stat:
    size: int
    modified: dt.datetime  # aware, UTC


class TreeStore(Protocol):
    """What a snapshot needs of storage; paths are relative to ``docker/registry/v2``."""

    def list(self, path: str) -> list[str]:
        """Names directly under ``path`` (files and directories); [] when it does not exist."""
        ...

    def read(self, path: str) -> bytes:
        """A file's content; FileNotFoundError when it does not exist."""
        ...

    def stat(self, path: str) -> Stat:
        """A file's size and modification time; FileNotFoundError when it does not exist."""
        ...


class FilesystemTree:
    """:class:`TreeStore` over ``storage.filesystem.rootdirectory``."""

    def __init__(self, root_directory: Path) -> None:
        self.base = Path(root_directory) / V2_ROOT

    def _path(self, path: str) -> Path:
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"path outside the tree: {path!r}")
        return self.base / path if path else self.base

    def list(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def stat(self, path: str) -> Stat:
        st = self._path(path).stat()
        return Stat(st.st_size, dt.datetime.fromtimestamp(st.st_mtime, dt.UTC))


@dataclass(frozen=True)
class Tag:
    repository: str
    name: str
    digest: str
    pushed: dt.datetime  # when the tag last moved (its current/link's mtime)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.name}"


@dataclass(frozen=True)
class Manifest:
    """What one manifest blob refers to (the same bytes in every repository holding it)."""

    digest: str
    media_type: str
    children: tuple[str, ...] = ()  # an index's manifests
    blobs: tuple[str, ...] = ()  # an image's config and layers
    subject: str | None = None  # OCI 1.1 referrers (cosign's newer form)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES


@dataclass(frozen=True)
class Snapshot:
    """Everything retention and the byte counts need, read at one moment."""

    repositories: tuple[str, ...]
    tags: tuple[Tag, ...]
    revisions: dict[str, frozenset[str]]  # repository -> manifest digests present in it
    manifests: dict[str, Manifest]  # digest -> parsed manifest
    blob_sizes: dict[str, int]  # digest -> bytes of blobs/sha256/xx/<hex>/data
    problems: tuple[str, ...] = field(default=())  # unreadable links or manifests

    def tags_of(self, repository: str) -> list[Tag]:
        return [t for t in self.tags if t.repository == repository]

    @property
    def total_bytes(self) -> int:
        """Bytes of every blob in storage (what ``acme_registry_storage_bytes`` reports)."""
        return sum(self.blob_sizes.values())

    def referenced(self, kept: dict[str, frozenset[str]] | None = None) -> set[str]:
        """Blobs that ``registry garbage-collect`` (without --delete-untagged) marks when the
        manifests in ``kept`` (default: every revision) are those present in each repository:
        the manifests themselves, index children, configs and layers."""
        marked: set[str] = set()
        pending = [d for digests in (kept or self.revisions).values() for d in digests]
        while pending:
            digest = pending.pop()
            if digest in marked:
                continue
            marked.add(digest)
            manifest = self.manifests.get(digest)
            if manifest is not None:
                marked.update(manifest.blobs)
                pending.extend(manifest.children)
        return marked

    def unreferenced_bytes(self, kept: dict[str, frozenset[str]] | None = None) -> int:
        """Bytes collection frees with ``kept`` present: blobs nothing in it references."""
        marked = self.referenced(kept)
        return sum(size for digest, size in self.blob_sizes.items() if digest not in marked)


def parse_manifest(digest: str, body: bytes) -> Manifest:
    """What a manifest refers to. ValueError for bytes that are not a manifest we know."""
    try:
        doc: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{digest}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{digest}: not a JSON object")
    media_type = doc.get("mediaType")
    # OCI manifests may leave mediaType out; the shape then tells which one it is.
    if not isinstance(media_type, str) or not media_type:
        if "manifests" in doc:
            media_type = "application/vnd.oci.image.index.v1+json"
        elif "layers" in doc or "config" in doc:
            media_type = "application/vnd.oci.image.manifest.v1+json"
        elif "fsLayers" in doc:
            media_type = "application/vnd.docker.distribution.manifest.v1+json"
        else:
            raise ValueError(f"{digest}: no mediaType and not a known manifest shape")
    subject = _descriptor_digest(doc.get("subject"))
    if "manifests" in doc:
        children = tuple(d for d in map(_descriptor_digest, doc.get("manifests") or []) if d)
        return Manifest(digest, media_type, children=children, subject=subject)
    if "fsLayers" in doc:
        sums = [layer.get("blobSum") for layer in doc.get("fsLayers") or []]
        return Manifest(digest, media_type, blobs=tuple(s for s in sums if _is_digest(s)))
    blobs = [_descriptor_digest(doc.get("config"))]
    blobs += [_descriptor_digest(layer) for layer in doc.get("layers") or []]
    return Manifest(digest, media_type, blobs=tuple(b for b in blobs if b), subject=subject)


def take_snapshot(store: TreeStore) -> Snapshot:
    """Read repositories, tags, revisions, the manifests they name and every blob's size."""
    problems: list[str] = []
    repositories = tuple(_repositories(store, "repositories", ""))
    tags: list[Tag] = []
    revisions: dict[str, frozenset[str]] = {}
    for repo in repositories:
        base = f"repositories/{repo}/_manifests"
        present = set()
        for hexdigest in store.list(f"{base}/revisions/sha256"):
            if _HEX.fullmatch(hexdigest) and _exists(
                store, f"{base}/revisions/sha256/{hexdigest}/link"
            ):
                present.add(f"sha256:{hexdigest}")
        revisions[repo] = frozenset(present)
        for name in store.list(f"{base}/tags"):
            link = f"{base}/tags/{name}/current/link"
            try:
                digest = store.read(link).decode("ascii", "replace").strip()
                pushed = store.stat(link).modified
            except FileNotFoundError:
                continue  # a tag being deleted right now, or a half-written one
            if not _is_digest(digest):
                problems.append(f"{repo}:{name}: link holds {digest[:80]!r}, not a digest")
                continue
            tags.append(Tag(repo, name, digest, pushed))

    blob_sizes = dict(_blob_sizes(store))
    manifests: dict[str, Manifest] = {}
    wanted = {d for digests in revisions.values() for d in digests} | {t.digest for t in tags}
    for digest in sorted(wanted):
        try:
            body = store.read(_blob_data_path(digest))
        except FileNotFoundError:
            problems.append(f"{digest}: manifest blob missing from storage")
            continue
        try:
            manifests[digest] = parse_manifest(digest, body)
        except ValueError as exc:
            problems.append(str(exc))
    return Snapshot(
        repositories=repositories,
        tags=tuple(sorted(tags, key=lambda t: (t.repository, t.name))),
        revisions=revisions,
        manifests=manifests,
        blob_sizes=blob_sizes,
        problems=tuple(problems),
    )


def tag_digest(store: TreeStore, repository: str, tag: str) -> str | None:
    """Where a tag points right now, read from storage (None: no such tag)."""
    try:
        raw = store.read(f"repositories/{repository}/_manifests/tags/{tag}/current/link")
    except FileNotFoundError:
        return None
    digest = raw.decode("ascii", "replace").strip()
    return digest if _is_digest(digest) else None


def tags_pointing_at(store: TreeStore, repository: str, digest: str) -> set[str]:
    """Every tag of ``repository`` that points at ``digest`` right now."""
    names = store.list(f"repositories/{repository}/_manifests/tags")
    return {n for n in names if tag_digest(store, repository, n) == digest}


def _repositories(store: TreeStore, path: str, prefix: str) -> Iterator[str]:
    # A repository is a directory holding _manifests; names may nest (team/app/web).
    names = store.list(path)
    if prefix and "_manifests" in names:
        yield prefix.rstrip("/")
    for name in names:
        if not name.startswith("_"):
            yield from _repositories(store, f"{path}/{name}", f"{prefix}{name}/")


def _blob_sizes(store: TreeStore) -> Iterator[tuple[str, int]]:
    for shard in store.list("blobs/sha256"):
        for hexdigest in store.list(f"blobs/sha256/{shard}"):
            if not _HEX.fullmatch(hexdigest):
                continue
            try:
                size = store.stat(f"blobs/sha256/{shard}/{hexdigest}/data").size
            except FileNotFoundError:
                continue  # an upload being committed, or a blob being swept
            yield f"sha256:{hexdigest}", size


def _blob_data_path(digest: str) -> str:
    hexdigest = digest.removeprefix("sha256:")
    return f"blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"


def _exists(store: TreeStore, path: str) -> bool:
    try:
        store.stat(path)
    except FileNotFoundError:
        return False
    return True


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def _descriptor_digest(descriptor: object) -> str | None:
    if isinstance(descriptor, dict):
        digest = descriptor.get("digest")
        if _is_digest(digest):
            return str(digest)
    return None
