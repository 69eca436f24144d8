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
import stat
from collections.abc import Iterator
from pathlib import Path

RESERVATIONS = Path(
    os.environ.get("ACME_REGISTRY_TEST_PORTS_DIR", f"/tmp/acme-registry-test-ports-{os.getuid()}")
)
# Below 20000 are the ports other software on a developer's machine likes to listen on; on a
# machine whose ephemeral range starts low, the 8000 ports below it are used instead.
LOWEST = 20000
RANGE_AT_LEAST = 8000
# A port this process had before is handed out again only after this many tries at a new
# one: the range is then nearly used up (about 800 ports make one pytest part here).
TRIES_BEFORE_REUSE = 5000
_random = random.Random(os.urandom(16))  # pytest-randomly reseeds the global one per test


def port_range() -> tuple[int, int]:
    """[lowest, highest + 1) of the ports handed out: just below the ephemeral range."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return max(1024, min(LOWEST, ephemeral - RANGE_AT_LEAST)), ephemeral


@contextlib.contextmanager
def _reservation_lock() -> Iterator[None]:
    RESERVATIONS.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(RESERVATIONS)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{RESERVATIONS} is not a folder of this user's: remove it")
    with open(RESERVATIONS / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holder(port: int) -> int:
    try:
        return int((RESERVATIONS / str(port)).read_text().strip() or "0")
    except (FileNotFoundError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claimable(port: int, reuse_own: bool) -> bool:
    """Whether ``port`` may be reserved for this process: no live process holds it (or only
    this one, with ``reuse_own``). The lock is held."""
    holder = _holder(port)
    if holder == os.getpid():
        return reuse_own
    return not (holder and _alive(holder))


def _claim(port: int) -> None:
    (RESERVATIONS / str(port)).write_text(f"{os.getpid()}\n")


def release(*ports: int) -> None:
    """Give back ports this process reserved and will not use (another may take them)."""
    with _reservation_lock():
        for port in ports:
            if _holder(port) == os.getpid():
                (RESERVATIONS / str(port)).unlink(missing_ok=True)


def _bindable(port: int, family: socket.AddressFamily, host: str, udp: bool) -> bool:
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _reserve(
    count: int, host: str, exclude: tuple[int, ...] = (), udp: bool = False, offset: int = 0
) -> list[int]:
    """``count`` ports; with ``offset``, each port ``p`` also has ``p + offset`` reserved."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lowest, top = port_range()
    chosen: list[int] = []
    taken: set[int] = set(exclude)
    with _reservation_lock():
        for attempt in range(4 * TRIES_BEFORE_REUSE):
            port = _random.randrange(lowest, top - offset)
            group = (port, port + offset) if offset else (port,)
            if taken.intersection(group):
                continue
            if not all(_bindable(p, family, host, udp) for p in group):
                continue
            reuse = attempt >= TRIES_BEFORE_REUSE
            if not all(_claimable(p, reuse) for p in group):
                continue
            for p in group:
                _claim(p)
            chosen.append(port)
            taken.update(group)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port(s) on {host} in {lowest}-{top - 1}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` and reserved for this test process (see the module's text)."""
    return _reserve(1, host)[0]


def free_ports(
    count: int, host: str = "127.0.0.1", exclude: tuple[int, ...] = (), offset: int = 0
) -> list[int]:
    """``count`` distinct free ports, none in ``exclude``; with ``offset``, ``p + offset``
    is free and reserved too for each (a server that also listens there: weed's gRPC)."""
    return _reserve(count, host, exclude, offset=offset)


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP: DNS servers listen on both."""
    return _reserve(1, host, udp=True)[0]
