"""The README's quick start, with the real Docker engine (Debian's docker.io) and its CLI.

Followed as literally as these machines allow, with Pebble standing in for Let's Encrypt:

- the image is podman's build moved over (``podman save | docker load``) and tagged
  ``acme-registry``, as ``docker build -t acme-registry .`` would name it: nothing can be
  pulled here, so ``docker build`` has no base images;
- ``docker run -d --name registry --restart always --stop-timeout 45`` with the three named
  volumes, and ``docker exec registry cat /data/auth/initial-admin-password`` for the
  generated admin's password, then ``docker login``, ``docker push`` and ``docker pull``;
  ``docker stop -t 45`` and ``docker start``; the upgrade (stop, ``docker rm``, run again);
- ``--network host`` instead of ``-p 80:80 -p 443:443``: **the port mapping itself is not
  exercised.** The engine runs without a bridge (``--bridge=none``: no iptables here), so
  ``-p`` would do nothing, and on the host network the image's user (uid 10001) cannot bind
  80 and 443. ``ACME_HTTP_PORT`` and ``REGISTRY_HTTP_ADDR`` therefore take ports above 1023,
  as the README says for host networking, and ``ADMIN_ADDR`` one of its own, as the README
  says for several containers on the host network (tests run side by side);
- ``ACME_DIRECTORY`` and ``ACME_CA_BUNDLE`` (mounted read-only) point at Pebble, as the
  README's "Internal networks with a private ACME CA" says; the engine trusts Pebble's root
  for ``registry.test:<port>`` through ``certs.d``, where Let's Encrypt needs no setup.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.common import (
    CA_IN_CONTAINER,
    GRACE_SECONDS,
    NAME,
    PAYLOAD,
    acme_env,
    fingerprint,
    one_file_tarball,
    served,
)
from tests.support.docker import DockerEngine
from tests.support.pebble import Pebble
from tests.support.ports import free_ports

pytestmark = pytest.mark.e2e

CONTAINER = "registry"
VOLUMES = {
    "registry-data": "/data",
    "registry-certs": "/certs",
    "registry-storage": "/var/lib/registry",
}
# The image's HEALTHCHECK probes every 30 s, the first time 30 s after the start.
HEALTHY_TIMEOUT = 150
READY_TIMEOUT = 60


@pytest.fixture
def quick_start_cleanup(docker_engine: DockerEngine) -> Iterator[None]:
    """Remove the quick start's container and named volumes afterwards, pass or fail."""
    yield
    docker_engine.docker("rm", "-f", "-v", CONTAINER, check=False, timeout=90)
    docker_engine.docker("volume", "rm", "-f", *VOLUMES, check=False)


