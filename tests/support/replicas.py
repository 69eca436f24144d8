"""Several `acme-registry run` replicas sharing one S3 state store, behind haproxy.

Each replica is a host-level :class:`~tests.support.agent.AgentProcess` with its own
DATA_DIR, CERT_DIR and ports; the images and the state live in one SeaweedFS bucket
(``REGISTRY_STORAGE=s3`` and ``STATE_STORE=s3``, the state under ``acme-registry/``).
haproxy publishes the replicas' port 80 (Pebble's ``httpPort`` points at it) and 443; with
``token=True`` (``AUTH_MODE=token``) also each replica's token service, at the port the
replicas' ``TOKEN_REALM`` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from acme_registry import sharedcert, statekeys
from acme_registry.certstore import CertificatePair
from acme_registry.storage import Storage
from tests.support.agent import NAME, AgentProcess, fingerprint
from tests.support.clients import tls_probe, wait_for_tls
from tests.support.haproxy import HAProxy
from tests.support.lifecycle import StartStop
from tests.support.pebble import Pebble
from tests.support.ports import free_ports
from tests.support.seaweed import SeaweedS3

HTTP, HTTPS, TOKEN = "http", "https", "token"
_UNANSWERED = "closed before answering"
_COMMITTED = re.compile(r"committed .* to the shared store")


class Cluster(StartStop):
    """``count`` replicas on one bucket of ``seaweed``; haproxy's port 80 is ``http_port``."""

    def __init__(
        self,
        workdir: Path,
        seaweed: SeaweedS3,
        bucket: str,
        pebble: Pebble,
        registry_binary: Path,
        key_file: Path,
        http_port: int,
        count: int = 3,
        token: bool = False,
        **extra: str,
    ) -> None:
        self.workdir = workdir
        self.token = token
        # haproxy's token port, chosen first: every replica's TOKEN_REALM names it.
        self.token_front = free_ports(1, exclude=(http_port,))[0] if token else None
        self.seaweed = seaweed
        self.bucket = bucket
        self.pebble = pebble
        self.registry_binary = registry_binary
        self.key_file = key_file
        self.extra = extra
        self.replicas = [self._replica(i) for i in range(1, count + 1)]
        # While every replica is out of port 80, the CA's requests reach this one, which
        # accepts and never answers: an order then stays in validation, deterministically.
        self.silent = SilentServer()
        fronts = {
            HTTP: [int(r.env["ACME_HTTP_PORT"]) for r in self.replicas],
            HTTPS: [r.registry_port for r in self.replicas],
        }
        if token:
            fronts[TOKEN] = [self.token_port(r) for r in self.replicas]
        self.proxy = HAProxy(workdir / "haproxy", fronts, backups={HTTP: self.silent.port})
        self.http_port = http_port

    def _replica(self, index: int, **more: str) -> AgentProcess:
        (http_port,) = free_ports(1)
        if self.token_front is not None:
            (token_port,) = free_ports(1, exclude=(http_port, self.token_front))
            more = {
                "AUTH_MODE": "token",
                "TOKEN_ADDR": f"127.0.0.1:{token_port}",
                "TOKEN_REALM": f"https://{NAME}:{self.token_front}/token",
                **more,
            }
        env = AgentProcess.environment(
            self.workdir / f"r{index}",
            domains=NAME,
            directory=self.pebble.directory_url,
            ca_bundle=self.pebble.ca_bundle,
            http_port=http_port,
            registry_binary=self.registry_binary,
            STATE_STORE="s3",
            STATE_ENCRYPTION_KEY_FILE=str(self.key_file),
            STATE_LOCK_LEASE="5",
            STATE_POLL_INTERVAL="1",
            REGISTRY_STORAGE="s3",
            REGISTRY_STORAGE_S3_REGIONENDPOINT=self.seaweed.endpoint,
            REGISTRY_STORAGE_S3_BUCKET=self.bucket,
            REGISTRY_STORAGE_S3_REGION="us-east-1",
            REGISTRY_STORAGE_S3_ACCESSKEY=self.seaweed.access_key,
            REGISTRY_STORAGE_S3_SECRETKEY=self.seaweed.secret_key,
            REGISTRY_STORAGE_S3_FORCEPATHSTYLE="true",  # 3.x needs it with regionendpoint
            REGISTRY_STORAGE_REDIRECT_DISABLE="true",
            **{"ACME_PROFILE": "default", **self.extra, **more},
        )
        env.pop("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
        return AgentProcess(self.workdir / f"r{index}", env)

    def add_replica(self, **more: str) -> AgentProcess:
        """One more replica on the same store (not behind haproxy)."""
        replica = self._replica(len(self.replicas) + 1, **more)
        self.replicas.append(replica)
        return replica

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, *, port_80_silent: bool = False) -> Cluster:
        """Start haproxy and the replicas; ``port_80_silent``: with every replica out of
        port 80 (the CA's validations hang until :meth:`enable_port_80`)."""
        fixed = {HTTP: self.http_port}
        if self.token_front is not None:
            fixed[TOKEN] = self.token_front
        self.proxy.start(fixed)
        if port_80_silent:
            for index in range(1, len(self.replicas) + 1):
                self.proxy.disable(HTTP, index)
        for replica in self.replicas:
            replica.start()
        return self

    def enable_port_80(self, replicas: list[AgentProcess]) -> None:
        for replica in replicas:
            self.proxy.enable(HTTP, self.replicas.index(replica) + 1)

    def stop(self) -> None:
        for replica in self.replicas:
            with contextlib.suppress(AssertionError):
                replica.stop()
        self.proxy.stop()
        self.silent.stop()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.wait_ready(max(1.0, deadline - time.monotonic()))

    def kill(self, replica: AgentProcess) -> None:
        """kill -9 of the replica's whole process tree (agent, children, registry)."""
        assert replica.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.proc.pid, signal.SIGKILL)
        replica.proc.wait(timeout=10)

    # -- what the tests look at --------------------------------------------------------

    @staticmethod
    def token_port(replica: AgentProcess) -> int:
        """The replica's own token service (TOKEN_ADDR), not haproxy's."""
        return int(replica.env["TOKEN_ADDR"].rsplit(":", 1)[1])

    @property
    def https_port(self) -> int:
        return self.proxy.ports[HTTPS]

    def served(self, replica: AgentProcess, timeout: float = 30) -> x509.Certificate:
        root = self.pebble.root_pem()
        return wait_for_tls("127.0.0.1", replica.registry_port, NAME, root, timeout)

    def served_through_proxy(self, timeout: float = 30) -> x509.Certificate:
        return wait_for_tls("127.0.0.1", self.https_port, NAME, self.pebble.root_pem(), timeout)

    def serials_through_proxy(self, connections: int = 9) -> set[int]:
        serials = set()
        for _ in range(connections):
            cert = tls_probe("127.0.0.1", self.https_port, NAME, self.pebble.root_pem())
            assert cert is not None, "no verified handshake through haproxy"
            serials.add(cert.serial_number)
        return serials

    def wait_all_serve(self, wanted: str, timeout: float = 30) -> None:
        """Until every running replica serves the certificate with fingerprint ``wanted``."""
        for replica in self.replicas:
            if replica.proc is None or replica.proc.poll() is not None:
                continue
            wait_for_tls(
                "127.0.0.1",
                replica.registry_port,
                NAME,
                self.pebble.root_pem(),
                timeout,
                accept=lambda cert: fingerprint(cert) == wanted,
            )

    def commits(self) -> int:
        """Certificates committed to the shared record, counted in every replica's logs."""
        total = 0
        for replica in self.replicas:
            for log in replica.workdir.glob("run-*.log"):
                total += len(_COMMITTED.findall(log.read_text(errors="replace")))
        return total

    def state_object(self, key: str) -> bytes | None:
        """The raw object of a state key, read with plain S3 access (no encryption key)."""
        client = self.seaweed.client()
        try:
            answer = client.get_object(Bucket=self.bucket, Key=f"acme-registry/{key}")
        except client.exceptions.NoSuchKey:
            return None
        return bytes(answer["Body"].read())

    def state_keys(self) -> list[str]:
        client = self.seaweed.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix="acme-registry/"
        ):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def lock_holder(self) -> dict[str, Any] | None:
        data = self.state_object(statekeys.lock(statekeys.ISSUANCE_LOCK))
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def replica_of_pid(self, pid: int) -> AgentProcess | None:
        """The replica whose process tree ``pid`` belongs to."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.pid == group:
                return replica
        return None

    def storage(self) -> Storage:
        """The state store as a replica opens it (with the encryption key)."""
        from acme_registry.config import load_settings
        from acme_registry.statestore import open_storage

        return open_storage(load_settings(self.replicas[0].env))

    def record(self) -> sharedcert.CertificateRecord | None:
        """The shared certificate record, read as a replica reads it."""
        return sharedcert.load(self.storage())

    def order_and_commit(self, workdir: Path) -> CertificatePair:
        """Play another replica's orderer in this process (the caller holds the issuance
        lock): order with the replicas' settings, the CA validating through haproxy (the
        replicas answer from the store), and commit to the shared record as it would."""
        from acme_registry.account import Account
        from acme_registry.challenges import PendingChallenges
        from acme_registry.config import load_settings
        from acme_registry.issued import record_issued
        from acme_registry.issuer import Issuer
        from acme_registry.storage import FileStorage

        settings = dataclasses.replace(
            load_settings(self.replicas[0].env),
            data_dir=workdir / "data",
            cert_dir=workdir / "certs",
        )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage()
        read = sharedcert.load(storage)
        challenges = PendingChallenges(FileStorage(settings.data_dir), storage)
        pair = Issuer(settings, storage, Account(settings, storage), challenges).obtain()
        record_issued(settings, storage, pair)
        version = read.version if read is not None else None
        sharedcert.commit(storage, pair, settings.directory, version, dt.datetime.now(dt.UTC))
        return pair

    def wait_renewal_everywhere(self, old: str, timeout: float) -> float:
        """Wait until every running replica serves a certificate other than ``old`` (the
        same one everywhere); the seconds from its commit to the last replica serving it."""
        deadline = time.monotonic() + timeout
        root = self.pebble.root_pem()
        running = [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        served: dict[int, str] = {}
        while len(served) < len(running):
            assert time.monotonic() < deadline, f"not renewed everywhere: {served}"
            for index, replica in enumerate(running):
                if index in served:
                    continue
                cert = tls_probe("127.0.0.1", replica.registry_port, NAME, root, timeout=2)
                if cert is not None and fingerprint(cert) != old:
                    served[index] = fingerprint(cert)
            time.sleep(0.02)
        last = time.time()
        assert len(set(served.values())) == 1, served
        record = self.record()
        assert record is not None and record.pair.fingerprint == next(iter(served.values()))
        return last - record.committed_at.timestamp()


class ProxyLoad:
    """Clients through haproxy's 443: a new verified TLS connection and ``GET /`` each,
    from a few threads. As tests/support/load.py's clients do, a connection closed before
    any response byte (registry 3.x's old generation closes the one it accepted just before
    its shutdown) is retried once and counted in ``unanswered``; a request that still fails,
    in any way, is kept in ``failures``."""

    def __init__(self, port: int, root_pem: bytes, workdir: Path, threads: int = 2) -> None:
        self.port = port
        self.context = ssl.create_default_context(cadata=root_pem.decode())
        self.requests = 0
        self.unanswered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = self._one()
            retried = outcome == _UNANSWERED
            if retried:
                time.sleep(0.005)
                outcome = self._one()
            with self._lock:
                self.requests += 1
                self.unanswered += retried
                if outcome:
                    self.failures.append(outcome)
            time.sleep(0.02)

    def _one(self) -> str:
        request = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
                self.context.wrap_socket(raw, server_hostname=NAME) as tls,
            ):
                tls.sendall(request)
                head = tls.recv(64)
        except OSError as error:
            return f"{type(error).__name__}: {error}"
        if not head:
            return _UNANSWERED
        if not head.startswith(b"HTTP/1.1 200"):
            return f"answered {head[:40]!r}"
        return ""


class SilentServer:
    """Accepts TCP connections on loopback and never answers (until stopped)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
