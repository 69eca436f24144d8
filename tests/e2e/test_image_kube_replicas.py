"""compose/kubernetes/replicas/ read by a real consumer: `podman kube play --start=false`.

kubectl and kustomize are not installed here; podman's kube play is the one program that
takes these manifests. Two things in podman 4.3 need a test copy: it panics on a `secret`
volume in a Deployment (a nil secrets manager in VolumeFromSecret), so the Secret the
kustomization generates becomes a hostPath directory of the same files; and its emptyDir
volumes are named volumes shared by every pod, so the pods are created, not started (each
replica needs a cache of its own). What is checked: the Deployment becomes three pods whose
containers carry the manifests' user, read-only root, environment and secret files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.podman import IMAGE_GID, IMAGE_UID, REPO, podman

pytestmark = pytest.mark.e2e

KUBE = REPO / "compose" / "kubernetes" / "replicas"
MAKE_SECRETS = REPO / "compose" / "replicas" / "make-secrets.sh"
PLAY_TIMEOUT = 300


def play_copy(image: str, secrets_dir: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            pod["containers"][0]["image"] = image
            for volume in pod["volumes"]:
                if "secret" in volume:
                    del volume["secret"]
                    volume["hostPath"] = {"path": str(secrets_dir), "type": "Directory"}
    return docs


def test_kube_play_makes_three_replicas_from_the_manifests(product_image, tmp_path):
    secrets_dir = tmp_path / "secrets"
    subprocess.run([str(MAKE_SECRETS), str(secrets_dir)], check=True, capture_output=True)
    docs = play_copy(product_image, secrets_dir)
    play = tmp_path / "kube-play.yaml"
    play.write_text(yaml.safe_dump_all(docs))
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    name = deployment["metadata"]["name"]
    expected = {e["name"]: str(e["value"]) for e in spec["env"]}
    try:
        podman("kube", "play", "--start=false", str(play), timeout=PLAY_TIMEOUT)
        pods = podman("pod", "ps", "--format", "{{.Name}}").stdout.split()
        replicas = [f"{name}-pod-{n}" for n in range(deployment["spec"]["replicas"])]
        assert set(replicas) <= set(pods), pods
        for pod in replicas:
            info = json.loads(podman("inspect", f"{pod}-{spec['name']}").stdout)[0]
            assert info["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_GID}"
            assert info["HostConfig"]["ReadonlyRootfs"] is True
            env = dict(entry.split("=", 1) for entry in info["Config"]["Env"])
            for key in ("STATE_STORE", "STATE_ENCRYPTION_KEY_FILE", "REGISTRY_STORAGE"):
                assert env[key] == expected[key]
            mounts = {m["Destination"]: m for m in info["Mounts"]}
            key_file = Path(expected["STATE_ENCRYPTION_KEY_FILE"])
            assert mounts[str(key_file.parent)]["Source"] == str(secrets_dir)
            assert (secrets_dir / key_file.name).is_file()
    finally:
        down = podman("kube", "down", str(play), check=False, timeout=PLAY_TIMEOUT)
    assert down.returncode == 0, down.stderr
