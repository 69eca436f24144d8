"""A Docker engine of the tests' own, for running the image the way most operators do.

Debian's ``docker.io`` runs on these machines with host networking only (no bridge, no
iptables) and the vfs storage driver. Everything the daemon keeps lives under one temporary
folder: its data and exec roots, its socket, and the client's config (``docker login``
credentials). It runs in a private mount namespace (``unshare -m``) in which bind mounts,
invisible to the rest of the machine, give it

- an ``/etc/hosts`` mapping the registry's test names to loopback: the daemon, not the CLI,
  resolves and connects for ``docker login``, ``push`` and ``pull``;
- an ``/etc/docker`` of its own, whose ``certs.d/<name>:<port>/ca.crt`` says which root to
  trust for a registry. The whole folder rather than ``certs.d`` alone, because dockerd 20.10
  also writes ``/etc/docker/key.json`` at start and reads ``daemon.json`` from there: neither
  the machine's settings nor our leftovers cross over;
- a ``/run/docker`` and a ``/run/containerd`` of its own, which dockerd and containerd's
  shims use whatever ``--exec-root`` says: so a system containerd (where ``make test``
  installed docker.io under systemd) is not picked up, and their sockets stay in the temp folder.

Nothing is created in ``/etc``: the docker.io package ships ``/etc/docker`` (its absence means
a broken install, an error here). ``/run/docker`` and ``/run/containerd`` are created empty
when missing and left so (a tmpfs, as the package's own daemon would leave them): removing a
folder that another session's engine has mounted over would detach that mount from under it.

The daemon reads ``certs.d`` again for every login, push and pull, so one engine serves a
whole session and a test adds the root of its own Pebble with :meth:`DockerEngine.trust`
once that Pebble runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import podman
from tests.support.clients import clean_env, write_hosts_file
from tests.support.lifecycle import StartStop

# The docker.io package's own client, the same version as its daemon: another client on
# PATH (e.g. a newer static one in /usr/local/bin) would make the tests depend on it.
DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
PACKAGE = "docker.io"
ETC_DOCKER = Path("/etc/docker")
# Machine folders shadowed by one of the engine's own (its name under the workdir).
SHADOWED = {
    ETC_DOCKER: "etc-docker",
    # dockerd's plugin sockets.
    Path("/run/docker"): "run-docker",
    # A system containerd's socket (dockerd would use it) and containerd-shim sockets.
    Path("/run/containerd"): "run-containerd",
}

START_TIMEOUT = 60.0
# Longer than dockerd's own --shutdown-timeout (15 s) for containers still running.
STOP_TIMEOUT = 60.0
DEFAULT_TIMEOUT = 120.0
LOG_TAIL_CHARS = 4000


class DockerError(AssertionError):
    """A docker command failed; the message holds the command and its output."""


class DockerEngine(StartStop):
    """dockerd under ``workdir`` in a private mount namespace, and a CLI that talks to it."""

    def __init__(self, workdir: Path, names: list[str]) -> None:
        """Describe an engine that resolves ``names`` to loopback; nothing runs until start()."""
        self.workdir = Path(workdir).resolve()
        self.names = list(names)
        self.data_root = self.workdir / "root"
        self.exec_root = self.workdir / "exec"
        self.pid_file = self.workdir / "dockerd.pid"
        self.socket = self.workdir / "docker.sock"
        self.shadows = {path: self.workdir / name for path, name in SHADOWED.items()}
        self.certs_d = self.shadows[ETC_DOCKER] / "certs.d"
        self.client_config = self.workdir / "client"
        self.hosts_file = self.workdir / "hosts"
        self.log_path = self.workdir / "dockerd.log"
        self.pid = 0
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> DockerEngine:
        missing = [tool for tool in (DOCKERD, DOCKER) if not os.access(tool, os.X_OK)]
        if not ETC_DOCKER.is_dir():
            missing.append(str(ETC_DOCKER))
        if missing:
            raise RuntimeError(f"{', '.join(missing)} missing: apt-get install {PACKAGE}")
        if self._process is not None:
            raise RuntimeError("dockerd already started")
        own = (self.data_root, self.exec_root, self.certs_d, self.client_config)
        for folder in (*own, *self.shadows.values()):
            folder.mkdir(parents=True, exist_ok=True)
        write_hosts_file(self.hosts_file, self.names)
        for mount_point in self.shadows:
            mount_point.mkdir(exist_ok=True)
        dockerd = [
            DOCKERD,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pid_file),
            "-H",
            f"unix://{self.socket}",
            "--storage-driver",
            "vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
        ]
        binds = {Path("/etc/hosts"): self.hosts_file, **self.shadows}
        mounts = [
            f"mount --bind {shlex.quote(str(o))} {shlex.quote(str(p))}" for p, o in binds.items()
        ]
        script = " && ".join([*mounts, f"exec {shlex.join(dockerd)}"])
        log = self.log_path.open("ab")
        try:
            # unshare execs sh, which execs dockerd: the child's pid is dockerd's.
            self._process = subprocess.Popen(
                ["unshare", "--mount", "sh", "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # The daemon does the registry traffic: a proxy would get "registry.test".
                env=clean_env(None),
            )
        finally:
            log.close()
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            if self.pid_file.is_file() and self.socket.exists():
                answer = self.docker("version", "--format", "{{.Server.Version}}", check=False)
                if answer.returncode == 0:
                    self.pid = int(self.pid_file.read_text().strip())
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd not up within {START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the pid in the pid file, then wait for dockerd to exit."""
        process = self._process
        if process is not None and process.poll() is None:
            pid = self.pid or self._pid_from_file() or process.pid
            os.kill(pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        self._process = None

    def _pid_from_file(self) -> int:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return ""

    # -- the CLI ---------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """What the ``docker`` CLI needs to talk to this engine alone."""
        return clean_env(
            {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.client_config)}
        )

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this engine; raise DockerError if ``check`` fails."""
        cmd = [DOCKER, *args]
        result = subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"{shlex.join(cmd)} exited {result.returncode}:\n"
                f"{result.stdout[-LOG_TAIL_CHARS:]}\n{result.stderr[-LOG_TAIL_CHARS:]}"
            )
        return result

    def docker_with_stdin(
        self,
        args: list[str],
        stdin_command: list[str],
        stdin_env: dict[str, str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """``stdin_command | docker ARGS``; raises DockerError if either side fails."""
        producer = subprocess.Popen(
            stdin_command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=stdin_env,
        )
        assert producer.stdout is not None and producer.stderr is not None
        try:
            result = subprocess.run(
                [DOCKER, *args],
                env=self.env,
                stdin=producer.stdout,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            producer.stdout.close()
            producer_err = producer.stderr.read().decode(errors="replace")
            producer.stderr.close()
            producer.wait(timeout=30)
        if producer.returncode != 0 or result.returncode != 0:
            raise DockerError(
                f"{shlex.join(stdin_command)} | docker {shlex.join(args)}: exited "
                f"{producer.returncode} | {result.returncode}:\n{producer_err[-LOG_TAIL_CHARS:]}"
                f"\n{result.stdout[-LOG_TAIL_CHARS:]}\n{result.stderr[-LOG_TAIL_CHARS:]}"
            )
        return result

    def inspect(self, name: str, template: str) -> str:
        """``docker inspect --format TEMPLATE NAME``, stripped."""
        return self.docker("inspect", "--format", template, name).stdout.strip()

    # -- registries and images -------------------------------------------------------------

    def trust(self, registry: str, root_pem: bytes) -> Path:
        """Trust ``root_pem`` for ``registry`` (``name:port``) from the next operation on."""
        ca_file = self.certs_d / registry / "ca.crt"
        ca_file.parent.mkdir(parents=True, exist_ok=True)
        ca_file.write_bytes(root_pem)
        return ca_file

    def load_from_podman(self, image: str, tag: str) -> str:
        """``podman save IMAGE | docker load`` (a docker-archive keeps the HEALTHCHECK), then
        ``docker tag IMAGE TAG``; returns ``tag``."""
        save = ["podman", *podman.GLOBAL_ARGS, "save", "--format", "docker-archive", image]
        self.docker_with_stdin(["load"], save, podman.podman_env(), timeout=600)
        self.docker("tag", image, tag)
        return tag


def temporary_engine(names: list[str]) -> tuple[DockerEngine, Path]:
    """An engine in a fresh folder under the system's temp dir (short socket paths)."""
    workdir = Path(tempfile.mkdtemp(prefix="acme-registry-docker-"))
    return DockerEngine(workdir, names), workdir


def remove_workdir(workdir: Path) -> None:
    """Delete an engine's folder once it is stopped (vfs keeps full copies of every layer)."""
    shutil.rmtree(workdir, ignore_errors=True)
