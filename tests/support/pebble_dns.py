"""Pebble 2.10 resolving through a real DNS server (BIND) instead of pebble-challtestsrv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.pebble import PEBBLE_PROFILES, Pebble, pebble_sid_binary


class PebbleWithDns(Pebble):
    """Pebble whose validator asks ``dns_server`` (``host:port``) for every lookup.

    No pebble-challtestsrv runs, so names resolve only as that server says: with an
    authoritative test zone and no A records pointing at an HTTP-01 responder, Pebble has
    no way to reach the agent's port 80, and dns-01 / dns-persist-01 is all it can check.
    """

    def __init__(self, workdir: Path, dns_server: str, **kwargs: Any) -> None:
        kwargs.setdefault("binary", pebble_sid_binary(install=True))
        # HTTP-01 validations go to a port nothing listens on.
        super().__init__(workdir, http_port=kwargs.pop("http_port", 9), **kwargs)
        self._dns_server = dns_server

    @property
    def dns_server(self) -> str:
        return self._dns_server

    def _start_challtestsrv(self) -> None:
        # The real DNS server is the test's; nothing to start here.
        return None


def validating_pebble(
    workdir: Path, dns_server: str, nonce_reject: int | None = None
) -> PebbleWithDns:
    """The DNS tests' Pebble (not started): profiles on, and a fresh authorization for every
    order (``PEBBLE_AUTHZREUSE=0``), so every order really validates through DNS;
    ``nonce_reject`` as :class:`Pebble` takes it (None: Pebble's 5 %)."""
    return PebbleWithDns(
        workdir,
        dns_server,
        config_overrides={"profiles": PEBBLE_PROFILES},
        env={"PEBBLE_AUTHZREUSE": "0"},
        nonce_reject=nonce_reject,
    )
