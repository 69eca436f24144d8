"""Shared fixtures: real servers and clients from tests/support."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.oci import make_oci_image
from tests.support.pebble import Pebble, PebbleFactory
from tests.support.seaweed import SeaweedS3

DEFAULT_REGISTRY_BINARY = "/usr/bin/docker-registry"


@pytest.fixture
def pebble_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleFactory]:
    """``make(http_port, **Pebble kwargs)`` starts a Pebble; all are stopped at teardown."""
    started: list[Pebble] = []

    def make(http_port: int, **kwargs: Any) -> Pebble:
        pebble = Pebble(tmp_path_factory.mktemp("pebble"), http_port, **kwargs)
        # Registered before start() so a half-started instance is still cleaned up.
        started.append(pebble)
        pebble.start()
        return pebble

    yield make
    for pebble in reversed(started):
        pebble.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session; tests take a bucket each (``s3_bucket``).
    A test that stops it must start it again (same endpoint, same data); ``seaweed_factory``
    gives a server of the test's own."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweed: SeaweedS3, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket on the session's SeaweedFS, named after the test."""
    return seaweed.new_bucket(request.node.name)


@pytest.fixture
def seaweed_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], SeaweedS3]]:
    """``make()`` starts a SeaweedFS S3 server of the test's own, to stop and restart
    (same endpoint, same data); all are stopped at teardown."""
    started: list[SeaweedS3] = []

    def make() -> SeaweedS3:
        server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
        started.append(server)
        server.start()
        return server

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture
def state_key_file(tmp_path: Path) -> Path:
    """A STATE_ENCRYPTION_KEY_FILE as `openssl rand -hex 32` writes it."""
    path = tmp_path / "state-encryption-key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def registry_binary() -> Path:
    """The distribution registry binary; missing means a broken setup, so fail, not skip."""
    configured = os.environ.get("ACME_REGISTRY_TEST_REGISTRY_BINARY", DEFAULT_REGISTRY_BINARY)
    found = shutil.which(configured)
    if found is None:
        pytest.fail(
            f"registry binary {configured!r} not found or not executable: install Debian's "
            "docker-registry (make system-deps) or set ACME_REGISTRY_TEST_REGISTRY_BINARY"
        )
    return Path(found)


@pytest.fixture(scope="session")
def registry_2x_binary() -> Path:
    """Debian's registry 2.8.2 even when ACME_REGISTRY_TEST_REGISTRY_BINARY names a 3.x: for
    the tests of what only a 2.x does (the config FIFO handover, refusing activation)."""
    found = shutil.which(DEFAULT_REGISTRY_BINARY)
    if found is None:
        pytest.fail(f"{DEFAULT_REGISTRY_BINARY} not found: install Debian's docker-registry")
    return Path(found)


@pytest.fixture
def oci_image(tmp_path: Path) -> Path:
    """An OCI layout with one small image tagged "v1" (random payload: a unique digest)."""
    layout = tmp_path / "oci-image"
    make_oci_image(layout, tag="v1", size=4096)
    return layout


@pytest.fixture(scope="session")
def product_image() -> str:
    """The image built from this repository's Dockerfile, once per session, on local stand-ins
    for the official base images (which cannot be pulled here); the stand-ins are cached."""
    from tests.support import podman

    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: the e2e tests need Debian's podman, buildah, "
            "runc, skopeo and debootstrap (make system-deps)"
        )
    built = podman.build_product_image()
    print(f"\nbuilt {built.tag}: {built.size / 1e6:.1f} MB in {built.seconds:.1f} s")
    return built.tag
