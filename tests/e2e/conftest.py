"""Fixtures for the e2e tests (the product image itself is ``product_image`` in tests/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.common import NAME
from tests.support.docker import DockerEngine, remove_workdir, temporary_engine
from tests.support.pebble import Pebble, PebbleFactory
from tests.support.podman import Container
from tests.support.ports import free_port

# What `docker build -t acme-registry .` in the README's quick start makes.
DOCKER_IMAGE_TAG = "acme-registry"


@pytest.fixture
def pebble(pebble_factory: PebbleFactory) -> Pebble:
    """A Pebble whose HTTP-01 validations go to a free port on the host loopback."""
    return pebble_factory(free_port())


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    """Containers appended here are removed (with anonymous volumes) after the test."""
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """One Docker engine for the session, resolving the registry's test name to loopback."""
    engine, workdir = temporary_engine([NAME])
    try:
        with engine:
            yield engine
    finally:
        remove_workdir(workdir)


@pytest.fixture(scope="session")
def docker_image(docker_engine: DockerEngine, product_image: str) -> str:
    """The podman-built product image in the Docker engine, as the README's quick start
    names it after ``docker build -t acme-registry .``."""
    return docker_engine.load_from_podman(product_image, DOCKER_IMAGE_TAG)
