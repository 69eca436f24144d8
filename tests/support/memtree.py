"""An in-memory registry storage tree, laid out as the registry lays out its filesystem.

Backs ``acme_registry.registrytree.TreeStore`` for unit tests of snapshots and retention (the
same interface an S3 listing will back), with a builder that pushes synthetic images.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from acme_registry.registrytree import Stat

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class MemoryTree:
    """Files by path (relative to docker/registry/v2) with content and modification time."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, dt.datetime]] = {}

    # -- TreeStore ---------------------------------------------------------------------------

    def list(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        return sorted({p[len(prefix) :].split("/")[0] for p in self.files if p.startswith(prefix)})

    def read(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path][0]

    def stat(self, path: str) -> Stat:
        if path not in self.files:
            raise FileNotFoundError(path)
        data, modified = self.files[path]
        return Stat(len(data), modified)

    # -- building ----------------------------------------------------------------------------

    def write(self, path: str, data: bytes, modified: dt.datetime = EPOCH) -> None:
        self.files[path] = (data, modified)

    def blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.write(f"blobs/sha256/{digest[:2]}/{digest}/data", data)
        return f"sha256:{digest}"

    def layer(self, name: str, size: int) -> tuple[str, int]:
        """A layer blob of ``size`` bytes whose content is a function of ``name``."""
        seed = hashlib.sha256(name.encode()).digest()
        data = (seed * (size // len(seed) + 1))[:size]
        return self.blob(data), size

    def _manifest(self, repo: str, doc: dict[str, Any]) -> str:
        digest = self.blob(json.dumps(doc, sort_keys=True).encode())
        hexdigest = digest.removeprefix("sha256:")
        self.write(
            f"repositories/{repo}/_manifests/revisions/sha256/{hexdigest}/link", digest.encode()
        )
        return digest

    def image(self, repo: str, layers: list[tuple[str, int]], config: str = "cfg") -> str:
        """Push an image manifest (config + ``layers`` as (name, size)) to ``repo``."""
        config_digest, config_size = self.layer(f"config-{config}", 100)
        descriptors = []
        for name, size in layers:
            digest, _ = self.layer(name, size)
            descriptors.append({"mediaType": "layer", "digest": digest, "size": size})
            self._link_layer(repo, digest)
        self._link_layer(repo, config_digest)
        return self._manifest(
            repo,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"digest": config_digest, "size": config_size},
                "layers": descriptors,
            },
        )

    def index(self, repo: str, children: list[str]) -> str:
        return self._manifest(
            repo,
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": c} for c in children],
            },
        )

    def tag(self, repo: str, tag: str, digest: str, pushed: dt.datetime) -> None:
        self.write(
            f"repositories/{repo}/_manifests/tags/{tag}/current/link", digest.encode(), pushed
        )

    def untag(self, repo: str, tag: str) -> None:
        self.files.pop(f"repositories/{repo}/_manifests/tags/{tag}/current/link", None)

    def _link_layer(self, repo: str, digest: str) -> None:
        hexdigest = digest.removeprefix("sha256:")
        self.write(f"repositories/{repo}/_layers/sha256/{hexdigest}/link", digest.encode())
