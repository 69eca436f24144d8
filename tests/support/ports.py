"""Free TCP ports on loopback for servers the tests start.

A port the kernel hands out for ``bind(0)`` comes from its ephemeral range, which is also
where every outgoing connection of every process gets its local port. Between a test's choice
and its server's bind (or a server restarted on the same port after a kill), a connection
made by anything else (the other pytest part, a client, a container) could take it, and the
server fails with "address already in use". CI saw such a restart refuse connections for 30 s.

So ports come from below the ephemeral range, where no connection is ever given a local port,
and each is reserved for the whole life of the test process by a file under
:data:`RESERVATIONS` holding its pid: two pytest processes side by side (``make test``), or
two clones of the repository, never hand out the same one. A file whose pid is gone is
taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

RESERVATIONS = Path(os.environ.get("ACME_REGISTRY_TEST_PORTS_DIR", "/tmp/acme-registry-test-ports"))
# Below 20000 are the ports other software on a developer's machine likes to listen on.
LOWEST = 20000
_random = random.Random(os.urandom(16))  # pytest-randomly reseeds the global one per test


def _ephemeral_start() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, LOWEST + 1000)


@contextlib.contextmanager
def _reservation_lock() -> Iterator[None]:
    RESERVATIONS.mkdir(mode=0o777, parents=True, exist_ok=True)
    with open(RESERVATIONS / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(port: int, reuse_own: bool) -> bool:
    """Reserve ``port`` for this process unless a live process holds it (lock held)."""
    path = RESERVATIONS / str(port)
    try:
        holder = int(path.read_text().strip() or "0")
    except FileNotFoundError:
        holder = 0
    except ValueError:
        holder = 0
    if holder == os.getpid():
        return reuse_own
    if holder and _alive(holder):
        return False
    path.write_text(f"{os.getpid()}\n")
    return True


def _bindable(port: int, family: socket.AddressFamily, host: str, udp: bool) -> bool:
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _reserve(count: int, host: str, exclude: tuple[int, ...] = (), udp: bool = False) -> list[int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    top = _ephemeral_start()
    chosen: list[int] = []
    with _reservation_lock():
        # A port this process had before is handed out again only once the range is nearly
        # used up: a test may still restart a server on it.
        for attempt in range(20000):
            port = _random.randrange(LOWEST, top)
            if port in exclude or port in chosen:
                continue
            if _bindable(port, family, host, udp) and _claim(port, reuse_own=attempt >= 5000):
                chosen.append(port)
                if len(chosen) == count:
                    return chosen
    raise RuntimeError(f"no {count} free port(s) on {host} in {LOWEST}-{top - 1}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` and reserved for this test process (see the module's text)."""
    return _reserve(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", exclude: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports, none in ``exclude``."""
    return _reserve(count, host, exclude)


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP: DNS servers listen on both."""
    return _reserve(1, host, udp=True)[0]
