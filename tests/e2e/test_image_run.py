"""The image under `podman run`, as an operator runs it with `docker run`."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.e2e.common import (
    GRACE_SECONDS,
    NAME,
    REGISTRY_CREDS,
    acme_env,
    ca_mount,
    copy_plain,
    fingerprint,
    message_lines,
    served,
    wait_exit,
    wait_ready,
)
from tests.support.clients import Skopeo
from tests.support.oci import layout_manifest_digest
from tests.support.podman import (
    IMAGE_GID,
    IMAGE_UID,
    REPO,
    Container,
    image_config,
    named_volumes,
    owned_dir,
    podman,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile_pins() -> dict[str, str]:
    """The ``name==version`` constraints the Dockerfile installs with."""
    text = (REPO / "Dockerfile").read_text()
    return {
        normalize(name): version
        for name, version in re.findall(r"^\s+([A-Za-z0-9_.-]+)==(\S+) \\$", text, re.MULTILINE)
    }


def test_image_config(product_image):
    config = image_config(product_image)
    assert config["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_GID}"
    assert set(config["Config"]["ExposedPorts"]) == {"80/tcp", "443/tcp", "5001/tcp"}
    assert set(config["Config"]["Volumes"]) == {"/data", "/certs", "/var/lib/registry"}
    assert config["Config"]["StopSignal"] == "SIGTERM"
    assert config["Config"]["Cmd"] == ["run"]
    # Only the docker format keeps it; an OCI build would silently have none.
    assert config["Healthcheck"]["Test"] == ["CMD", "acme-registry", "health"]
    assert config["Healthcheck"]["StartPeriod"] > 0

    # Any command other than acme-registry's own runs as given, here a look inside.
    inside = podman(
        "run",
        "--rm",
        "--network",
        "none",
        product_image,
        "sh",
        "-c",
        "for tool in gcc cc make; do command -v $tool && exit 1; done;"
        " python3 -m pip --version 2>/dev/null && exit 1;"
        " ls -d /root/.cache/pip 2>/dev/null && exit 1;"
        " /bin/registry --version && acme-registry --help >/dev/null"
        " && python3 -c 'from acme_registry.launcher import supervisord_conf as s; print(s())'"
        " && stat -c '%n %u:%g %a' /data /certs /var/lib/registry"
        " && python3 -c 'import importlib.metadata as m;"
        ' [print("dist", d.metadata["Name"], d.version) for d in m.distributions()]\'',
    )
    lines = inside.stdout.splitlines()
    installed = {
        normalize(name): version
        for _, name, version in (line.split() for line in lines if line.startswith("dist "))
    }
    assert installed.pop("acme-registry")
    pins = dockerfile_pins()
    unpinned = {name: version for name, version in installed.items() if pins.get(name) != version}
    assert not unpinned, f"installed but not pinned in the Dockerfile as such: {unpinned}"
    assert "site-packages/acme_registry/supervisord.conf" in inside.stdout
    assert f"/data {IMAGE_UID}:{IMAGE_GID} 700" in lines
    assert f"/certs {IMAGE_UID}:{IMAGE_GID} 755" in lines
    assert f"/var/lib/registry {IMAGE_UID}:{IMAGE_GID} 755" in lines


def test_run_push_pull_stop_and_start_again(product_image, pebble, containers, oci_image, tmp_path):
    registry_port = free_port()
    with named_volumes("data", "certs", "storage") as volumes:
        mounts = [
            f"{volumes['data']}:/data",
            f"{volumes['certs']}:/certs",
            f"{volumes['storage']}:/var/lib/registry",
            ca_mount(pebble),
        ]
        container = Container(product_image, acme_env(pebble, registry_port), mounts)
        containers.append(container)
        started = time.monotonic()
        container.start()
        first = served(registry_port, pebble)
        print(f"first verified TLS handshake {time.monotonic() - started:.2f} s after podman run")
        wait_ready(container)
        # The image's HEALTHCHECK, run the way the engine runs it.
        health = podman("healthcheck", "run", container.name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=REGISTRY_CREDS)
        ref = f"{NAME}:{registry_port}/demo:v1"
        skopeo.push(oci_image, "v1", ref)
        skopeo.pull(ref, tmp_path / "pulled", "v1")
        digest = layout_manifest_digest(oci_image, "v1")
        assert layout_manifest_digest(tmp_path / "pulled", "v1") == digest

        took = container.stop(GRACE_SECONDS)
        assert container.exit_code() == 0, container.logs()
        assert took < GRACE_SECONDS, f"podman stop took {took:.1f} s"
        print(f"podman stop took {took:.2f} s")
        assert "Traceback" not in container.logs()

        # docker stop / docker start: the volumes' state, no new order.
        container.restart()
        again = served(registry_port, pebble)
        wait_ready(container)
        assert fingerprint(again) == fingerprint(first)
        assert skopeo.manifest_digest(ref) == digest
        container.stop(GRACE_SECONDS)
        assert container.exit_code() == 0, container.logs()

        # An upgrade: a new container on the same named volumes.
        container.remove()
        upgraded = Container(product_image, acme_env(pebble, registry_port), mounts)
        containers.append(upgraded)
        upgraded.start()
        third = served(registry_port, pebble)
        assert fingerprint(third) == fingerprint(first)
        assert skopeo.manifest_digest(ref) == digest
        assert pebble.orders_created() == 1
        upgraded.stop(GRACE_SECONDS)
        assert upgraded.exit_code() == 0, upgraded.logs()


def test_health_ready_only_once_serving(product_image, pebble, containers):
    registry_port = free_port()
    container = Container(product_image, acme_env(pebble, registry_port), [ca_mount(pebble)])
    containers.append(container)
    container.start()
    served(registry_port, pebble)
    wait_ready(container)
    assert container.exec("acme-registry", "health").returncode == 0
    status = container.exec("acme-registry", "status")
    assert status.returncode == 0
    assert NAME in status.stdout
    assert "Pebble" in status.stdout


def test_configuration_error_exits_2_with_one_line(product_image, pebble, containers):
    env = acme_env(pebble, free_port(), ACME_DOMAINS="bad_name.test")
    container = Container(product_image, env, [ca_mount(pebble)])
    containers.append(container)
    container.start()
    status, output = wait_exit(container)
    assert status == 2, output
    assert message_lines(output) == [
        "acme-registry: configuration error: ACME_DOMAINS: 'bad_name.test' is not a valid DNS name"
    ], output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("mount_point", "named"),
    [("/data", "DATA_DIR /data"), ("/certs", "CERT_DIR /certs"), ("/var/lib/registry", "")],
    ids=["data", "certs", "storage"],
)
def test_unwritable_volume_stops_with_the_path_and_the_chown(
    product_image, pebble, containers, tmp_path, mount_point, named
):
    # A directory created by root on the host and mounted as it is: the usual mistake.
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir(mode=0o755)
    env = acme_env(pebble, free_port())
    container = Container(product_image, env, [f"{root_owned}:{mount_point}", ca_mount(pebble)])
    containers.append(container)
    container.start()
    status, output = wait_exit(container)
    assert status != 0, output
    lines = message_lines(output)
    assert len(lines) == 1, output
    assert mount_point in lines[0]
    assert named in lines[0]
    assert f"chown -R {IMAGE_UID}:{IMAGE_GID}" in lines[0]
    assert "Traceback" not in output
    assert pebble.orders_created() == 0


def test_certbot_pair_is_served_without_an_order(product_image, pebble, containers, tmp_path):
    """Moving over from certbot + nginx: certs/ already holds a valid pair for the names."""
    registry_port = free_port()
    first_certs = owned_dir(tmp_path / "first" / "certs")
    first = Container(
        product_image,
        acme_env(pebble, registry_port),
        [
            f"{owned_dir(tmp_path / 'first' / 'data')}:/data",
            f"{first_certs}:/certs",
            ca_mount(pebble),
        ],
    )
    containers.append(first)
    first.start()
    issued = served(registry_port, pebble)
    first.stop(GRACE_SECONDS)
    assert pebble.orders_created() == 1

    # As certbot leaves them: two plain files, the chain leaf first, the key private.
    certs = owned_dir(tmp_path / "certbot" / "certs")
    for name, mode in (("domain.crt", 0o644), ("domain.key", 0o600)):
        copied = copy_plain(first_certs / name, certs / name, mode)
        os.chown(copied, IMAGE_UID, IMAGE_GID)
    # A pair this agent did not issue is served only if it chains to the system roots.
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.root_pem())
    env = acme_env(pebble, registry_port, SSL_CERT_FILE="/etc/acme-registry/roots.pem")
    moved = Container(
        product_image,
        env,
        [
            f"{owned_dir(tmp_path / 'certbot' / 'data')}:/data",
            f"{certs}:/certs",
            f"{roots}:/etc/acme-registry/roots.pem:ro",
            ca_mount(pebble),
        ],
    )
    containers.append(moved)
    started = time.monotonic()
    moved.start()
    again = served(registry_port, pebble, timeout=30)
    print(f"existing pair served {time.monotonic() - started:.2f} s after podman run")
    assert fingerprint(again) == fingerprint(issued)
    wait_ready(moved)
    assert pebble.orders_created() == 1
    # Adopted into the managed layout, so renewals replace it atomically.
    assert (certs / "domain.crt").is_symlink()
    assert (certs / "domain.crt").read_bytes() == (first_certs / "domain.crt").read_bytes()
    moved.stop(GRACE_SECONDS)
    assert moved.exit_code() == 0, moved.logs()


def test_ports_80_and_443_as_non_root_with_the_sysctl(product_image, containers):
    """In the container's own network namespace, with the sysctl Docker sets by default.

    podman (4.3) does not set it: without it the agent cannot bind port 80 as uid 10001.
    No network is needed to see the responder bound, so the namespace has only loopback.
    """
    env = {
        "ACME_DOMAINS": NAME,
        # Nothing answers here: the agent stays alive without a certificate.
        "ACME_DIRECTORY": "https://127.0.0.1:9/dir",
        "AUTH_USERS": REGISTRY_CREDS,
    }
    container = Container(product_image, env, network="none")
    container.args += ["--sysctl", "net.ipv4.ip_unprivileged_port_start=0"]
    containers.append(container)
    container.start()
    deadline = time.monotonic() + 30
    while container.exec("acme-registry", "health").returncode != 0:
        assert container.running() and time.monotonic() < deadline, container.logs()
        time.sleep(0.2)
    tables = container.exec("cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
    listening = {
        int(fields[1].rsplit(":", 1)[1], 16)
        for fields in (line.split() for line in tables.splitlines())
        if len(fields) > 3 and fields[3] == "0A"
    }
    assert 80 in listening, container.logs()
    assert container.exec("id", "-u").stdout.strip() == str(IMAGE_UID)


def test_a_registry_that_keeps_failing_ends_the_container_with_status_1(
    product_image, pebble, containers
):
    # What an orchestrator must see when supervisord gives up (FATAL): a failed container.
    env = acme_env(pebble, free_port(), REGISTRY_BINARY="/bin/false")
    container = Container(product_image, env, [ca_mount(pebble)])
    containers.append(container)
    container.start()
    status, output = wait_exit(container, timeout=90)
    assert status == 1, output
    assert "gave up" in output
