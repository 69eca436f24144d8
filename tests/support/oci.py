"""Build small OCI image layouts on disk, without podman or network, for push/pull tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
PAYLOAD_PATH = "payload.bin"
# Fixed timestamps keep the digests a function of the payload alone, so the same payload
# always yields the same manifest digest.
_EPOCH = 0
_CREATED = "1970-01-01T00:00:00Z"


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _write_blob(layout_dir: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    blob_dir = layout_dir / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    (blob_dir / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _layer_tar(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(PAYLOAD_PATH)
        info.size = len(payload)
        info.mode = 0o644
        info.mtime = _EPOCH
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def make_oci_image(
    layout_dir: Path, tag: str = "v1", payload: bytes | None = None, size: int = 0
) -> None:
    """Write (or add ``tag`` to) an OCI image layout holding one single-layer linux/amd64 image.

    The layer holds ``/payload.bin`` with ``payload``, or else ``size`` random bytes. An
    existing layout keeps its other tags; an existing entry for ``tag`` is replaced.
    """
    layout_dir = Path(layout_dir)
    layout_dir.mkdir(parents=True, exist_ok=True)
    if payload is None:
        payload = os.urandom(size)

    tar_bytes = _layer_tar(payload)
    # mtime=0 keeps the gzip header, and so the layer digest, reproducible.
    layer_bytes = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    layer_digest, layer_size = _write_blob(layout_dir, layer_bytes)

    config = {
        "created": _CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        # diff_ids name the UNCOMPRESSED layer; registries and skopeo check them on pull.
        "rootfs": {
            "type": "layers",
            "diff_ids": [f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}"],
        },
        "history": [{"created": _CREATED, "created_by": "tests.support.oci.make_oci_image"}],
    }
    config_digest, config_size = _write_blob(layout_dir, _canonical_json(config))

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = _write_blob(layout_dir, _canonical_json(manifest))

    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    index_path = layout_dir / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    manifests = [
        m
        for m in index.get("manifests", [])
        if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    manifests.append(
        {
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {REF_NAME_ANNOTATION: tag},
        }
    )
    index["manifests"] = manifests
    index_path.write_text(json.dumps(index, indent=2))


def layout_manifest_digest(layout_dir: Path, tag: str = "v1") -> str:
    """``sha256:<hex>`` of the manifest tagged ``tag`` in a layout (what a registry serves)."""
    index = json.loads((Path(layout_dir) / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return str(entry["digest"])
    raise KeyError(f"tag {tag!r} not in {layout_dir}/index.json")


def read_payload(layout_dir: Path, tag: str = "v1") -> bytes:
    """Return the payload file of the image tagged ``tag``: proves a pulled copy is intact."""
    layout_dir = Path(layout_dir)
    manifest = json.loads(_blob(layout_dir, layout_manifest_digest(layout_dir, tag)))
    layer = gzip.decompress(_blob(layout_dir, manifest["layers"][0]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.extractfile(PAYLOAD_PATH.lstrip("/"))
        if member is None:
            raise KeyError(f"{PAYLOAD_PATH} missing from the layer")
        return member.read()


def _blob(layout_dir: Path, digest: str) -> bytes:
    algo, _, hexdigest = digest.partition(":")
    return (layout_dir / "blobs" / algo / hexdigest).read_bytes()
