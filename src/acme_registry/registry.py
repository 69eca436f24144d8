"""The upstream registry: its configuration, and its generations under supervisord.

The registry loads its certificate once at start and never again, so a new certificate
means a new process. Generations are the supervisord programs ``registry:registry-N``
(as many as ``numprocs`` in supervisord.conf). With socket activation (3.x) every generation
serves on the agent's one listening socket: a rotation starts the next generation, waits
until it serves, then stops the current one, which drains; nothing is refused because the
kernel queue never closes. Without it (2.x) the current one is stopped (its listener closes
within milliseconds while its transfers drain) and the next, already started and waiting on
its config FIFO, binds as soon as the port is free.
"""

from __future__ import annotations

import configparser
import errno
import hashlib
import http.client
import json
import logging
import os
import secrets
import socket
import ssl
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import listeners, statekeys
from .config import ListenAddress, Settings
from .registry_socket import RegistrySocket
from .storage import Storage, StorageConflict, write_atomic

log = logging.getLogger(__name__)

GROUP = "registry"
RUNNING_STATES = ("STARTING", "RUNNING", "BACKOFF")
GONE_STATES = ("STOPPED", "EXITED", "FATAL")
# How long a new generation may take to serve before a rotation gives up on it (the
# current one keeps serving).
SERVING_TIMEOUT = 20.0


def supervisord_conf() -> Path:
    """The packaged supervisord.conf; in a source checkout, the one in entrypoint/."""
    packaged = resources.files("acme_registry") / "supervisord.conf"
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "entrypoint" / "supervisord.conf"
    if checkout.is_file():
        return checkout
    raise FileNotFoundError("supervisord.conf is missing from the installation")


def generation_count(conf_text: str) -> int:
    """``numprocs`` of ``[program:registry]`` in supervisord.conf: how many generations."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(conf_text)
    count = parser.getint(f"program:{GROUP}", "numprocs", fallback=1)
    if count < 2:
        raise ValueError(f"[program:{GROUP}] numprocs={count}: a rotation needs at least 2")
    return count


def http_secret(storage: Storage) -> str:
    """The registry's http.secret, generated once: uploads then survive a rotation."""
    stored = storage.load_bytes(statekeys.HTTP_SECRET)
    if stored:
        return stored.decode().strip()
    secret = secrets.token_urlsafe(32)
    try:
        storage.store(statekeys.HTTP_SECRET, secret.encode() + b"\n", if_absent=True)
    except StorageConflict:
        # Another process made it first: every generation (and replica) needs the same one.
        return http_secret(storage)
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
    if settings.gc.retention.enabled:
        # Retention deletes manifests through the API, which refuses them without this.
        config.setdefault("storage", {})["delete"] = {"enabled": True}
    if auth is not None:
        config["auth"] = auth
    if settings.log_format == "json":
        config["log"]["formatter"] = "json"
    return config


