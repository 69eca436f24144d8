"""What the e2e tests share: the product image run against a Pebble on the host loopback.

Containers use the host network, because Pebble, its DNS stub and skopeo listen on the
host's loopback; the agent and the registry then take unprivileged ports chosen per test
(ACME_HTTP_PORT, REGISTRY_HTTP_ADDR), so tests can run side by side.
"""

from __future__ import annotations

import hashlib
import tarfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.clients import wait_for_tls
from tests.support.pebble import Pebble
from tests.support.podman import Container
from tests.support.ports import free_port

NAME = "registry.test"
CA_IN_CONTAINER = "/etc/acme-registry/acme-ca.pem"
# compose's stop_grace_period and Kubernetes' terminationGracePeriodSeconds: the registry's
# default drain (30 s) + 5 s for supervisord's stopwaitsecs, rounded up.
GRACE_SECONDS = 45
FIRST_CERTIFICATE_TIMEOUT = 90
# A registry user for the tests (AUTH_USERS); skopeo sends it only when challenged.
REGISTRY_USER = "e2e"
REGISTRY_PASSWORD = "e2e-not-a-secret"
REGISTRY_CREDS = f"{REGISTRY_USER}:{REGISTRY_PASSWORD}"


def acme_env(pebble: Pebble, registry_port: int, **extra: str) -> dict[str, str]:
    """The environment an operator would give, aimed at this Pebble and these ports."""
    env = {
        "ACME_DOMAINS": NAME,
        "ACME_DIRECTORY": pebble.directory_url,
        "ACME_CA_BUNDLE": CA_IN_CONTAINER,
        "ACME_HTTP_PORT": str(pebble.http_port),
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{registry_port}",
        # On the host network the default admin port would be shared by every container.
        "ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTH_USERS": REGISTRY_CREDS,
    }
    env.update(extra)
    return env


def operator_env(**extra: str) -> dict[str, str]:
    """What an operator puts in the compose stack's environment (or `.env`), plus ``extra``."""
    return {"ACME_DOMAINS": NAME, "ACME_EMAIL": "ops@registry.test", **extra}


def ca_mount(pebble: Pebble) -> str:
    return f"{pebble.ca_bundle}:{CA_IN_CONTAINER}:ro"


def served(
    port: int, pebble: Pebble, timeout: float = FIRST_CERTIFICATE_TIMEOUT, name: str = NAME
) -> x509.Certificate:
    """The leaf served on ``port``, verified against this Pebble's root only."""
    return wait_for_tls("127.0.0.1", port, name, pebble.root_pem(), timeout)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def wait_ready(container: Container, timeout: float = 30) -> None:
    """Poll `acme-registry health --ready` inside the container (the readiness probe)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = container.exec("acme-registry", "health", "--ready")
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not ready after {timeout} s: {probe.stdout}{probe.stderr}\n{container.logs()}"
            )
        time.sleep(0.2)


def wait_exit(container: Container, timeout: float = 60) -> tuple[int, str]:
    """Exit status and output of a container that must stop by itself."""
    status = container.wait(timeout=timeout)
    return status, container.logs()


def message_lines(output: str) -> list[str]:
    """The container's own lines mentioning acme-registry (podman's log lines left out)."""
    return [line for line in output.splitlines() if line.startswith("acme-registry:")]


def copy_plain(source: Path, target: Path, mode: int) -> Path:
    """Copy the file behind ``source`` (following links) as a plain file."""
    target.write_bytes(source.resolve().read_bytes())
    target.chmod(mode)
    return target


PAYLOAD = "payload.bin"


def one_file_tarball(path: Path, payload: bytes) -> Path:
    """A root filesystem with one file, for ``docker import``."""
    source = path.with_name(PAYLOAD)
    source.write_bytes(payload)
    with tarfile.open(path, "w") as tar:
        tar.add(source, arcname=PAYLOAD)
    return path
