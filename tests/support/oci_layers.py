"""OCI layouts with several layers per image, and multi-architecture indexes, for GC tests.

``tests.support.oci`` makes one-layer images; retention and collection need images that
share some layers and not others, and an index whose children carry no tag.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer(layout: Path, name: str, payload: bytes) -> tuple[dict[str, Any], str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = buf.getvalue()
    # compresslevel 0: random payloads do not shrink, and the size stays predictable.
    descriptor = _blob(layout, gzip.compress(tar_bytes, compresslevel=0, mtime=0))
    return {"mediaType": LAYER, **descriptor}, f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}"


def _image(layout: Path, layers: list[tuple[str, bytes]], arch: str) -> dict[str, Any]:
    descriptors, diff_ids = [], []
    for name, payload in layers:
        descriptor, diff_id = _layer(layout, name, payload)
        descriptors.append(descriptor)
        diff_ids.append(diff_id)
    config = {
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **_blob(layout, _json(config))},
        "layers": descriptors,
    }
    return {
        "mediaType": MANIFEST,
        **_blob(layout, _json(manifest)),
        "platform": {"architecture": arch, "os": "linux"},
    }


def _add_to_index(layout: Path, tag: str, entry: dict[str, Any]) -> str:
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = layout / "index.json"
    index = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append({**entry, "annotations": {REF_NAME: tag}})
    index_path.write_text(json.dumps(index, indent=2))
    return str(entry["digest"])


def add_image(layout: Path, tag: str, layers: list[tuple[str, bytes]], arch: str = "amd64") -> str:
    """Add an image of ``layers`` ((file name, payload), bottom first) as ``tag``; its digest."""
    layout.mkdir(parents=True, exist_ok=True)
    return _add_to_index(layout, tag, _image(layout, layers, arch))


def add_multiarch(layout: Path, tag: str, per_arch: dict[str, list[tuple[str, bytes]]]) -> str:
    """Add an index of one image per architecture as ``tag`` (children untagged); its digest."""
    layout.mkdir(parents=True, exist_ok=True)
    children = [_image(layout, layers, arch) for arch, layers in per_arch.items()]
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": children}
    return _add_to_index(layout, tag, {"mediaType": INDEX, **_blob(layout, _json(index))})


def children_of(layout: Path, tag: str) -> list[str]:
    """The child manifest digests of the index tagged ``tag``."""
    for entry in json.loads((layout / "index.json").read_text())["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            hexdigest = entry["digest"].removeprefix("sha256:")
            index = json.loads((layout / "blobs" / "sha256" / hexdigest).read_bytes())
            return [str(m["digest"]) for m in index["manifests"]]
    raise KeyError(tag)