def quick_start_run_args(
    image: str, pebble: Pebble, registry_port: int, admin_port: int
) -> list[str]:
    """The README's ``docker run``, adapted only as the module docstring says."""
    env = acme_env(
        pebble,
        registry_port,
        ACME_EMAIL="ops@example.com",
        ADMIN_ADDR=f"127.0.0.1:{admin_port}",
    )
    # No users given: the agent generates the admin, as in the quick start.
    env.pop("AUTH_USERS")
    args = ["run", "-d", "--name", CONTAINER, "--restart", "always"]
    args += ["--stop-timeout", str(GRACE_SECONDS), "--network", "host"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    for volume, mount_point in VOLUMES.items():
        args += ["-v", f"{volume}:{mount_point}"]
    args += ["-v", f"{pebble.ca_bundle}:{CA_IN_CONTAINER}:ro"]
    return [*args, image]


def wait_for(engine: DockerEngine, template: str, wanted: str, timeout: float) -> None:
    """Poll ``docker inspect --format TEMPLATE registry`` until it says ``wanted``."""
    started = time.monotonic()
    while True:
        seen = engine.inspect(CONTAINER, template)
        if seen == wanted:
            return
        if time.monotonic() - started > timeout:
            health = engine.inspect(CONTAINER, "{{json .State}}")
            logs = engine.docker("logs", CONTAINER, check=False)
            raise AssertionError(
                f"{template} is {seen!r}, not {wanted!r}, after {timeout} s: {health}\n"
                f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
            )
        time.sleep(1)


def wait_ready(engine: DockerEngine) -> None:
    """``acme-registry health --ready`` through ``docker exec``: serving a current cert."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        probe = engine.docker("exec", CONTAINER, "acme-registry", "health", "--ready", check=False)
        if probe.returncode == 0:
            return
        assert time.monotonic() < deadline, f"not ready: {probe.stdout}{probe.stderr}"
        time.sleep(0.5)


def pulled_payload(engine: DockerEngine, ref: str, into: Path) -> bytes:
    """``docker pull REF`` from nothing local, then the file read back out of the image."""
    engine.docker("image", "rm", "--force", ref, check=False)
    assert engine.docker("image", "inspect", ref, check=False).returncode != 0
    engine.docker("pull", ref)
    holder = f"payload-{os.getpid()}"
    engine.docker("create", "--name", holder, ref, "/none")
    try:
        into.mkdir(parents=True, exist_ok=True)
        engine.docker("cp", f"{holder}:/{PAYLOAD}", str(into))
    finally:
        engine.docker("rm", holder, check=False)
    return (into / PAYLOAD).read_bytes()


def test_quick_start_with_docker(
    docker_engine: DockerEngine,
    docker_image: str,
    pebble: Pebble,
    quick_start_cleanup: None,
    tmp_path: Path,
) -> None:
    docker = docker_engine.docker
    registry_port, admin_port = free_ports(2, exclude=(pebble.http_port,))
    registry = f"{NAME}:{registry_port}"
    docker_engine.trust(registry, pebble.root_pem())

    started = time.monotonic()
    docker(*quick_start_run_args(docker_image, pebble, registry_port, admin_port))
    first = served(registry_port, pebble)
    print(f"\nfirst verified TLS handshake {time.monotonic() - started:.2f} s after docker run")
    assert pebble.orders_created() == 1

    # The quick start's next two lines.
    password = docker("exec", CONTAINER, "cat", "/data/auth/initial-admin-password").stdout
    assert password.strip(), "no generated admin password"
    ref = f"{registry}/demo:v1"
    payload = os.urandom(4096)
    docker("import", str(one_file_tarball(tmp_path / "rootfs.tar", payload)), ref)
    refused = docker("push", ref, check=False)
    assert "no basic auth credentials" in refused.stderr, refused.stdout + refused.stderr
    login = docker("login", registry, "-u", "admin", "--password-stdin", input=password.strip())
    assert "Login Succeeded" in login.stdout, login.stdout + login.stderr

    pushed_id = docker_engine.inspect(ref, "{{.Id}}")
    push_started = time.monotonic()
    docker("push", ref)
    print(f"docker push {time.monotonic() - push_started:.2f} s")
    digest = docker_engine.inspect(ref, "{{index .RepoDigests 0}}")
    assert digest.startswith(f"{registry}/demo@sha256:"), digest
    assert pulled_payload(docker_engine, ref, tmp_path / "pulled") == payload
    assert docker_engine.inspect(ref, "{{.Id}}") == pushed_id
    assert docker_engine.inspect(ref, "{{index .RepoDigests 0}}") == digest

    # The image's HEALTHCHECK, run by the engine on its own schedule.
    wait_for(docker_engine, "{{.State.Health.Status}}", "healthy", HEALTHY_TIMEOUT)
    print(f"healthy {time.monotonic() - started:.1f} s after docker run")

    stop_started = time.monotonic()
    docker("stop", "-t", str(GRACE_SECONDS), CONTAINER, timeout=GRACE_SECONDS + 60)
    took = time.monotonic() - stop_started
    print(f"docker stop took {took:.2f} s")
    assert docker_engine.inspect(CONTAINER, "{{.State.Running}}") == "false"
    assert docker_engine.inspect(CONTAINER, "{{.State.ExitCode}}") == "0"
    assert took < GRACE_SECONDS, f"docker stop took {took:.1f} s: SIGKILL, not a clean exit"
    logs = docker("logs", CONTAINER)
    assert "Traceback" not in logs.stdout + logs.stderr

    # docker start: the named volumes' certificate and images, and no new order.
    docker("start", CONTAINER)
    again = served(registry_port, pebble)
    wait_ready(docker_engine)
    assert fingerprint(again) == fingerprint(first)
    assert pulled_payload(docker_engine, ref, tmp_path / "pulled-again") == payload
    assert pebble.orders_created() == 1

    # The README's upgrade: stop, remove, run again on the same named volumes.
    docker("stop", "-t", str(GRACE_SECONDS), CONTAINER, timeout=GRACE_SECONDS + 60)
    assert docker_engine.inspect(CONTAINER, "{{.State.ExitCode}}") == "0"
    docker("rm", CONTAINER)
    docker(*quick_start_run_args(docker_image, pebble, registry_port, admin_port))
    upgraded = served(registry_port, pebble)
    wait_ready(docker_engine)
    assert fingerprint(upgraded) == fingerprint(first)
    assert pulled_payload(docker_engine, ref, tmp_path / "pulled-upgraded") == payload
    assert pebble.orders_created() == 1
    docker("stop", "-t", str(GRACE_SECONDS), CONTAINER, timeout=GRACE_SECONDS + 60)
    assert docker_engine.inspect(CONTAINER, "{{.State.ExitCode}}") == "0"