class Supervisor:
    """A small client for supervisord's XML-RPC interface on its unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def _proxy(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

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
    """Which generation serves, starting the first and rotating to the next.

    Generation N reads ``config_dir/registry-N.yml``. With socket activation a rotation
    starts the next generation on the shared socket, waits until it serves, then stops the
    current one. Without it, a rotation starts the next generation *before* stopping the
    current one, with that path made a FIFO: the new process does its start-up work (~15 ms
    for the registry binary) and then blocks reading its config. Once the old listener is
    gone the config is written into the FIFO and the new process listens within a few
    milliseconds, instead of start-up time after the port was freed. The path is then
    replaced by a regular file, which is what a supervisord restart after a crash reads.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        addr: ListenAddress,
        config_dir: Path,
        registry_socket: RegistrySocket | None = None,
        count: int | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.addr = addr
        self.config_dir = config_dir
        self.registry_socket = registry_socket
        self.count = (
            count if count is not None else generation_count(supervisord_conf().read_text())
        )
        self.config = b""
        self.config_dict: dict[str, Any] = {}
        # Whether the serving generation was started read-only (a collection's window).
        self.readonly = False

    @property
    def socket_activation(self) -> bool:
        return self.registry_socket is not None and self.registry_socket.activation

    def configure(self, config: dict[str, Any]) -> None:
        """The registry configuration every generation started from now on reads."""
        self.config_dict = config
        self.config = _config_bytes(config)
        for index in range(self.count):
            write_atomic(self.config_path(index), self.config, mode=0o600)

    def config_path(self, index: int) -> Path:
        return self.config_dir / f"registry-{index}.yml"

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
        index = self._free_slot()
        write_atomic(self.config_path(index), self.config, mode=0o600)
        if self.registry_socket is not None:
            # Listening (activation) or giving the address to the registry (2.x) only now:
            # until a generation runs, connections are refused rather than left hanging.
            self.registry_socket.prepare_for_first_generation()
        self.supervisor.start(self.name(index))
        return self.name(index)

    def readonly_config(self) -> bytes:
        """The read-write config plus ``storage.maintenance.readonly``: pulls work, every
        write (manifest PUT, blob upload, DELETE) is answered 405."""
        return _config_bytes(readonly_config(self.config_dict))

    def enter_readonly(self, serving: Callable[[], bool] | None = None) -> str:
        """Rotate to a read-only generation, the usual way (pulls go on).

        Only the handover carries the read-only config: the generation's file on disk is
        the read-write one, so a supervisord restart (or the next start, after a crash of
        the agent) serves read-write.
        """
        name = self.rotate(serving, handover=self.readonly_config())
        self.readonly = True
        return name

    def leave_readonly(self, serving: Callable[[], bool] | None = None) -> str | None:
        """Rotate to a fresh read-write generation (no in-memory cache remembers a swept
        blob); idempotent: nothing to do when the serving one is read-write already."""
        if not self.readonly:
            return None
        name = self.rotate(serving, handover=self.config)
        self.readonly = False
        return name

    def write_collection_config(self) -> Path:
        """A regular copy of the read-only config for ``registry garbage-collect``."""
        path = self.config_dir / "registry-gc.yml"
        write_atomic(path, self.readonly_config(), mode=0o600)
        return path

    def rotate(
        self, serving: Callable[[], bool] | None = None, handover: bytes | None = None
    ) -> str:
        """Replace the serving generation with a new one; the new one loads the new pair.

        ``serving`` says whether the new generation serves yet (the agent asks whether the
        new certificate is served); it is only needed with socket activation, where the old
        generation keeps accepting from the same socket until it is told to stop.
        ``handover`` is the config the new process starts from, when it is not the regular
        one (the read-only window); the file left on disk is always the regular one.
        Inside a collection's read-only window (``readonly``) a rotation (a renewed
        certificate) starts a read-only generation: garbage-collect may be sweeping.
        """
        current = self.current()
        if current is None:
            return self.ensure_running()
        if handover is None and self.readonly:
            handover = self.readonly_config()
        started_with = handover if handover is not None else self.config
        if self.socket_activation:
            return self._rotate_on_shared_socket(current, serving, started_with)
        index = self._free_slot()
        path = self.config_path(index)
        began = time.monotonic()
        path.unlink(missing_ok=True)
        os.mkfifo(path, 0o600)
        try:
            self.supervisor.start(self.name(index))
            writer = _open_fifo_writer(path, timeout=5.0)
            ready = time.monotonic()
            self.supervisor.stop(current)
            stopped = time.monotonic()
            if not listeners.wait_closed(self.addr.port, timeout=5.0):
                log.warning("port %d still has a listener after 5 s", self.addr.port)
            closed = time.monotonic()
            if writer is None:
                # The new process never opened its config: restart it on a regular file.
                write_atomic(path, started_with, mode=0o600)
                self.supervisor.stop(self.name(index))
                self.supervisor.start(self.name(index))
            else:
                with os.fdopen(writer, "wb") as fifo:
                    fifo.write(started_with)
        finally:
            write_atomic(path, self.config, mode=0o600)
        log.info(
            "registry generation %s replaced %s: new process ready %.1f ms, stop request "
            "%.1f ms, old listener gone %.1f ms later, config handed over %.1f ms later",
            self.name(index),
            current,
            (ready - began) * 1000,
            (stopped - ready) * 1000,
            (closed - stopped) * 1000,
            (time.monotonic() - closed) * 1000,
        )
        return self.name(index)

    def _rotate_on_shared_socket(
        self, current: str, serving: Callable[[], bool] | None, started_with: bytes
    ) -> str:
        """Start the next generation on the shared socket; stop the current one once the
        next serves. Both accept from one queue meanwhile, so no connection is refused."""
        index = self._free_slot()
        name = self.name(index)
        write_atomic(self.config_path(index), started_with, mode=0o600)
        began = time.monotonic()
        self.supervisor.start(name)
        probes = 0
        while True:
            state = self.supervisor.states(GROUP).get(name)
            if serving is not None:
                probes += 1
                if serving():
                    break
            elif state == "RUNNING":  # supervisord's startsecs passed: it is up
                break
            if state not in ("STARTING", "RUNNING") or time.monotonic() - began > SERVING_TIMEOUT:
                self.supervisor.stop(name)
                raise OSError(
                    f"registry generation {name} did not serve (state {state}) within "
                    f"{time.monotonic() - began:.1f} s; {current} still serves"
                )
            time.sleep(0.005)
        ready = time.monotonic()
        if started_with != self.config:
            # It has read its config (it serves): a restart of it reads the regular one.
            write_atomic(self.config_path(index), self.config, mode=0o600)
        self.supervisor.stop(current)
        log.info(
            "registry generation %s replaced %s on the shared socket: new process serving "
            "%.1f ms after its start (%d probes), old one told to drain %.1f ms later",
            name,
            current,
            (ready - began) * 1000,
            probes,
            (time.monotonic() - ready) * 1000,
        )
        return name

    def _free_slot(self) -> int:
        states = self.supervisor.states(GROUP)
        for index in range(self.count):
            if states.get(self.name(index)) in GONE_STATES:
                return index
        raise RuntimeError("every registry generation is still draining; try again later")


