"""One registry binary on loopback with deletes enabled, restartable read-only, for GC tests.

Unlike ``tests.support.load.RegistryServer`` (built for rotation timing), this one exists to
be collected: ``storage.delete.enabled`` is on, and ``restart(readonly=True)`` starts a
generation with ``storage.maintenance.readonly.enabled`` on the same storage, as the agent's
read-only generation will. TLS from a throwaway CA, so skopeo verifies as it would in use.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.support.lifecycle import StartStop
from tests.support.tls import TestCA

NAME = "registry.test"


class RegistryProcess(StartStop):
    """``binary serve CONFIG`` with filesystem storage under ``workdir/storage``."""

    def __init__(self, workdir: Path, port: int, binary: str, *, name: str = NAME) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.binary = binary
        self.name = name
        self.ca = TestCA("acme-registry gc-test CA")
        self.storage_root = self.workdir / "storage"
        self.tls_path = self.workdir / "tls.pem"
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.readonly = False
        self._context = ssl.create_default_context(cadata=self.ca.pem.decode("ascii"))

    @property
    def base_url(self) -> str:
        return f"https://{self.name}:{self.port}"

    @property
    def host(self) -> str:
        """``name:port``, the form skopeo references start with."""
        return f"{self.name}:{self.port}"

    def config_path(self, readonly: bool) -> Path:
        return self.workdir / ("config-readonly.yml" if readonly else "config.yml")

    def log_path(self) -> Path:
        return self.workdir / f"registry-{self.generation}.log"

    def logs(self, chars: int = 4000) -> str:
        return self.log_path().read_text(errors="replace")[-chars:]

    def env(self) -> dict[str, str]:
        """The environment the registry (and its garbage-collect) runs with: nothing inherited,
        since any REGISTRY_* variable would override the config file."""
        return {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"}

    def start(self, *, readonly: bool = False) -> RegistryProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_root.mkdir(exist_ok=True)
        if not self.tls_path.exists():
            self.tls_path.write_bytes(self.ca.issue([self.name]))
            self.tls_path.chmod(0o600)
        for flag in (False, True):
            self._write_config(flag)
        self.readonly = readonly
        self.generation += 1
        with self.log_path().open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path(readonly))],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
            )
        self._wait_serving(timeout=20)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, *, readonly: bool) -> None:
        """Stop the serving process and start one (read-only or not) on the same storage."""
        self.stop()
        self.start(readonly=readonly)

    def _write_config(self, readonly: bool) -> None:
        storage: dict[str, object] = {
            "filesystem": {"rootdirectory": str(self.storage_root)},
            "delete": {"enabled": True},
            # No blob descriptor cache: a test that collects must never be answered from
            # a cache that remembers a deleted blob.
        }
        if readonly:
            storage["maintenance"] = {"readonly": {"enabled": True}}
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": storage,
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                "secret": "gc-tests-shared-secret",
                "draintimeout": "5s",
                "tls": {"certificate": str(self.tls_path), "key": str(self.tls_path)},
            },
        }
        # JSON is YAML: no YAML library needed to write the registry's config.
        self.config_path(readonly).write_text(json.dumps(config, indent=2))

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                    self._context.wrap_socket(raw, server_hostname=self.name),
                ):
                    return
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry not serving within {timeout} s ({last})")
            time.sleep(0.01)
