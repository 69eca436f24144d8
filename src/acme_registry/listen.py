"""Listening sockets for the agent's own servers, and the open-file limit they live within."""

from __future__ import annotations

import errno
import logging
import resource
import socket

log = logging.getLogger(__name__)

# The kernel silently caps a listen() backlog at net.core.somaxconn (4096 on current kernels),
# so asking for that much costs nothing and lets a burst of connects wait in the kernel's queue
# instead of being dropped while the server is busy.
DEFAULT_BACKLOG = 4096
_NR_OPEN = "/proc/sys/fs/nr_open"


def bind_address(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` but not yet listening (``port`` 0 picks one).

    ``host`` "" is every address: dual-stack ``::`` (IPv6 and IPv4 on one socket), or IPv4's
    ``0.0.0.0`` only when this machine has no IPv6. ``[v6]`` may be written with brackets.
    Any other failure (the port is in use, not allowed) is raised, never papered over.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return _bound(family, address)
    if socket.has_dualstack_ipv6():
        try:
            return _bound(socket.AF_INET6, ("::", port), dualstack=True)
        except OSError as exc:
            # Only "this machine has no IPv6" falls back; "port in use" must stay an error.
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            log.info("IPv6 unavailable (%s); listening on IPv4 only", exc)
    return _bound(socket.AF_INET, ("0.0.0.0", port))


def bind_tcp(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A bound, listening TCP socket on ``host``:``port``; see :func:`bind_address`."""
    sock = bind_address(host, port)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bound(family: int, address: tuple[object, ...], dualstack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As Go's net.Listen does: a restart can bind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def open_file_limit() -> int:
    """The current soft limit on open files (RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one, as Go programs do at start; the new limit.

    A container's soft limit is often 1024, and every connection held on port 80 is one file:
    a limit that low would let a few hundred idle connections use up the process's files.
    The hard limit is the operator's ceiling and is left alone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite RLIMIT_NOFILE; fs.nr_open is the real ceiling.
        try:
            with open(_NR_OPEN) as limit:
                target = int(limit.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft >= target:
        log.debug("open-file limit %d (already the hard limit)", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.debug("open-file limit stays %d: cannot raise it to %d (%s)", soft, target, exc)
        return soft
    log.debug("open-file limit raised from %d to %d", soft, target)
    return target
