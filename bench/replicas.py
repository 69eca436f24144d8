"""Several replicas on one S3 store behind haproxy (issue 12): what sharing costs and gives.

Host-level processes, as in tests/integration/test_replicas.py: SeaweedFS (``weed server
-s3``, the images and the state in one bucket), Pebble 2.10 validating through haproxy's
port 80, haproxy in TCP mode round-robin over three ``acme-registry run`` replicas
(tests/support/replicas.py). Measured:

- the agent's memory (every process of ``acme-registry run`` but the registry) with
  ``STATE_STORE=file`` and ``STATE_STORE=s3`` side by side, one instance each, idle;
- orders placed when three replicas start at once on an empty bucket (``--cold-starts``
  rounds, each on a bucket of its own);
- per renewal (``acme-registry renew`` on one replica, in turn): seconds from the commit
  (the shared certificate record changing, watched with HEAD every 20 ms) to the last
  replica serving the new certificate, read on each replica's own port;
- requests through haproxy during those renewals (manifest GETs, new and kept-alive
  connections) and how many failed;
- S3 requests per minute at idle with three replicas (the polling cost), counted by the
  S3 server itself (SeaweedFS's ``SeaweedFS_s3_request_total`` for the bucket).

Run alone with ``python -m bench --only replicas``.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import requests

from acme_registry import statekeys
from bench import loadrun, procstat
from bench.report import mib
from tests.support.agent import CREDS, NAME, PASSWORD, USER, AgentProcess, fingerprint
from tests.support.clients import Skopeo, tls_probe
from tests.support.load import image_digests
from tests.support.oci import make_oci_image
from tests.support.pebble import PEBBLE_PROFILES, Pebble, pebble_sid_binary
from tests.support.ports import free_port, free_ports
from tests.support.replicas import Cluster
from tests.support.seaweed import SeaweedS3

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
REPLICAS = 3
READY_TIMEOUT = 180.0
FOLLOW_TIMEOUT = 60.0
SETTLE_SECONDS = 3.0
# The replicas' record poll in this benchmark: the documented default.
POLL_INTERVAL = "5"

Log = Callable[[str], None]


class MeteredSeaweed(SeaweedS3):
    """SeaweedS3 with its Prometheus endpoint on, to count the requests it served."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        (self.metrics_port,) = free_ports(1, exclude=tuple(self.ports.values()))

    def _command(self) -> list[str]:
        return [*super()._command(), f"-metricsPort={self.metrics_port}"]

    def requests_served(self, bucket: str) -> int:
        """S3 requests on ``bucket`` so far, every type and status."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        pattern = re.compile(
            r'^SeaweedFS_s3_request_total\{bucket="' + re.escape(bucket) + r'",[^}]*\} (\S+)$',
            re.MULTILINE,
        )
        return int(sum(float(value) for value in pattern.findall(text)))


class RecordWatcher:
    """Notes when the shared certificate record changes: HEAD on it every 20 ms.

    The record is the commit, so this is when a renewal was committed, to within the
    interval (the S3 server's Last-Modified has only one-second resolution).
    """

    INTERVAL = 0.02

    def __init__(self, seaweed: SeaweedS3, bucket: str) -> None:
        self._client = seaweed.client()
        self._bucket = bucket
        self._key = f"acme-registry/{statekeys.CERTIFICATE}"
        self._etag = self._head()
        self.changed_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _head(self) -> str | None:
        try:
            return str(self._client.head_object(Bucket=self._bucket, Key=self._key)["ETag"])
        except Exception:  # absent, or the server busy for a moment: no change seen
            return None

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            etag = self._head()
            if etag is not None and etag != self._etag:
                self.changed_at = time.monotonic()
                return

    def __enter__(self) -> RecordWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def agent_memory(agent: AgentProcess) -> procstat.Memory:
    """Every process of the run but the registry's (supervisord and the agent are one)."""
    assert agent.proc is not None
    pids = procstat.tree(agent.proc.pid)
    return procstat.memory_sum(p for p in pids if procstat.exe_name(p) != REGISTRY_BINARY.name)


def _instance(
    workdir: Path, pebble: Pebble, seaweed: MeteredSeaweed, key_file: Path, mode: str
) -> AgentProcess:
    extra: dict[str, str] = {"ACME_PROFILE": "default", "STATE_STORE": mode}
    if mode == "s3":
        extra |= {
            "STATE_ENCRYPTION_KEY_FILE": str(key_file),
            "REGISTRY_STORAGE": "s3",
            "REGISTRY_STORAGE_S3_REGIONENDPOINT": seaweed.endpoint,
            "REGISTRY_STORAGE_S3_BUCKET": seaweed.new_bucket("memory"),
            "REGISTRY_STORAGE_S3_REGION": "us-east-1",
            "REGISTRY_STORAGE_S3_ACCESSKEY": seaweed.access_key,
            "REGISTRY_STORAGE_S3_SECRETKEY": seaweed.secret_key,
            "REGISTRY_STORAGE_REDIRECT_DISABLE": "true",
        }
    env = AgentProcess.environment(
        workdir,
        domains=NAME,
        directory=pebble.directory_url,
        ca_bundle=pebble.ca_bundle,
        # No haproxy runs yet: this instance answers Pebble's validations itself.
        http_port=pebble.http_port,
        registry_binary=REGISTRY_BINARY,
        **extra,
    )
    if mode == "s3":
        env.pop("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
    return AgentProcess(workdir, env)


def memory_by_mode(
    workdir: Path, pebble: Pebble, seaweed: MeteredSeaweed, key_file: Path, log: Log
) -> dict[str, Any]:
    """One instance per mode, started, ready, idle for a moment: its agent's memory."""
    found: dict[str, Any] = {}
    for mode in ("file", "s3"):
        agent = _instance(workdir / f"memory-{mode}", pebble, seaweed, key_file, mode)
        try:
            agent.start()
            agent.wait_ready(READY_TIMEOUT)
            time.sleep(SETTLE_SECONDS)
            found[mode] = asdict(agent_memory(agent))
        finally:
            agent.stop()
        log(f"replicas: agent memory with STATE_STORE={mode}: RSS {mib(found[mode]['rss'])} MiB")
    return found


def cold_start(cluster: Cluster, pebble: Pebble) -> dict[str, Any]:
    before = pebble.orders_created()
    started = time.monotonic()
    cluster.start()
    cluster.wait_ready(READY_TIMEOUT)
    ready = time.monotonic() - started
    serials = {cluster.served(r).serial_number for r in cluster.replicas}
    return {
        "orders": pebble.orders_created() - before,
        "commits": cluster.commits(),
        "serials": len(serials),
        "ready_seconds": ready,
    }


def _serving(cluster: Cluster, replica: AgentProcess, root: bytes) -> str | None:
    cert = tls_probe("127.0.0.1", replica.registry_port, NAME, root)
    return fingerprint(cert) if cert is not None else None


def follow_times(cluster: Cluster, wanted: str, since: float) -> list[float]:
    """Seconds from ``since`` until each replica served ``wanted`` (polled every 50 ms)."""
    root = cluster.pebble.root_pem()
    pending = dict(enumerate(cluster.replicas))
    times: dict[int, float] = {}
    deadline = time.monotonic() + FOLLOW_TIMEOUT
    while pending:
        for index, replica in list(pending.items()):
            if _serving(cluster, replica, root) == wanted:
                times[index] = time.monotonic() - since
                del pending[index]
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas {sorted(pending)} never served the renewal")
        time.sleep(0.05)
    return [times[i] for i in sorted(times)]


def renewals_under_load(
    cluster: Cluster, image: Path, workdir: Path, count: int, log: Log
) -> dict[str, Any]:
    """``count`` renewals, each through another replica, under manifest GETs via haproxy."""
    root = cluster.pebble.root_pem()
    skopeo = Skopeo(workdir / "skopeo", root, [NAME], creds=CREDS)
    repo, tag = "bench/replicas", "v1"
    skopeo.push(image, tag, f"{NAME}:{cluster.https_port}/{repo}:{tag}")
    manifest_digest, layers = image_digests(image, tag)
    target = loadrun.LoadTarget(cluster.https_port, root, repo, tag, manifest_digest, layers[0])
    renewals: list[dict[str, Any]] = []
    load = loadrun.LoadProcess(
        NAME,
        target.port,
        target.root_pem,
        target.repo,
        target.tag,
        creds=(USER, PASSWORD),
        manifest_digest=target.manifest_digest,
        blob_digest=target.blob_digest,
        # One worker per mode: every request costs each replica a bcrypt check (AUTH_USERS).
        connect_workers=1,
        pause=0.02,
        max_duration=count * (FOLLOW_TIMEOUT + 200) + 60,
    )
    try:
        time.sleep(3.0)
        for n in range(count):
            replica = cluster.replicas[n % len(cluster.replicas)]
            with RecordWatcher(cluster.seaweed, cluster.bucket) as record:
                result = replica.cli("renew", timeout=180)
                returned = time.monotonic()
                if result.returncode != 0:
                    raise RuntimeError(f"renew failed: {result.stdout}{result.stderr}")
                wanted = fingerprint(cluster.served(replica))
                times = follow_times(cluster, wanted, returned)
            if record.changed_at is None:
                raise RuntimeError("the certificate record did not change during a renewal")
            # From the commit: what the renewing replica spent rotating its own registry
            # after committing, plus each replica's wait after `renew` returned.
            since_commit = [t + (returned - record.changed_at) for t in times]
            renewals.append(
                {
                    "through": n % len(cluster.replicas) + 1,
                    "follow_seconds": since_commit,
                    "after_renew_returned": times,
                }
            )
            log(
                f"replicas: renewal {n + 1}: last replica serving {max(since_commit):.2f} s "
                "after the commit"
            )
            time.sleep(2.0)
    finally:
        report = load.stop()
    return {
        "renewals": renewals,
        "requests": report.requests,
        "failed": report.failed,
        "refused": report.refused_connects,
        "unanswered": report.unanswered,
        "failures": report.failures[:5],
    }


def idle_requests(cluster: Cluster, seaweed: MeteredSeaweed, seconds: float) -> dict[str, Any]:
    time.sleep(SETTLE_SECONDS)
    before = seaweed.requests_served(cluster.bucket)
    time.sleep(seconds)
    counted = seaweed.requests_served(cluster.bucket) - before
    return {
        "seconds": seconds,
        "requests": counted,
        "per_minute": counted * 60 / seconds,
        "replicas": len(cluster.replicas),
    }


def run(
    workdir: Path, log: Log, *, cold_starts: int = 2, renewals: int = 3, idle_seconds: float = 60
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    front = free_port()
    key_file = workdir / "state-encryption-key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    image = workdir / "image"
    make_oci_image(image, tag="v1", size=64 * 1024)
    pebble = Pebble(
        workdir / "pebble",
        front,
        binary=pebble_sid_binary(install=True),
        config_overrides={"profiles": PEBBLE_PROFILES},
        # Every order validates again, so each one goes through haproxy's port 80. Pebble's
        # validation sleep (0-4 s) stays on, as in tests/integration/test_replicas.py.
        env={"PEBBLE_AUTHZREUSE": "0"},
    )
    results: dict[str, Any] = {"replicas": REPLICAS, "poll_interval": float(POLL_INTERVAL)}
    with pebble, MeteredSeaweed(workdir / "s3") as seaweed:
        results["memory"] = memory_by_mode(workdir, pebble, seaweed, key_file, log)
        results["cold_starts"] = []
        for round_ in range(cold_starts):
            cluster = Cluster(
                workdir / f"cluster-{round_}",
                seaweed,
                seaweed.new_bucket("replicas"),
                pebble,
                REGISTRY_BINARY,
                key_file,
                front,
                count=REPLICAS,
            )
            # The documented defaults, not the integration tests' fast ones.
            for replica in cluster.replicas:
                replica.env["STATE_POLL_INTERVAL"] = POLL_INTERVAL
                replica.env.pop("STATE_LOCK_LEASE", None)
            try:
                start = cold_start(cluster, pebble)
                results["cold_starts"].append(start)
                log(f"replicas: cold start {round_ + 1}: {start['orders']} order(s)")
                results["replica_memory"] = [asdict(agent_memory(r)) for r in cluster.replicas]
                if round_ == cold_starts - 1:
                    results["idle"] = idle_requests(cluster, seaweed, idle_seconds)
                    log(f"replicas: {results['idle']['per_minute']:.1f} S3 requests/min idle")
                    results["renewal"] = renewals_under_load(
                        cluster, image, workdir / f"load-{round_}", renewals, log
                    )
            finally:
                cluster.stop()
    return results
