"""Token mode in the image, with the real Docker engine and its CLI: `docker login` at the
token service, a push-and-pull user, a pull-only user denied a push, anonymous pull of a
public repository, and a certificate renewal while logged in. On the host network, as
test_image_docker.py explains."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.common import (
    CA_IN_CONTAINER,
    NAME,
    acme_env,
    fingerprint,
    one_file_tarball,
    served,
)
from tests.support.clients import wait_for_tls
from tests.support.docker import DockerEngine
from tests.support.pebble import Pebble
from tests.support.ports import free_ports

pytestmark = pytest.mark.e2e

CONTAINER = "registry-token"
POLICY_IN_CONTAINER = "/run/policy.yml"
POLICY = """\
users:
  ci:
    push: ["team/*", "public/*"]
  node:
    pull: ["team/*"]
"""
PASSWORDS = {"ci": "ci-Pa55word-long", "node": "node-Pa55word-long"}


@pytest.fixture
def token_cleanup(docker_engine: DockerEngine) -> Iterator[None]:
    yield
    docker_engine.docker("rm", "-f", "-v", CONTAINER, check=False, timeout=90)


def test_token_mode_with_docker_login(
    docker_engine: DockerEngine,
    docker_image: str,
    pebble: Pebble,
    token_cleanup: None,
    tmp_path: Path,
) -> None:
    docker = docker_engine.docker
    registry_port, token_port = free_ports(2, exclude=(pebble.http_port,))
    registry = f"{NAME}:{registry_port}"
    docker_engine.trust(registry, pebble.root_pem())
    docker_engine.trust(f"{NAME}:{token_port}", pebble.root_pem())
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    env = acme_env(
        pebble,
        registry_port,
        AUTH_MODE="token",
        AUTH_USERS=",".join(f"{u}:{p}" for u, p in PASSWORDS.items()),
        AUTH_POLICY_FILE=POLICY_IN_CONTAINER,
        AUTH_ANONYMOUS_PULL="public/*",
        TOKEN_ADDR=f"127.0.0.1:{token_port}",
    )
    args = ["run", "-d", "--name", CONTAINER, "--network", "host"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    args += ["-v", f"{pebble.ca_bundle}:{CA_IN_CONTAINER}:ro"]
    args += ["-v", f"{policy}:{POLICY_IN_CONTAINER}:ro"]
    docker(*args, docker_image)
    served(registry_port, pebble)
    served(token_port, pebble)  # the token service, on the registry's certificate

    team, public = f"{registry}/team/app:v1", f"{registry}/public/app:v1"
    docker("import", str(one_file_tarball(tmp_path / "rootfs.tar", os.urandom(4096))), team)
    docker("tag", team, public)

    def login(user: str) -> None:
        answer = docker("login", registry, "-u", user, "--password-stdin", input=PASSWORDS[user])
        assert "Login Succeeded" in answer.stdout, answer.stdout + answer.stderr

    wrong = docker("login", registry, "-u", "ci", "--password-stdin", input="wrong", check=False)
    assert wrong.returncode != 0
    login("ci")
    docker("push", team)
    docker("push", public)

    # A renewal while logged in: docker keeps the token service's refresh token, the token
    # service and the registry move onto the new certificate, and docker goes on without a
    # new login (its next token comes from the refresh token, over the new certificate).
    stored = json.loads((docker_engine.client_config / "config.json").read_text())
    assert stored["auths"][registry].get("identitytoken"), "docker stored no refresh token"
    before = fingerprint(served(token_port, pebble))
    renewed = docker("exec", CONTAINER, "acme-registry", "renew", timeout=180)
    assert renewed.returncode == 0, renewed.stderr
    accept = lambda cert: fingerprint(cert) != before  # noqa: E731
    new_token_leaf = wait_for_tls(
        "127.0.0.1", token_port, NAME, pebble.root_pem(), 60, accept=accept
    )
    new_registry_leaf = wait_for_tls(
        "127.0.0.1", registry_port, NAME, pebble.root_pem(), 60, accept=accept
    )
    assert fingerprint(new_token_leaf) == fingerprint(new_registry_leaf)
    after_renewal = f"{registry}/team/app:after-renewal"
    docker("tag", team, after_renewal)
    docker("push", after_renewal)
    docker("image", "rm", "--force", after_renewal)
    docker("pull", after_renewal)

    login("node")
    docker("image", "rm", "--force", team)
    docker("pull", team)
    denied = docker("push", team, check=False)
    assert denied.returncode != 0 and "denied" in denied.stderr.lower(), denied.stderr

    docker("logout", registry)
    docker("image", "rm", "--force", public, team)
    docker("pull", public)  # anonymous, on the public pattern
    refused = docker("pull", team, check=False)
    assert refused.returncode != 0, refused.stdout

    logs = docker("logs", CONTAINER)
    for password in PASSWORDS.values():
        assert password not in logs.stdout + logs.stderr
    assert "Traceback" not in logs.stdout + logs.stderr