def readonly_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``storage.maintenance.readonly.enabled: true`` (the rest kept)."""
    copied = json.loads(json.dumps(config))
    maintenance = copied.setdefault("storage", {}).setdefault("maintenance", {})
    maintenance["readonly"] = {"enabled": True}
    return dict(copied)


def _config_bytes(config: Mapping[str, Any]) -> bytes:
    # JSON is YAML: no YAML library needed to write the registry's config.
    return json.dumps(config, indent=2).encode() + b"\n"


def _open_fifo_writer(path: Path, timeout: float) -> int | None:
    """Open the FIFO for writing once its reader (the new registry) has opened it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            time.sleep(0.001)
            continue
        os.set_blocking(fd, True)
        return fd
    return None


# -- the readiness probe ---------------------------------------------------------------------

PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class RegistryProbe:
    """What one connection to the registry found: the served leaf, the status of ``/v2/``."""

    fingerprint: str | None  # SHA-256 of the served leaf; None when TLS did not come up
    status: int | None  # None when the request got no HTTP answer


def probe_registry(
    addr: ListenAddress, server_name: str, *, request: bool = True, timeout: float = PROBE_TIMEOUT
) -> RegistryProbe:
    """Handshake with the registry and (with ``request``) ask ``GET /v2/``, on ONE connection.

    The served leaf is compared with the stored one instead of verifying a chain: the
    question is "does this registry serve our current pair", not "is the CA trusted".
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((addr.connect_host(), addr.port), timeout=timeout)
    except OSError:
        return RegistryProbe(None, None)
    try:
        tls = context.wrap_socket(raw, server_hostname=server_name)
    except (OSError, ssl.SSLError):
        raw.close()
        return RegistryProbe(None, None)
    der = tls.getpeercert(binary_form=True)
    fingerprint = hashlib.sha256(der).hexdigest() if der else None
    if not request:
        tls.close()
        return RegistryProbe(fingerprint, None)
    # http.client on the socket we already hold: it connects only when it has none.
    conn = http.client.HTTPConnection(server_name, addr.port, timeout=timeout)
    conn.sock = tls
    try:
        conn.request("GET", "/v2/", headers={"User-Agent": "acme-registry-probe"})
        status: int | None = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        status = None
    finally:
        conn.close()
    return RegistryProbe(fingerprint, status)
