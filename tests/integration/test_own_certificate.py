"""ACME_ENABLED=false: serve a certbot-style live/ tree read through symlinks, rotate when
the files are replaced, refuse a pair that does not match."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.agent import AgentProcess
from tests.support.clients import wait_for_tls
from tests.support.ports import free_port

NAME = "registry.test"


class TinyCA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "own test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self) -> tuple[bytes, bytes, int]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.pem
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return chain, key_pem, serial


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
    ca = TinyCA()
    letsencrypt = tmp_path / "letsencrypt"
    chain, key, serial = ca.issue()
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
        chain2, key2, serial2 = ca.issue()
        certbot_tree(letsencrypt, 2, chain2, key2)
        served = wait_for_tls(
            "127.0.0.1", port, NAME, ca.pem, timeout=20, accept=lambda c: c.serial_number == serial2
        )
        agent.wait_ready()

        # A key that does not match the certificate is refused; the last pair keeps serving.
        _, other_key, _ = ca.issue()
        (letsencrypt / "archive" / NAME / "privkey2.pem").write_bytes(other_key)
        deadline = time.monotonic() + 15
        while "does not match" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        assert wait_for_tls("127.0.0.1", port, NAME, ca.pem, timeout=5).serial_number == serial2
        assert agent.cli("health", "--ready").returncode == 0
        assert agent.cli("renew").returncode == 1
    finally:
        assert agent.stop() == 0
