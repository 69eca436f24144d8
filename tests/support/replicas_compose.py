"""compose/docker-compose.replicas.yml on the host network, for the e2e tests.

The compose file as an operator runs it, plus tests/e2e/compose.replicas.test.yml, which only
moves every container onto the host network (Pebble listens on the host's loopback) with
ports of its own per replica; haproxy then gets a copy of compose/replicas/haproxy.cfg whose
addresses are those ports (:func:`haproxy_config_for_test`), nothing else changed.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.podman import REPO, podman
from tests.support.ports import free_ports

COMPOSE = REPO / "compose" / "docker-compose.replicas.yml"
HAPROXY_CFG = REPO / "compose" / "replicas" / "haproxy.cfg"
MAKE_SECRETS = REPO / "compose" / "replicas" / "make-secrets.sh"
TEST_OVERRIDE = REPO / "tests" / "e2e" / "compose.replicas.test.yml"
REPLICAS = (1, 2, 3)
# The ports the replicas listen on inside their containers, as haproxy.cfg names them.
REPLICA_PORTS = {"http": 8080, "https": 8443, "token": 5001}
ADMIN_PORT = 9180
FRONTEND_PORTS = {"http": 80, "https": 443, "token": 5001}
UP_TIMEOUT = 600


@dataclass(frozen=True)
class ReplicaPorts:
    http: int
    https: int
    token: int
    admin: int


@dataclass(frozen=True)
class StackPorts:
    """Host ports for one run: haproxy's three frontends, each replica's, weed's."""

    http: int
    https: int
    token: int
    replicas: dict[int, ReplicaPorts]
    s3_master: int
    s3_volume: int
    s3_filer: int
    s3: int
    s3_metrics: int

    @classmethod
    def choose(cls, http: int) -> StackPorts:
        # weed also listens on port + 10000 (gRPC) for its master, volume, filer and S3.
        ports = free_ports(2 + 4 * len(REPLICAS) + 5, exclude=(http,), offset=10000)
        it = iter(ports)
        replicas = {n: ReplicaPorts(next(it), next(it), next(it), next(it)) for n in REPLICAS}
        return cls(http, next(it), next(it), replicas, *(next(it) for _ in range(5)))

    def env(self) -> dict[str, str]:
        env = {
            "E2E_S3_MASTER_PORT": str(self.s3_master),
            "E2E_S3_VOLUME_PORT": str(self.s3_volume),
            "E2E_S3_FILER_PORT": str(self.s3_filer),
            "E2E_S3_PORT": str(self.s3),
            "E2E_S3_METRICS_PORT": str(self.s3_metrics),
        }
        for n, replica in self.replicas.items():
            env |= {
                f"E2E_R{n}_HTTP": str(replica.http),
                f"E2E_R{n}_HTTPS": str(replica.https),
                f"E2E_R{n}_TOKEN": str(replica.token),
                f"E2E_R{n}_ADMIN": str(replica.admin),
            }
        return env


_BIND = re.compile(r"^(\s*bind )(\S+)$")
_SERVER = re.compile(r"^(\s*server replica-(\d) )replica-\d:(\d+)$")


def haproxy_config_for_test(text: str, ports: StackPorts) -> str:
    """compose/replicas/haproxy.cfg with host-network addresses; any other line unchanged.

    Each server line keeps its name and gets ``127.0.0.1:<its port>`` and, where its
    backend checks /readyz on the admin port, that replica's admin port.
    """
    frontends = {f":{port}": getattr(ports, name) for name, port in FRONTEND_PORTS.items()}
    by_inner_port = {port: name for name, port in REPLICA_PORTS.items()}
    lines = []
    for line in text.splitlines():
        if bind := _BIND.match(line):
            line = f"{bind.group(1)}127.0.0.1:{frontends[bind.group(2)]}"
        elif server := _SERVER.match(line):
            replica = ports.replicas[int(server.group(2))]
            kind = by_inner_port[int(server.group(3))]
            line = f"{server.group(1)}127.0.0.1:{getattr(replica, kind)}"
            if kind != "http":
                line += f" port {replica.admin}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def make_secrets(directory: Path) -> dict[str, str]:
    """The operator's script, then the variables that point the compose file at its output."""
    subprocess.run([str(MAKE_SECRETS), str(directory)], check=True, capture_output=True)
    return {
        "STATE_ENCRYPTION_KEY_SECRET": str(directory / "state-encryption-key"),
        "S3_CREDENTIALS_SECRET": str(directory / "s3-credentials"),
        "S3_IDENTITIES_SECRET": str(directory / "s3-identities.json"),
    }


def project_logs(project: str) -> str:
    names = podman(
        "ps",
        "-a",
        "--filter",
        f"label=io.podman.compose.project={project}",
        "--format",
        "{{.Names}}",
        check=False,
    ).stdout.split()
    out = []
    for name in names:
        logs = podman("logs", "--tail", "40", name, check=False)
        out.append(f"--- {name}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
    return "\n".join(out)


def s3_requests(ports: StackPorts, bucket: str = "registry") -> int:
    """Requests the S3 server counted on the registry's bucket (its Prometheus metrics)."""
    text = requests.get(f"http://127.0.0.1:{ports.s3_metrics}/metrics", timeout=5).text
    pattern = re.compile(
        r'^SeaweedFS_s3_request_total\{bucket="' + re.escape(bucket) + r'",[^}]*\} (\S+)$', re.M
    )
    return int(sum(float(value) for value in pattern.findall(text)))
