"""Free TCP ports on loopback for servers the tests start."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free on ``host`` a moment ago.

    The port is released before returning, so another process may take it before the caller
    binds it; servers started by the tests fail fast with "address already in use" in that case.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1", exclude: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports, none in ``exclude``.

    Each socket stays bound until all are chosen: calling free_port() twice can return the
    same port, since the kernel may hand a just-released port out again.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            if sock.getsockname()[1] in exclude:
                sock.close()
                continue
            held.append(sock)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """Return a port free for both TCP and UDP: DNS servers listen on both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        port = free_port(host)
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host}")
