"""compose/docker-compose.replicas.yml as an operator applies it (podman-compose config).

The stack itself, run under podman-compose, is tests/e2e/test_image_replicas_stack.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.e2e.common import operator_env
from tests.support.podman import podman_compose
from tests.support.ports import free_ports
from tests.support.replicas_compose import (
    ADMIN_PORT,
    COMPOSE,
    HAPROXY_CFG,
    REPLICA_PORTS,
    REPLICAS,
    StackPorts,
    haproxy_config_for_test,
    make_secrets,
)

pytestmark = pytest.mark.e2e


def test_haproxy_test_copy_changes_only_addresses():
    ports = StackPorts.choose(free_ports(1)[0])
    original = HAPROXY_CFG.read_text().splitlines()
    changed = haproxy_config_for_test(HAPROXY_CFG.read_text(), ports).splitlines()
    assert len(original) == len(changed)
    differing = [(a, b) for a, b in zip(original, changed, strict=True) if a != b]
    # 3 binds and 3 servers in each of the 3 backends, nothing else.
    assert len(differing) == 3 + 3 * 3
    for before, after in differing:
        assert before.split()[0] == after.split()[0] in {"bind", "server"}
        assert "127.0.0.1:" in after


def test_replicas_compose_as_an_operator_applies_it(tmp_path):
    env = operator_env(**make_secrets(tmp_path / "secrets"))
    result = podman_compose("config-check", [COMPOSE], "config", env=env)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"replica-1", "replica-2", "replica-3", "haproxy", "s3", "s3-bucket"}
    replica_envs = [services[f"replica-{n}"]["environment"] for n in REPLICAS]
    assert replica_envs[0] == replica_envs[1] == replica_envs[2]
    replica = replica_envs[0]
    assert replica["STATE_STORE"] == "s3"
    assert replica["REGISTRY_STORAGE"] == "s3"
    assert replica["STATE_ENCRYPTION_KEY_FILE"] == "/run/secrets/state_encryption_key"
    assert replica["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/s3_credentials"
    # No credential or key in the environment: they come from the secrets.
    assert not {k for k in replica if "SECRET" in k or "ACCESSKEY" in k or k.startswith("AWS_")} - {
        "AWS_SHARED_CREDENTIALS_FILE"
    }
    # Only haproxy is published; the replicas' ports are haproxy.cfg's servers.
    assert services["haproxy"]["ports"] == ["80:80", "443:443", "5001:5001"]
    assert all("ports" not in services[f"replica-{n}"] for n in REPLICAS)
    cfg = HAPROXY_CFG.read_text()
    for n in REPLICAS:
        for port in REPLICA_PORTS.values():
            assert f"server replica-{n} replica-{n}:{port}" in cfg
    assert replica["ACME_HTTP_PORT"] == str(REPLICA_PORTS["http"])
    assert replica["REGISTRY_HTTP_ADDR"] == f":{REPLICA_PORTS['https']}"
    assert replica["ADMIN_ADDR"] == f":{ADMIN_PORT}"
    assert f"check port {ADMIN_PORT}" in cfg
    # Images overridable, defaulting to upstream names with no registry host.
    assert services["haproxy"]["image"] == "haproxy:3.2"
    assert services["s3"]["image"] == services["s3-bucket"]["image"] == "chrislusf/seaweedfs:4.48"
    overridden = podman_compose(
        "config-check",
        [COMPOSE],
        "config",
        env={**env, "HAPROXY_IMAGE": "localhost/h:1", "S3_IMAGE": "localhost/s:1"},
    )
    services = yaml.safe_load(overridden.stdout)["services"]
    assert services["haproxy"]["image"] == "localhost/h:1"
    assert services["s3"]["image"] == "localhost/s:1"
    # The secrets are files, as make-secrets.sh wrote them: the key is 64 hex characters.
    key = Path(env["STATE_ENCRYPTION_KEY_SECRET"]).read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", key)
