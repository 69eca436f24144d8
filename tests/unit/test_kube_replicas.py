"""compose/kubernetes/replicas/: the manifests parse and say what the README promises.

kubectl is not installed here, so kustomize's own output is not built; each file is loaded
with PyYAML and the kustomization's references are followed by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

KUBE = Path(__file__).resolve().parents[2] / "compose" / "kubernetes" / "replicas"
IMAGE_UID = 10001


def documents(directory: Path, names: list[str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in names:
        found += [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
    return found


def kustomization(directory: Path = KUBE) -> dict[str, Any]:
    return dict(yaml.safe_load((directory / "kustomization.yaml").read_text()))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def the_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container["env"]}


def main_documents() -> list[dict[str, Any]]:
    return documents(KUBE, kustomization()["resources"])


def test_every_file_parses_and_every_reference_exists():
    for path in sorted(KUBE.rglob("*.yaml")):
        assert [d for d in yaml.safe_load_all(path.read_text()) if d], path
    for resource in kustomization()["resources"]:
        assert (KUBE / resource).is_file(), resource
    redis = kustomization(KUBE / "redis")
    assert redis["kind"] == "Component"
    for name in [*redis["resources"], *(p["path"] for p in redis["patches"])]:
        assert (KUBE / "redis" / name).is_file(), name


def test_three_replicas_rolling_with_a_disruption_budget():
    docs = main_documents()
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    # A pod leaves only once its successor is ready.
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 2
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["fsGroup"] == IMAGE_UID
    # No PersistentVolumeClaim: the state is in the bucket, the pod's volumes a cache.
    assert not of_kind(docs, "PersistentVolumeClaim")
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])


def test_state_and_images_in_s3_with_secrets_from_files():
    docs = main_documents()
    container = the_container(docs)
    values = env(container)
    assert values["STATE_STORE"] == "s3"
    assert values["REGISTRY_STORAGE"] == "s3"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (deployment,) = of_kind(docs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secret_volume = next(name for name, v in volumes.items() if "secret" in v)
    secret_dir = mounts[secret_volume]
    secret = volumes[secret_volume]["secret"]
    # Group-readable for fsGroup 10001, nobody else.
    assert secret["defaultMode"] == 0o440
    (generated,) = kustomization()["secretGenerator"]
    assert generated["name"] == secret["secretName"]
    keys = {entry.split("=", 1)[0] for entry in generated["files"]}
    assert keys == {"state-encryption-key", "s3-credentials"}
    assert values["STATE_ENCRYPTION_KEY_FILE"] == f"{secret_dir}/state-encryption-key"
    assert values["AWS_SHARED_CREDENTIALS_FILE"] == f"{secret_dir}/s3-credentials"
    # No key or password in the environment itself.
    assert not [name for name in values if "SECRETKEY" in name or "ACCESSKEY" in name]


def test_port_80_reaches_every_pod_443_and_5001_only_ready_ones():
    docs = main_documents()
    container = the_container(docs)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    values = env(container)
    assert named["http"] == int(values["ACME_HTTP_PORT"])
    assert f":{named['https']}" == values["REGISTRY_HTTP_ADDR"]
    assert f":{named['admin']}" == values["ADMIN_ADDR"]
    assert named["token"] == 5001
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["exec"]["command"] == ["acme-registry", "health"]
    services = {s["metadata"]["name"]: s["spec"] for s in of_kind(docs, "Service")}
    assert len(services) == 2
    by_ports = {frozenset(p["port"] for p in spec["ports"]): spec for spec in services.values()}
    assert set(by_ports) == {frozenset({80}), frozenset({443, 5001})}
    assert by_ports[frozenset({80})]["publishNotReadyAddresses"] is True
    assert by_ports[frozenset({443, 5001})]["publishNotReadyAddresses"] is False
    for spec in services.values():
        for port in spec["ports"]:
            assert port["targetPort"] in named


def test_redis_component_is_an_lru_cache_for_the_registry():
    component = kustomization(KUBE / "redis")
    docs = documents(KUBE / "redis", component["resources"])
    (deployment,) = of_kind(docs, "Deployment")
    (redis,) = deployment["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    (service,) = of_kind(docs, "Service")
    (patch,) = documents(KUBE / "redis", [p["path"] for p in component["patches"]])
    (target,) = of_kind(main_documents(), "Deployment")
    assert patch["metadata"]["name"] == target["metadata"]["name"]
    values = env(patch["spec"]["template"]["spec"]["containers"][0])
    assert values["REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR"] == "redis"
    assert service["metadata"]["name"] in values["REGISTRY_REDIS_ADDRS"]
    # Optional: named in the kustomization only as a comment.
    assert "components" not in kustomization()
    assert "#   - redis" in (KUBE / "kustomization.yaml").read_text()
