"""The upstream registry: its configuration, and its generations under supervisord.

The registry loads its certificate once at start and never again, so a new certificate
means a new process. Generations are the supervisord programs ``registry:registry-N``;
the agent starts one, and on rotation stops the current one (its listener closes within
milliseconds while its transfers drain) and starts the next as soon as the port is free.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import xmlrpc.client
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ListenAddress, Settings
from .storage import Storage, write_atomic

log = logging.getLogger(__name__)

GROUP = "registry"
GENERATIONS = 3  # must match numprocs in supervisord.conf
RUNNING_STATES = ("STARTING", "RUNNING", "BACKOFF")


def http_secret(storage: Storage) -> str:
    """The registry's http.secret, generated once: uploads then survive a rotation."""
    stored = storage.load("registry/http-secret")
    if stored:
        return stored.decode().strip()
    secret = secrets.token_urlsafe(32)
    storage.store("registry/http-secret", secret.encode() + b"\n")
    return secret


def render_config(
    settings: Settings,
    secret: str,
    tls_file: Path,
    env: Mapping[str, str],
    auth: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The registry's config file. Operators' REGISTRY_* variables still override it."""
    addr = settings.registry_addr
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"fields": {"service": "registry"}},
        "http": {
            "addr": f"{host}:{addr.port}",
            "secret": secret,
            "draintimeout": f"{settings.drain_seconds:g}s",
            "tls": {"certificate": str(tls_file), "key": str(tls_file)},
            "headers": {
                "X-Content-Type-Options": ["nosniff"],
                "Strict-Transport-Security": ["max-age=63072000"],
            },
        },
    }
    # The registry refuses a config naming two storage drivers; when the operator
    # configures storage through the environment, the file must not name one too.
    if not any(name.upper().startswith("REGISTRY_STORAGE") for name in env):
        config["storage"] = {"filesystem": {"rootdirectory": "/var/lib/registry"}}
    if auth is not None:
        config["auth"] = auth
    if settings.log_format == "json":
        config["log"]["formatter"] = "json"
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    # JSON is YAML: no YAML library needed. 0600 because it holds http.secret.
    write_atomic(path, json.dumps(config, indent=2).encode() + b"\n", mode=0o600)


class Supervisor:
    """A small client for supervisord's XML-RPC interface on its unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def _proxy(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def state(self, name: str) -> str:
        try:
            return str(self._proxy().getProcessInfo(name)["statename"])
        except xmlrpc.client.Fault as fault:
            raise RuntimeError(f"supervisord: {fault.faultString}") from None

    def states(self, group: str) -> dict[str, str]:
        info = self._proxy().getAllProcessInfo()
        return {f"{p['group']}:{p['name']}": p["statename"] for p in info if p["group"] == group}

    def start(self, name: str) -> None:
        self._proxy().startProcess(name, False)

    def stop(self, name: str) -> None:
        try:
            self._proxy().stopProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise


class RegistryGenerations:
    """Which generation serves, starting the first and rotating to the next."""

    def __init__(self, supervisor: Supervisor, addr: ListenAddress) -> None:
        self.supervisor = supervisor
        self.addr = addr
        self.restarts = 0

    @staticmethod
    def name(index: int) -> str:
        return f"{GROUP}:{GROUP}-{index}"

    def current(self) -> str | None:
        states = self.supervisor.states(GROUP)
        running = [n for n, s in sorted(states.items()) if s in RUNNING_STATES]
        return running[-1] if running else None

    def ensure_running(self) -> str:
        current = self.current()
        if current is not None:
            return current
        return self._start_free_slot()

    def rotate(self) -> str:
        """Replace the serving generation with a new one; the new one loads the new pair."""
        current = self.current()
        began = time.monotonic()
        stopped = closed = began
        if current is not None:
            self.supervisor.stop(current)
            stopped = time.monotonic()
            if not wait_port_closed(self.addr.port, timeout=5.0):
                log.warning(
                    "port %d still has a listener after 5 s; starting anyway", self.addr.port
                )
            closed = time.monotonic()
        started = self._start_free_slot()
        log.info(
            "registry generation %s started (was %s): stop request %.1f ms, "
            "listener gone %.1f ms later, start request %.1f ms",
            started,
            current or "none",
            (stopped - began) * 1000,
            (closed - stopped) * 1000,
            (time.monotonic() - closed) * 1000,
        )
        return started

    def _start_free_slot(self) -> str:
        states = self.supervisor.states(GROUP)
        for index in range(GENERATIONS):
            name = self.name(index)
            if states.get(name) in ("STOPPED", "EXITED", "FATAL"):
                self.supervisor.start(name)
                self.restarts += 1
                return name
        raise RuntimeError("every registry generation is still draining; try again later")


def listening_ports() -> set[int]:
    """Ports with a TCP listener on this host (network namespace), from /proc."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_port_closed(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while port in listening_ports():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
