"""Socket activation of the registry: which binaries take an inherited socket, and the
small exec wrapper that gives one to each generation.

Registry 3.x serves on an inherited listening socket (systemd socket activation: go-systemd
``activation.Listeners()``, exactly one socket on fd 3, ``LISTEN_FDS=1`` and ``LISTEN_PID``
equal to its own pid; ``http.addr`` is then ignored, TLS still applies). 2.x does not.

Why a wrapper that fetches the socket over a unix socket (SCM_RIGHTS), rather than
supervisord's ``[fcgi-program:x]`` shared ``socket=``: supervisord binds that socket itself
when it starts, before the agent knows whether it has a certificate, so the port would accept
connections and hang them through the first order or a backoff (and a load balancer's TCP
check would call the replica up); and it closes the socket whenever no process of the group
runs, so a crash of the serving generation would refuse connections until the restart. The
agent instead binds at start (an exact "cannot be bound" error), listens just before the
first generation starts and holds the socket for as long as it runs. supervisord closes every
descriptor above 2 in its children, so the socket cannot simply be inherited: the wrapper
asks the agent for it, moves it to fd 3, sets ``LISTEN_FDS``/``LISTEN_PID`` to its own pid
and execs the registry, which keeps that pid.

The wrapper runs as ``python -I -m acme_registry.activation HANDOFF BINARY ARGS...`` and
imports nothing beyond the standard library, so it costs a few milliseconds per generation.
"""

from __future__ import annotations

import array
import os
import re
import socket
import sys
from dataclasses import dataclass

# The Go module path: github.com/distribution/distribution/v3 for 3.x (a major version from 2
# up ends the path in /vN), github.com/docker/distribution for 2.x. Then the version.
_VERSION_LINE = re.compile(
    r"(?P<package>github\.com/[\w.-]+/distribution(?:/v(?P<module_major>\d+))?)"
    r"(?:\s+(?P<version>\S+))?"
)
_MAJOR = re.compile(r"v?(\d+)\.\d+")
LISTEN_FD = 3  # SD_LISTEN_FDS_START
HANDOFF_TIMEOUT = 10.0


@dataclass(frozen=True)
class RegistryVersion:
    package: str
    version: str
    major: int

    @property
    def socket_activation(self) -> bool:
        """Whether this release serves on an inherited socket (3.0.0 and later)."""
        return self.major >= 3

    def describe(self) -> str:
        return f"{self.package} {self.version}"


def parse_version(output: str) -> RegistryVersion | None:
    """``registry --version`` output -> the release, or None when it is not recognisable.

    3.x prints ``registry github.com/distribution/distribution/v3 v3.1.1``; Debian's 2.8
    prints ``docker-registry github.com/docker/distribution 2.8.2+ds1``.
    """
    match = _VERSION_LINE.search(output)
    if match is None:
        return None
    version = match["version"] or ""
    numbered = _MAJOR.match(version)
    # The module path is compiled in; a version string may be rewritten by a packager, or
    # be "(devel)" in a local build.
    if match["module_major"] is not None:
        major = int(match["module_major"])
    elif numbered is not None:
        major = int(numbered[1])
    else:
        return None
    return RegistryVersion(match["package"], version or "(no version)", major)


class ActivationUnsupported(ValueError):
    """``REGISTRY_SOCKET_ACTIVATION=on`` with a binary that has no socket activation."""


def choose(mode: str, version: RegistryVersion | None) -> bool:
    """Whether generations get the agent's socket: ``mode`` is auto, on or off.

    ``auto`` uses activation only for a release known to have it; an unrecognisable
    ``--version`` keeps the FIFO handover, which works with every release. ``on`` trusts the
    operator unless the binary says it is 2.x, which would ignore the socket and bind the
    port itself (and fail: the agent holds it).
    """
    if mode == "off":
        return False
    if mode == "on":
        if version is not None and not version.socket_activation:
            raise ActivationUnsupported(
                f"on, but the registry binary is {version.describe()}: only 3.x serves on an "
                "inherited socket (use auto or off)"
            )
        return True
    return version is not None and version.socket_activation


def binary_version(binary: str, timeout: float = 10.0) -> str:
    """What ``binary --version`` prints ("" when it cannot run)."""
    import subprocess

    try:
        done = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            # 3.x initialises OpenTelemetry from the environment even for --version.
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def receive_socket(handoff_path: str, timeout: float = HANDOFF_TIMEOUT) -> int:
    """Ask the agent on ``handoff_path`` for the registry's listening socket; returns its fd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(handoff_path)
        fds = array.array("i")
        _, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(fds) != 1:
        raise OSError(f"{handoff_path} handed over {len(fds)} descriptors, not 1")
    return fds[0]


def exec_with_socket(handoff_path: str, argv: list[str]) -> None:
    """Receive the socket, put it on fd 3 as socket activation expects, exec ``argv``."""
    fd = receive_socket(handoff_path)
    if fd != LISTEN_FD:
        os.dup2(fd, LISTEN_FD)  # inheritable, unlike the received descriptor
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    env = dict(os.environ)
    # exec keeps the pid, so this is the registry's own pid, as LISTEN_PID must be.
    env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    env.pop("LISTEN_FDNAMES", None)
    os.execve(argv[0], argv, env)


def main(args: list[str]) -> int:
    if len(args) < 2:
        print("usage: python -m acme_registry.activation HANDOFF BINARY [ARGS...]", file=sys.stderr)
        return 2
    try:
        exec_with_socket(args[0], args[1:])
    except OSError as error:
        print(f"acme-registry: no listening socket for the registry: {error}", file=sys.stderr)
        return 1
    return 1  # not reached: execve returned


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
