"""The responder's connection cap, derived from the open-file limit."""

from __future__ import annotations

import pytest

from acme_registry.responder import default_max_connections


@pytest.mark.parametrize(
    ("open_files", "cap"),
    [
        (1024, 768),  # a container's usual soft limit: a quarter stays for the rest
        (20_000, 18_976),  # at most 1024 files are kept back
        (1_048_576, 65_536),  # a fixed ceiling bounds memory whatever the limit
        (4, 3),
        (1, 1),
    ],
)
def test_cap(open_files, cap):
    assert default_max_connections(open_files) == cap
