"""`acme-registry run` as a real subprocess tree (supervisord, agent, registry) for tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.clients import wait_for_tls
from tests.support.lifecycle import StartStop
from tests.support.pebble import Pebble
from tests.support.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
# Authentication is on by default; tests log in as this user.
USER, PASSWORD = "tester", "correct-horse-battery-staple"
CREDS = f"{USER}:{PASSWORD}"


class AgentProcess(StartStop):
    """One `acme-registry run` with its own CERT_DIR, DATA_DIR, storage and ports."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / f"run-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def environment(
        cls,
        workdir: Path,
        *,
        domains: str,
        directory: str,
        ca_bundle: Path,
        http_port: int,
        registry_binary: Path,
        **extra: str,
    ) -> dict[str, str]:
        # Distinct ports: the configuration refuses an admin port equal to another one.
        registry_port, admin_port = free_ports(2, exclude=(http_port,))
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            "ACME_DOMAINS": domains,
            "ACME_DIRECTORY": directory,
            "ACME_CA_BUNDLE": str(ca_bundle),
            "ACME_HTTP_PORT": str(http_port),
            "CERT_DIR": str(workdir / "certs"),
            "DATA_DIR": str(workdir / "data"),
            "REGISTRY_HTTP_ADDR": f"127.0.0.1:{registry_port}",
            "REGISTRY_BINARY": str(registry_binary),
            "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(workdir / "storage"),
            "REGISTRY_HTTP_DRAINTIMEOUT": "5s",
            "ADMIN_ADDR": f"127.0.0.1:{admin_port}",
            "AUTH_USERS": CREDS,
        }
        env.update(extra)
        return env

    @property
    def registry_port(self) -> int:
        return int(self.env["REGISTRY_HTTP_ADDR"].rsplit(":", 1)[1])

    @property
    def admin_url(self) -> str:
        return f"http://{self.env['ADMIN_ADDR']}"

    @property
    def data_dir(self) -> Path:
        return Path(self.env["DATA_DIR"])

    @property
    def cert_dir(self) -> Path:
        return Path(self.env["CERT_DIR"])

    def start(self) -> AgentProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"run-{int(time.time() * 1000)}.log"
        # O_APPEND: supervisord reopens /dev/stdout for its programs' output, and without
        # it each opener would write at its own offset over the others' lines.
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "acme_registry", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def cli(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "acme_registry", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"acme-registry run exited {self.proc.returncode}:\n{self.log()}"
                )
            if self.cli("health", "--ready").returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the top process, as `docker stop` does; returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"did not stop within {timeout} s:\n{self.log()}") from None
        finally:
            # Anything left in the session (a stuck child) must not outlive the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop_cleanly(self, timeout: float = 30) -> None:
        """:meth:`stop`, asserting exit status 0 with the log's end in the failure."""
        status = self.stop(timeout)
        assert status == 0, f"exit status {status}; the log ends:\n{self.log()[-6000:]}"


# A running agent against a Pebble, and what tests ask of it.
NAME = "registry.test"


def start_agent(
    tmp_path: Path, pebble: Pebble, registry_binary: Path, *, auth: bool = True, **extra: str
) -> AgentProcess:
    """`acme-registry run` against ``pebble``; ``auth=False`` runs it with AUTH_MODE=none."""
    env = AgentProcess.environment(
        tmp_path / "agent",
        domains=extra.pop("ACME_DOMAINS", NAME),
        directory=extra.pop("ACME_DIRECTORY", pebble.directory_url),
        ca_bundle=pebble.ca_bundle,
        http_port=pebble.http_port,
        registry_binary=registry_binary,
        **extra,
    )
    if not auth:
        env["AUTH_MODE"] = "none"
        env.pop("AUTH_USERS")
    return AgentProcess(tmp_path / "agent", env).start()


def served(
    agent: AgentProcess, pebble: Pebble, name: str = NAME, timeout: float = 30
) -> x509.Certificate:
    """The leaf the registry serves, verified against this Pebble's root only."""
    try:
        return wait_for_tls("127.0.0.1", agent.registry_port, name, pebble.root_pem(), timeout)
    except TimeoutError as error:
        exited = agent.proc.poll() if agent.proc is not None else None
        raise TimeoutError(
            f"{error}; agent exit status {exited}; the log ends:\n{agent.log()[-6000:]}"
        ) from None


def served_instead_of(
    agent: AgentProcess,
    pebble: Pebble,
    old: x509.Certificate,
    timeout: float = 10,
    name: str = NAME,
) -> x509.Certificate:
    """The leaf served once the registry no longer serves ``old``."""
    return wait_for_tls(
        "127.0.0.1",
        agent.registry_port,
        name,
        pebble.root_pem(),
        timeout,
        accept=lambda cert: fingerprint(cert) != fingerprint(old),
    )


def status(agent: AgentProcess) -> dict[str, Any]:
    result = agent.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
