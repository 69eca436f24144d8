"""compose/kubernetes/ under `podman kube play`, on a test copy changed only where it must be.

The copy changes the image (the one just built), the environment that aims the agent at
the local Pebble (directory, CA bundle mounted from the host) and the network: the host's,
since Pebble listens on the host's loopback, with unprivileged ports chosen per test and
no port mappings (podman refuses them on the host network). Everything else (names,
volumes, probes, security context) is what an operator applies.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import yaml

from tests.e2e.common import CA_IN_CONTAINER, fingerprint, served
from tests.support.clients import Skopeo
from tests.support.oci import layout_manifest_digest
from tests.support.pebble import Pebble
from tests.support.podman import IMAGE_GID, IMAGE_UID, REPO, podman
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

MANIFESTS = REPO / "compose" / "kubernetes"
PLAY_TIMEOUT = 300


def manifests(token_mode: bool = False) -> list[dict[str, Any]]:
    """The documents of every file the kustomization lists, in its order; with
    ``token_mode``, after uncommenting the token-mode lines as the comments say."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        text = (MANIFESTS / name).read_text()
        if token_mode:
            text = uncomment_yaml_items(text)
        documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def uncomment_yaml_items(text: str) -> str:
    """Drop the ``#`` of commented-out list items (``#- ...``) and of their continuation
    lines (``#  key: ...`` right after one); prose comments (``# Word``) stay."""
    lines, in_item = [], False
    for line in text.splitlines():
        item = re.match(r"^(\s*)#(- .*)$", line)
        more = re.match(r"^(\s*)#(  \S.*)$", line)
        if item or (in_item and more):
            match = item or more
            assert match is not None
            lines.append(match.group(1) + match.group(2))
            in_item = True
        else:
            lines.append(line)
            in_item = False
    return "\n".join(lines) + "\n"


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def env_value(container: dict[str, Any], name: str) -> str:
    return next(str(e["value"]) for e in container["env"] if e["name"] == name)


def set_env(container: dict[str, Any], name: str, value: str) -> None:
    for entry in container["env"]:
        if entry["name"] == name:
            entry["value"] = value
            return
    container["env"].append({"name": name, "value": value})


def for_test(
    documents: list[dict[str, Any]], image: str, pebble: Pebble, registry_port: int
) -> list[dict[str, Any]]:
    (deployment,) = of_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["image"] = image
    pod["hostNetwork"] = True
    container.pop("ports", None)
    set_env(container, "ACME_HTTP_PORT", str(pebble.http_port))
    set_env(container, "REGISTRY_HTTP_ADDR", f"127.0.0.1:{registry_port}")
    set_env(container, "ADMIN_ADDR", f"127.0.0.1:{free_port()}")
    set_env(container, "ACME_DIRECTORY", pebble.directory_url)
    set_env(container, "ACME_CA_BUNDLE", CA_IN_CONTAINER)
    container["volumeMounts"].append(
        {"name": "acme-ca", "mountPath": CA_IN_CONTAINER, "readOnly": True}
    )
    pod["volumes"].append(
        {"name": "acme-ca", "hostPath": {"path": str(pebble.ca_bundle), "type": "File"}}
    )
    return documents


def remove_claims(documents: list[dict[str, Any]]) -> None:
    # podman kube play turns each claim into a named volume of the same name.
    for claim in of_kind(documents, "PersistentVolumeClaim"):
        podman("volume", "rm", "-f", claim["metadata"]["name"], check=False)


