"""Test data in the shared registry storage: one large random blob, uploaded once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.support.clients import registry_session

CHUNK = 4 * 1024 * 1024


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; returns ``sha256:<hex>``."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return f"sha256:{digest.hexdigest()}"


def upload_blob(
    port: int, root_pem: bytes, repo: str, path: Path, digest: str, workdir: Path
) -> None:
    """Monolithic upload with the registry HTTP API: POST an upload, PUT it with ?digest."""
    session = registry_session("registry.test", root_pem, workdir)
    base = f"https://127.0.0.1:{port}"
    resp = session.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    if resp.status_code != 202:
        raise RuntimeError(f"starting the upload: HTTP {resp.status_code}: {resp.text[:300]}")
    location = resp.headers["Location"]
    if location.startswith("/"):
        location = base + location
    separator = "&" if "?" in location else "?"
    with path.open("rb") as body:  # a file: requests sends Content-Length, not chunks
        resp = session.put(
            f"{location}{separator}digest={digest}",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=600,
        )
    if resp.status_code != 201:
        raise RuntimeError(f"finishing the upload: HTTP {resp.status_code}: {resp.text[:300]}")
    resp = session.head(f"{base}/v2/{repo}/blobs/{digest}", timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"blob not there after upload: HTTP {resp.status_code}")
