"""Fixtures for the e2e tests (the product image itself is ``product_image`` in tests/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.pebble import Pebble, PebbleFactory
from tests.support.podman import Container
from tests.support.ports import free_port


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