def wait_probe(container: str, command: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = podman("exec", container, *command, check=False)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{command} still failing: {probe.stdout}{probe.stderr}")
        time.sleep(0.2)


def test_manifests_as_an_operator_applies_them():
    documents = manifests()
    (deployment,) = of_kind(documents, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["fsGroup"] == IMAGE_GID
    (container,) = pod["containers"]
    assert container["livenessProbe"]["exec"]["command"] == ["acme-registry", "health"]
    assert container["readinessProbe"]["exec"]["command"] == [
        "acme-registry",
        "health",
        "--ready",
    ]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    declared = {c["metadata"]["name"] for c in of_kind(documents, "PersistentVolumeClaim")}
    for path in ("/data", "/certs", "/var/lib/registry"):
        assert claims[mounts[path]] in declared
    (service,) = of_kind(documents, "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {80, 443}
    # Challenges arrive before the pod is ready, so they must reach it anyway.
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_kube_play_reaches_a_verified_certificate(product_image, pebble, oci_image, tmp_path):
    registry_port = free_port()
    documents = for_test(manifests(), product_image, pebble, registry_port)
    (deployment,) = of_kind(documents, "Deployment")
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    name = env_value(spec, "ACME_DOMAINS").split(",")[0]
    data_dir = env_value(spec, "DATA_DIR")
    play = tmp_path / "kube-play.yaml"
    play.write_text(yaml.safe_dump_all(documents))
    # A pod "<deployment>-pod-0" whose container is "<pod>-<container name>".
    container = f"{deployment['metadata']['name']}-pod-0-{spec['name']}"

    remove_claims(documents)
    try:
        podman("kube", "play", str(play), timeout=PLAY_TIMEOUT)
        leaf = served(registry_port, pebble, name=name)
        wait_probe(container, spec["livenessProbe"]["exec"]["command"])
        wait_probe(container, spec["readinessProbe"]["exec"]["command"])

        info = json.loads(podman("inspect", container).stdout)[0]
        assert info["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_GID}"
        assert info["HostConfig"]["ReadonlyRootfs"] is True

        # The generated admin, where the image creates one (no users in the manifests).
        password = podman(
            "exec", container, "cat", f"{data_dir}/auth/initial-admin-password", check=False
        )
        creds = f"admin:{password.stdout.strip()}" if password.returncode == 0 else None
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [name], creds=creds)
        ref = f"{name}:{registry_port}/demo:v1"
        skopeo.push(oci_image, "v1", ref)
        skopeo.pull(ref, tmp_path / "pulled", "v1")
        assert layout_manifest_digest(tmp_path / "pulled", "v1") == layout_manifest_digest(
            oci_image, "v1"
        )
        assert fingerprint(leaf) == fingerprint(served(registry_port, pebble, name=name))
        assert pebble.orders_created() == 1
    finally:
        down = podman("kube", "down", str(play), check=False, timeout=PLAY_TIMEOUT)
        remove_claims(documents)
    assert down.returncode == 0, down.stderr


def test_kube_play_copy_differs_only_where_allowed(pebble):
    original = manifests()
    changed = for_test(manifests(), "localhost/some/image:tag", pebble, free_port())
    for before, after in zip(original, changed, strict=True):
        if before["kind"] != "Deployment":
            assert before == after
    (before,) = of_kind(original, "Deployment")
    (after,) = of_kind(changed, "Deployment")
    pod_before, pod_after = before["spec"]["template"]["spec"], after["spec"]["template"]["spec"]
    allowed_pod = {"hostNetwork", "volumes", "containers"}
    for key in set(pod_before) | set(pod_after):
        if key not in allowed_pod:
            assert pod_before.get(key) == pod_after.get(key), key
    (c_before,), (c_after,) = pod_before["containers"], pod_after["containers"]
    allowed_container = {"image", "env", "ports", "volumeMounts"}
    for key in set(c_before) | set(c_after):
        if key not in allowed_container:
            assert c_before.get(key) == c_after.get(key), key
    env_before = {e["name"]: e["value"] for e in c_before["env"]}
    env_after = {e["name"]: e["value"] for e in c_after["env"]}
    names = env_before.keys() | env_after.keys()
    changed_env = {k for k in names if env_before.get(k) != env_after.get(k)}
    assert changed_env <= {
        "ACME_HTTP_PORT",
        "REGISTRY_HTTP_ADDR",
        "ADMIN_ADDR",
        "ACME_DIRECTORY",
        "ACME_CA_BUNDLE",
    }


def test_token_mode_lines_publish_the_token_port():
    """Uncommented as their comments say, the token-mode lines set AUTH_MODE=token, give the
    container a port named ``token`` (5001, TOKEN_ADDR's default) and publish it on the
    Service as 5001, the port the default TOKEN_REALM names; nothing else changes."""
    plain, token = manifests(), manifests(token_mode=True)
    (container,) = of_kind(token, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert env_value(container, "AUTH_MODE") == "token"
    assert {"name": "token", "containerPort": 5001} in container["ports"]
    (service,) = of_kind(token, "Service")
    assert {"name": "token", "port": 5001, "targetPort": "token"} in service["spec"]["ports"]
    (plain_container,) = of_kind(plain, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert all(e["name"] != "AUTH_MODE" for e in plain_container["env"])
    assert len(container["env"]) == len(plain_container["env"]) + 1
    assert len(service["spec"]["ports"]) == len(of_kind(plain, "Service")[0]["spec"]["ports"]) + 1
    assert of_kind(token, "PersistentVolumeClaim") == of_kind(plain, "PersistentVolumeClaim")
