"""compose/docker-compose.yml under podman-compose, with only the test override on top."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.common import GRACE_SECONDS, NAME, fingerprint, operator_env, served
from tests.support.clients import Skopeo
from tests.support.oci import layout_manifest_digest
from tests.support.podman import REPO, podman, podman_compose, unique_name
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

COMPOSE = REPO / "compose" / "docker-compose.yml"
STAGING = REPO / "compose" / "docker-compose.staging.yml"
S3 = REPO / "compose" / "docker-compose.s3.yml"
TOKEN = REPO / "compose" / "docker-compose.token.yml"
TEST_OVERRIDE = Path(__file__).with_name("compose.test.yml")
INITIAL_PASSWORD = "/data/auth/initial-admin-password"


def compose_config(files: list[Path], env: dict[str, str]) -> dict[str, Any]:
    result = podman_compose("config-check", files, "config", env=env)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def registry_creds(container: str) -> str | None:
    """The generated admin's credentials, where the image creates one (no users configured)."""
    result = podman("exec", container, "cat", INITIAL_PASSWORD, check=False)
    return f"admin:{result.stdout.strip()}" if result.returncode == 0 else None


def test_compose_up_reaches_a_verified_certificate(product_image, pebble, oci_image, tmp_path):
    project = unique_name("acme-registry-e2e")
    registry_port = free_port()
    env = operator_env(
        ACME_REGISTRY_IMAGE=product_image,
        E2E_ACME_DIRECTORY=pebble.directory_url,
        E2E_ACME_CA_BUNDLE=str(pebble.ca_bundle),
        E2E_HTTP_PORT=str(pebble.http_port),
        E2E_REGISTRY_PORT=str(registry_port),
        E2E_ADMIN_PORT=str(free_port()),
    )
    files = [COMPOSE, TEST_OVERRIDE]
    try:
        up = podman_compose(project, files, "up", "-d", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        names = podman(
            "ps",
            "-a",
            "--filter",
            f"label=io.podman.compose.project={project}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        assert len(names) == 1, names
        container = names[0]

        leaf = served(registry_port, pebble)
        info = json.loads(podman("inspect", container).stdout)[0]
        assert info["HostConfig"]["RestartPolicy"]["Name"] == "always"
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        volumes = {"/data": "data", "/certs": "certs", "/var/lib/registry": "storage"}
        for target, volume in volumes.items():
            assert mounts[target]["Type"] == "volume"
            assert mounts[target]["Name"] == f"{project}_{volume}"

        skopeo = Skopeo(
            tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=registry_creds(container)
        )
        ref = f"{NAME}:{registry_port}/demo:v1"
        skopeo.push(oci_image, "v1", ref)
        skopeo.pull(ref, tmp_path / "pulled", "v1")
        assert layout_manifest_digest(tmp_path / "pulled", "v1") == layout_manifest_digest(
            oci_image, "v1"
        )

        stop = podman_compose(project, files, "stop", env=env, timeout=GRACE_SECONDS + 60)
        assert stop.returncode == 0, stop.stderr
        state = json.loads(podman("inspect", container).stdout)[0]["State"]
        assert state["ExitCode"] == 0, podman("logs", container, check=False).stdout

        # compose up again (what `restart: always` does after a reboot): no new order.
        again = podman_compose(project, files, "up", "-d", env=env)
        assert again.returncode == 0, again.stderr
        assert fingerprint(served(registry_port, pebble)) == fingerprint(leaf)
        assert pebble.orders_created() == 1
    finally:
        down = podman_compose(project, files, "down", "-v", env=env, timeout=GRACE_SECONDS + 60)
        leftovers = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
        for volume in leftovers:
            if volume.startswith(f"{project}_"):
                podman("volume", "rm", "-f", volume, check=False)
    assert down.returncode == 0, down.stderr


def test_compose_variants(tmp_path):
    base = compose_config([COMPOSE], operator_env())["services"]["registry"]
    assert base["ports"] == ["80:80", "443:443"]
    assert base["restart"] == "always"
    assert base["environment"]["ACME_DOMAINS"] == NAME
    assert base["image"] == "acme-registry:latest"
    # podman-compose applies it at `stop`/`down` (podman stop -t); docker compose stores it
    # in the container as its stop timeout.
    assert base["stop_grace_period"] == f"{GRACE_SECONDS}s"

    staging = compose_config([COMPOSE, STAGING], operator_env())["services"]["registry"]
    assert staging["environment"]["ACME_DIRECTORY"] == "letsencrypt-staging"

    s3_env = operator_env(S3_BUCKET="images", S3_REGION="eu-west-1")
    s3 = compose_config([COMPOSE, S3], s3_env)["services"]["registry"]["environment"]
    assert s3["REGISTRY_STORAGE"] == "s3"
    assert s3["REGISTRY_STORAGE_S3_BUCKET"] == "images"
    assert s3["REGISTRY_STORAGE_S3_REGION"] == "eu-west-1"
    # One instance: said explicitly, since images in S3 make several replicas likely.
    assert s3["STATE_STORE"] == "file"

    # Token mode publishes the token service's port beside 80 and 443, and its environment
    # passes the product's own check (the empty optional settings included).
    token = compose_config([COMPOSE, TOKEN], operator_env())["services"]["registry"]
    assert token["ports"] == ["80:80", "443:443", "5001:5001"]
    assert token["environment"]["AUTH_MODE"] == "token"
    check = subprocess.run(
        [sys.executable, "-m", "acme_registry", "check"],
        env={
            **{k: str(v) for k, v in token["environment"].items()},
            "PATH": os.environ["PATH"],
            "CERT_DIR": str(tmp_path / "certs"),
            "DATA_DIR": str(tmp_path / "data"),
            "REGISTRY_BINARY": "/usr/bin/docker-registry",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    public = operator_env(AUTH_ANONYMOUS_PULL="public/*")
    token_env = compose_config([COMPOSE, TOKEN], public)["services"]["registry"]["environment"]
    assert token_env["AUTH_ANONYMOUS_PULL"] == "public/*"

    # The operator's own names are required, with a message saying so.
    missing = podman_compose("config-check", [COMPOSE], "config", env={"ACME_DOMAINS": ""})
    assert missing.returncode != 0
    assert "set ACME_DOMAINS" in missing.stderr
