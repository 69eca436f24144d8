"""compose/docker-compose.replicas.yml under podman-compose: 3 replicas, haproxy, SeaweedFS.

The stack runs as an operator starts it, on local stand-ins for the haproxy and S3 images
(tests/support/standin_images.py) and with the secrets made by
compose/replicas/make-secrets.sh, moved onto the host network by
tests/e2e/compose.replicas.test.yml (tests/support/replicas_compose.py).
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.common import GRACE_SECONDS, NAME, REGISTRY_CREDS, fingerprint, operator_env, served
from tests.support.clients import Skopeo
from tests.support.oci import layout_manifest_digest
from tests.support.podman import podman, podman_compose, unique_name
from tests.support.replicas_compose import (
    COMPOSE,
    HAPROXY_CFG,
    TEST_OVERRIDE,
    UP_TIMEOUT,
    StackPorts,
    haproxy_config_for_test,
    make_secrets,
    project_logs,
    s3_requests,
)
from tests.support.standin_images import build_haproxy_image, build_s3_image

pytestmark = pytest.mark.e2e


def test_replicas_stack_one_certificate_everywhere(product_image, pebble, oci_image, tmp_path):
    ports = StackPorts.choose(pebble.http_port)
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(haproxy_config_for_test(HAPROXY_CFG.read_text(), ports))
    haproxy_cfg.chmod(0o644)
    project = unique_name("acme-registry-replicas-e2e")
    env = operator_env(
        ACME_REGISTRY_IMAGE=product_image,
        HAPROXY_IMAGE=build_haproxy_image(),
        S3_IMAGE=build_s3_image(),
        E2E_NAME=NAME,
        E2E_ACME_DIRECTORY=pebble.directory_url,
        E2E_ACME_CA_BUNDLE=str(pebble.ca_bundle),
        E2E_AUTH_USERS=REGISTRY_CREDS,
        HAPROXY_CONFIG=str(haproxy_cfg),
        **ports.env(),
        **make_secrets(tmp_path / "secrets"),
    )
    files = [COMPOSE, TEST_OVERRIDE]
    try:
        started = time.monotonic()
        up = podman_compose(project, files, "up", "-d", env=env, timeout=UP_TIMEOUT)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]

        # Through haproxy, then on each replica directly: one certificate.
        leaf = served(ports.https, pebble)
        print(f"\nfirst verified handshake through haproxy {time.monotonic() - started:.1f} s")
        for n, replica in ports.replicas.items():
            assert fingerprint(served(replica.https, pebble)) == fingerprint(leaf), n
        assert pebble.orders_created() == 1, project_logs(project)

        # A push and a pull through haproxy: requests spread over the replicas round-robin
        # (an upload's POST, PATCH and PUT on different ones), the images in the bucket.
        before = s3_requests(ports)
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=REGISTRY_CREDS)
        ref = f"{NAME}:{ports.https}/demo:v1"
        skopeo.push(oci_image, "v1", ref)
        skopeo.pull(ref, tmp_path / "pulled", "v1")
        assert layout_manifest_digest(tmp_path / "pulled", "v1") == layout_manifest_digest(
            oci_image, "v1"
        )
        assert s3_requests(ports) > before
        assert pebble.orders_created() == 1
    except BaseException:
        print(project_logs(project))
        raise
    finally:
        down = podman_compose(project, files, "down", "-v", env=env, timeout=GRACE_SECONDS + 120)
        for volume in podman("volume", "ls", "--format", "{{.Name}}").stdout.split():
            if volume.startswith(f"{project}_"):
                podman("volume", "rm", "-f", volume, check=False)
    assert down.returncode == 0, down.stderr
