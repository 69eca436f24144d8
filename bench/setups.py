"""The four ways to serve a registry over TLS that the benchmark compares, all on loopback.

- ``Ours``: ``acme-registry run`` (supervisord in-process, the agent, registry generations),
  through tests.support.agent.AgentProcess, with ``AUTH_MODE=none``.
- ``CaddyProxy``: Debian's Caddy (``caddy run --config FILE``, its own ACME against a Pebble,
  HTTP-01 only) as a TLS reverse proxy in front of the registry binary on plain HTTP.
- ``CertbotRegistry``: ``certbot certonly --standalone`` against a Pebble, then the registry
  binary serving TLS with what certbot wrote (the old tutorial's way).
- ``BareRegistry``: the registry binary serving TLS with a fixed certificate from a local CA.

Every path runs without authentication, and every registry process gets the same
configuration apart from TLS (the one ``acme_registry.registry.render_config`` writes: default
log level, access log on), so that the data paths differ only in what sits in front.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import IO

from bench import procstat
from tests.support.agent import AgentProcess
from tests.support.pebble import Pebble
from tests.support.ports import free_port
from tests.support.tls import TestCA

NAME = "registry.test"
REGISTRY_BINARY = Path("/usr/bin/docker-registry")
CADDY_BINARY = "caddy"
CERTBOT_BINARY = "certbot"
STOP_TIMEOUT = 15.0
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without proxy settings (everything here is loopback)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the first verified 200 ---------------------------------------------------------------------


def get_v2(port: int, context: ssl.SSLContext, timeout: float = 5.0) -> int:
    """One verified HTTPS GET of /v2/ on 127.0.0.1:``port`` (SNI and Host ``NAME``)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = http.client.HTTPSConnection(NAME, port, context=context, timeout=timeout)
    try:
        conn.sock = context.wrap_socket(raw, server_hostname=NAME)
        conn.request("GET", "/v2/", headers={"User-Agent": "acme-registry-bench/1"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
        raw.close()


def wait_for_v2(port: int, root_pem: bytes, timeout: float = 60.0, poll: float = 0.01) -> float:
    """Poll every ``poll`` s until GET /v2/ answers 200 over verified TLS; returns when."""
    context = ssl.create_default_context(cadata=root_pem.decode("ascii"))
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        try:
            status = get_v2(port, context)
            if status == 200:
                return time.monotonic()
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no verified 200 on /v2/ at port {port} in {timeout} s: {last}")
        time.sleep(poll)


# -- the registry binary -----------------------------------------------------------------------


def registry_config(
    port: int, storage: Path, secret: str, tls_file: Path | None = None
) -> dict[str, object]:
    """The registry config every path uses (ours renders the same, plus its headers)."""
    http_config: dict[str, object] = {
        "addr": f"127.0.0.1:{port}",
        "secret": secret,
        "draintimeout": "5s",
    }
    if tls_file is not None:
        http_config["tls"] = {"certificate": str(tls_file), "key": str(tls_file)}
    return {
        "version": 0.1,
        "log": {"fields": {"service": "registry"}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": http_config,
    }


class RegistryProcess:
    """One registry binary with our own config (never Debian's, which turns on htpasswd)."""

    def __init__(
        self, workdir: Path, port: int, storage: Path, tls_file: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.storage = storage
        self.tls_file = tls_file
        self.secret = secrets.token_hex(16)
        self.config_path = workdir / "registry.yml"
        self.log_path = workdir / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RegistryProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = registry_config(self.port, self.storage, self.secret, self.tls_file)
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(REGISTRY_BINARY), "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Nothing inherited: any REGISTRY_* variable would override the config.
                env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
            )
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []


# -- ours ----------------------------------------------------------------------------------------


class Ours:
    """``acme-registry run`` with AUTH_MODE=none, ACME against ``pebble``."""

    label = "acme-registry"

    def __init__(self, workdir: Path, pebble: Pebble, storage: Path, **extra: str) -> None:
        """``extra``: more settings (e.g. the DNS challenge's), over the defaults."""
        env = AgentProcess.environment(
            workdir,
            domains=NAME,
            directory=pebble.directory_url,
            ca_bundle=pebble.ca_bundle,
            http_port=pebble.http_port,
            registry_binary=REGISTRY_BINARY,
            AUTH_MODE="none",
            REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(storage),
            **extra,
        )
        env.pop("AUTH_USERS", None)  # the same setting on every path: no authentication
        self.agent = AgentProcess(workdir, env)
        self.root_pem = pebble.root_pem()
        self.started_wall = 0.0

    @property
    def port(self) -> int:
        return self.agent.registry_port

    def start(self) -> Ours:
        self.started_wall = time.time()
        self.agent.start()
        return self

    def stop(self) -> None:
        self.agent.stop()

    def pids(self) -> list[int]:
        """Every process of the tree: supervisord (in ``run``), the agent, registries."""
        proc = self.agent.proc
        if proc is None or proc.poll() is not None:
            return []
        return procstat.tree(proc.pid)

    def registry_pids(self) -> list[int]:
        return [p for p in self.pids() if procstat.exe_name(p) == REGISTRY_BINARY.name]

    def added_pids(self) -> list[int]:
        """What we add beside the registry: supervisord, the agent and any other child."""
        return [p for p in self.pids() if procstat.exe_name(p) != REGISTRY_BINARY.name]


# -- Caddy -------------------------------------------------------------------------------------


def caddyfile(
    *,
    http_port: int,
    https_port: int,
    storage: Path,
    directory: str,
    ca_bundle: Path,
    upstream_port: int,
    renew_interval: str | None = None,
) -> str:
    """Caddy as the tutorials set it up: automatic HTTPS for one name, reverse_proxy.

    ``http_port`` is where Caddy answers HTTP-01 (Pebble's ``httpPort``); TLS-ALPN-01 is
    off so that both ACME clients prove control the same way. ``trusted_roots`` is Caddy
    2.6's trust for a private ACME server's own HTTPS certificate. No admin endpoint, no
    trust-store installation, no OCSP stapling (Pebble's certificates have no OCSP URL).
    """
    renew = f"\trenew_interval {renew_interval}\n" if renew_interval else ""
    return f"""{{
	admin off
	http_port {http_port}
	https_port {https_port}
	storage file_system {{
		root {storage}
	}}
	skip_install_trust
	ocsp_stapling off
{renew}}}

{NAME} {{
	tls {{
		issuer acme {{
			dir {directory}
			trusted_roots {ca_bundle}
			disable_tlsalpn_challenge
		}}
	}}
	reverse_proxy 127.0.0.1:{upstream_port}
}}
"""


class CaddyProxy:
    """Caddy (own ACME against ``pebble``) in front of the registry binary on plain HTTP."""

    label = "Caddy + registry"

    def __init__(
        self,
        workdir: Path,
        pebble: Pebble,
        storage: Path,
        *,
        renew_interval: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.registry = RegistryProcess(workdir / "registry", free_port(), storage)
        self.config_path = workdir / "Caddyfile"
        self.log_path = workdir / "caddy.log"
        self.caddy_storage = workdir / "caddy-storage"
        self.root_pem = pebble.root_pem()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            caddyfile(
                http_port=pebble.http_port,
                https_port=self.port,
                storage=self.caddy_storage,
                directory=pebble.directory_url,
                ca_bundle=pebble.ca_bundle,
                upstream_port=self.registry.port,
                renew_interval=renew_interval,
            )
        )

    def start(self) -> CaddyProxy:
        """Start the registry and Caddy together (both count in the time to serving)."""
        self.registry.start()
        self._log = self.log_path.open("ab")
        # HOME and XDG_* keep Caddy's autosave.json and default storage inside workdir.
        env = clean_env(
            HOME=str(self.workdir),
            XDG_DATA_HOME=str(self.workdir / "xdg-data"),
            XDG_CONFIG_HOME=str(self.workdir / "xdg-config"),
        )
        self.proc = subprocess.Popen(
            [CADDY_BINARY, "run", "--config", str(self.config_path), "--adapter", "caddyfile"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.registry.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def caddy_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def pids(self) -> list[int]:
        return self.caddy_pids() + self.registry.pids()

    def registry_pids(self) -> list[int]:
        return self.registry.pids()

    def added_pids(self) -> list[int]:
        return self.caddy_pids()

    def log_events(self) -> list[dict[str, object]]:
        """Caddy's JSON log lines, parsed (other lines skipped)."""
        events = []
        if self._log is not None:
            self._log.flush()
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events


# -- certbot + registry ------------------------------------------------------------------------


class CertbotRegistry:
    """``certbot certonly --standalone`` against ``pebble``, then the registry with its cert."""

    label = "certbot + registry"

    def __init__(self, workdir: Path, pebble: Pebble, storage: Path) -> None:
        self.workdir = workdir
        self.pebble = pebble
        self.root_pem = pebble.root_pem()
        self.port = free_port()
        self.storage = storage
        self.live = workdir / "config" / "live" / NAME
        self.tls_file = workdir / "tls.pem"
        self.registry = RegistryProcess(workdir / "registry", self.port, storage, self.tls_file)

    def obtain(self) -> None:
        """One certbot run: new account, order, HTTP-01 on Pebble's httpPort, certificate."""
        self.run_certbot(
            [
                "--standalone",
                "--http-01-port",
                str(self.pebble.http_port),
                "--http-01-address",
                "127.0.0.1",
            ]
        )

    def run_certbot(self, authenticator: list[str]) -> None:
        """``certbot certonly`` with ``authenticator``'s flags; RuntimeError when it fails."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            CERTBOT_BINARY,
            "certonly",
            *authenticator,
            "--server",
            self.pebble.directory_url,
            "--config-dir",
            str(self.workdir / "config"),
            "--work-dir",
            str(self.workdir / "work"),
            "--logs-dir",
            str(self.workdir / "logs"),
            "--register-unsafely-without-email",
            "--agree-tos",
            "-n",
            "-d",
            NAME,
        ]
        result = subprocess.run(
            command,
            env=clean_env(REQUESTS_CA_BUNDLE=str(self.pebble.ca_bundle)),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            lines = [
                line
                for line in result.stderr.splitlines()
                if line and not line.startswith(("Saving debug log", "Ask for help"))
            ]
            message = " ".join(lines)[-1000:]
            raise RuntimeError(f"certbot failed ({result.returncode}): {message}")

    def start(self) -> CertbotRegistry:
        """Start the registry on certbot's files (what a deploy hook or a human would do)."""
        # The registry reads one file for both; chain then key, as the tutorials' cat does.
        fullchain = (self.live / "fullchain.pem").read_bytes()
        key = (self.live / "privkey.pem").read_bytes()
        self.tls_file.write_bytes(fullchain + key)
        self.tls_file.chmod(0o600)
        self.registry.start()
        return self

    def stop(self) -> None:
        self.registry.stop()

    def pids(self) -> list[int]:
        return self.registry.pids()


# -- the bare registry -------------------------------------------------------------------------


class BareRegistry:
    """The registry binary serving TLS itself with a fixed certificate from a local CA."""

    label = "bare registry"

    def __init__(self, workdir: Path, storage: Path) -> None:
        self.workdir = workdir
        self.ca = TestCA("acme-registry bench CA")
        self.root_pem = self.ca.pem
        self.port = free_port()
        self.tls_file = workdir / "tls.pem"
        self.registry = RegistryProcess(workdir, self.port, storage, self.tls_file)

    def start(self) -> BareRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls_file.write_bytes(self.ca.issue([NAME]))
        self.tls_file.chmod(0o600)
        self.registry.start()
        return self

    def stop(self) -> None:
        self.registry.stop()

    def pids(self) -> list[int]:
        return self.registry.pids()

    def registry_pids(self) -> list[int]:
        return self.registry.pids()

    def added_pids(self) -> list[int]:
        return []
