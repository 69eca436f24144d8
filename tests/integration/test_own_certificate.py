"""ACME_ENABLED=false: serve a certbot-style live/ tree read through symlinks, rotate when
the files are replaced, refuse a pair that does not match."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography import x509

from tests.support.agent import AgentProcess
from tests.support.clients import wait_for_tls
from tests.support.ports import free_port
from tests.support.tls import TestCA

NAME = "registry.test"


def issue(ca: TestCA) -> tuple[bytes, bytes, int]:
    """(full chain, key, serial) of a new certificate for NAME."""
    leaf_pem, key_pem = ca.issue_pair([NAME], [])
    return leaf_pem + ca.pem, key_pem, x509.load_pem_x509_certificate(leaf_pem).serial_number


def certbot_tree(root: Path, version: int, chain: bytes, key: bytes) -> None:
    """What certbot leaves: live/<name>/*.pem -> ../../archive/<name>/*N.pem."""
    archive, live = root / "archive" / NAME, root / "live" / NAME
    archive.mkdir(parents=True, exist_ok=True)
    live.mkdir(parents=True, exist_ok=True)
    (archive / f"fullchain{version}.pem").write_bytes(chain)
    (archive / f"privkey{version}.pem").write_bytes(key)
    for name in ("fullchain", "privkey"):
        link = live / f"{name}.pem"
        tmp = live / f".{name}.tmp"
        tmp.symlink_to(f"../../archive/{NAME}/{name}{version}.pem")
        os.replace(tmp, link)


def test_certbot_tree_is_served_and_followed(tmp_path, registry_binary):
    ca = TestCA()
    letsencrypt = tmp_path / "letsencrypt"
    chain, key, serial = issue(ca)
    certbot_tree(letsencrypt, 1, chain, key)
    env = AgentProcess.environment(
        tmp_path / "agent",
        domains=NAME,
        directory="https://127.0.0.1:1/dir",  # never contacted with ACME off
        ca_bundle=Path("/etc/ssl/certs/ca-certificates.crt"),
        http_port=free_port(),
        registry_binary=registry_binary,
        ACME_ENABLED="false",
        TLS_CERT_FILE=str(letsencrypt / "live" / NAME / "fullchain.pem"),
        TLS_KEY_FILE=str(letsencrypt / "live" / NAME / "privkey.pem"),
    )
    env.pop("ACME_CA_BUNDLE")
    agent = AgentProcess(tmp_path / "agent", env).start()
    port = agent.registry_port
    try:
        served = wait_for_tls("127.0.0.1", port, NAME, ca.pem, timeout=30)
        assert served.serial_number == serial
        agent.wait_ready()

        # certbot renews: a new archive version and the live links switched.
        chain2, key2, serial2 = issue(ca)
        certbot_tree(letsencrypt, 2, chain2, key2)
        served = wait_for_tls(
            "127.0.0.1", port, NAME, ca.pem, timeout=20, accept=lambda c: c.serial_number == serial2
        )
        agent.wait_ready()

        # A key that does not match the certificate is refused; the last pair keeps serving.
        _, other_key, _ = issue(ca)
        (letsencrypt / "archive" / NAME / "privkey2.pem").write_bytes(other_key)
        deadline = time.monotonic() + 15
        while "does not match" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        assert wait_for_tls("127.0.0.1", port, NAME, ca.pem, timeout=5).serial_number == serial2
        assert agent.cli("health", "--ready").returncode == 0
        assert agent.cli("renew").returncode == 1
    finally:
        agent.stop_cleanly()
