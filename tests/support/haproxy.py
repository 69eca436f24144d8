"""Debian's haproxy in TCP mode, round-robin in front of several replicas, for tests.

One frontend per published port (the CA's port 80, the registry's 443), each with a backend
listing every replica at that port. Health checks are TCP connects, as a layer-4 load
balancer does: a replica that does not listen on its registry port yet (no certificate) gets
no 443 traffic. A server is taken out and put back through the runtime API (the admin
socket), as an operator or a rolling update would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.lifecycle import StartStop
from tests.support.ports import free_ports

START_TIMEOUT = 10.0
STOP_GRACE = 5.0

_GLOBAL = """\
global
    maxconn 4096
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A replica refusing a connection (a rotation on registry 2.x) costs a retry on
    # another server, not a failed request.
    retries 3
    option redispatch 1
"""

_FRONTEND = """
frontend {name}
    bind 127.0.0.1:{port}
    default_backend {name}

backend {name}
    balance roundrobin
{servers}
"""

_SERVER = "    server {server} 127.0.0.1:{port} check inter 300ms fall 2 rise 1\n"
# Used only while every replica is out: a test's stand-in (e.g. one that never answers).
_BACKUP = "    server standin 127.0.0.1:{port} backup\n"


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("haproxy not found: install Debian's haproxy (make system-deps)")
    return found


def render_config(
    socket_path: Path,
    fronts: Mapping[str, tuple[int, Sequence[int]]],
    backups: Mapping[str, int] | None = None,
) -> str:
    """The config: ``fronts`` maps a frontend name to (its port, each replica's port);
    ``backups`` a frontend to the port of a server used only while no replica is.

    Servers are named ``r1``, ``r2``, ... in the order of the replicas' ports.
    """
    text = _GLOBAL.format(socket=socket_path)
    for name, (port, backends) in fronts.items():
        servers = "".join(
            _SERVER.format(server=f"r{i}", port=backend) for i, backend in enumerate(backends, 1)
        )
        if backups and name in backups:
            servers += _BACKUP.format(port=backups[name])
        text += _FRONTEND.format(name=name, port=port, servers=servers)
    return text


class HAProxy(StartStop):
    """``haproxy -db`` with :func:`render_config`'s config; ``ports[name]`` is a frontend's."""

    def __init__(
        self,
        workdir: Path,
        backends: Mapping[str, Sequence[int]],
        backups: Mapping[str, int] | None = None,
    ) -> None:
        self.workdir = workdir
        self.backups = dict(backups or {})
        self.socket_path = workdir / "haproxy.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.backends = {name: list(ports) for name, ports in backends.items()}
        self.ports = dict(zip(self.backends, free_ports(len(self.backends)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ports: Mapping[str, int] | None = None) -> HAProxy:
        """Start; ``ports`` fixes some frontends' ports (e.g. Pebble's httpPort)."""
        self.ports.update(ports or {})
        self.workdir.mkdir(parents=True, exist_ok=True)
        fronts = {name: (self.ports[name], self.backends[name]) for name in self.backends}
        self.config_path.write_text(render_config(self.socket_path, fronts, self.backups))
        check = subprocess.run(
            [haproxy_binary(), "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its config:\n{check.stdout}{check.stderr}")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.proc.returncode}:\n{self.log()}")
            if self.socket_path.exists() and all(_listens(p) for p in self.ports.values()):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"haproxy did not listen within {START_TIMEOUT:g} s:\n{self.log()}")

    def command(self, line: str) -> str:
        """One runtime-API command; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def disable(self, frontend: str, replica: int) -> None:
        """Take replica number ``replica`` (1-based) out of ``frontend``'s backend."""
        answer = self.command(f"disable server {frontend}/r{replica}")
        if answer.strip():
            raise RuntimeError(f"haproxy: disable server {frontend}/r{replica}: {answer}")

    def enable(self, frontend: str, replica: int) -> None:
        answer = self.command(f"enable server {frontend}/r{replica}")
        if answer.strip():
            raise RuntimeError(f"haproxy: enable server {frontend}/r{replica}: {answer}")

    def server_states(self, frontend: str) -> dict[str, str]:
        """``r1`` -> ``UP``/``DOWN``/``MAINT``..., from ``show stat``."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == frontend and row.get("svname", "").startswith("r"):
                states[row["svname"]] = row.get("status", "")
        return states

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_GRACE)


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
