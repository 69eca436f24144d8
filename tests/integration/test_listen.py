"""The listening-socket helper and the open-file limit, on real sockets and real processes."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from acme_registry import listen
from acme_registry.listen import DEFAULT_BACKLOG, bind_tcp


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def connects(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return False
    return True


def test_a_specific_address_is_bound_and_listening():
    with bind_tcp("127.0.0.1", 0) as listener:
        host, port = listener.getsockname()[:2]
        assert host == "127.0.0.1" and port != 0
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert connects("127.0.0.1", port)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_every_address_is_one_dual_stack_socket():
    with bind_tcp("", 0) as listener:
        assert listener.family == socket.AF_INET6
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = listener.getsockname()[1]
        assert connects("::1", port) and connects("127.0.0.1", port)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_brackets_around_an_ipv6_address_are_stripped():
    with bind_tcp("[::1]", 0) as listener:
        assert listener.getsockname()[0] == "::1"
        assert not connects("127.0.0.1", listener.getsockname()[1])


@pytest.mark.parametrize("code", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
def test_every_address_falls_back_to_ipv4_only_without_ipv6(monkeypatch, code):
    real = listen._bound

    def no_ipv6(family, address, dualstack=False):
        if family == socket.AF_INET6:
            raise OSError(code, "no IPv6 here")
        return real(family, address, dualstack)

    monkeypatch.setattr(listen, "_bound", no_ipv6)
    with bind_tcp("", 0) as listener:
        assert listener.family == socket.AF_INET
        assert connects("127.0.0.1", listener.getsockname()[1])


def test_a_port_in_use_is_an_error_not_a_fallback():
    with bind_tcp("", 0) as taken:
        with pytest.raises(OSError) as raised:
            bind_tcp("", taken.getsockname()[1]).close()
        assert raised.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError):
            bind_tcp("127.0.0.1", taken.getsockname()[1]).close()


def test_the_backlog_is_large():
    # On Linux the backlog of a listening socket shows in its receive queue limit (ss -l).
    with bind_tcp("127.0.0.1", 0) as listener:
        port = listener.getsockname()[1]
        ss = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        )
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(ss.stdout.split()[2]) == min(DEFAULT_BACKLOG, somaxconn)


RAISE = """
import json, resource
from acme_registry.listen import raise_open_file_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
raised = raise_open_file_limit()
again = raise_open_file_limit()
print(json.dumps([hard, raised, again, resource.getrlimit(resource.RLIMIT_NOFILE)]))
"""


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    # In a child: the limit is the process's own.
    out = subprocess.run(
        [sys.executable, "-c", RAISE], capture_output=True, text=True, check=True
    ).stdout
    hard, raised, again, (soft_now, hard_now) = json.loads(out)
    assert raised == again == soft_now == hard
    assert hard_now == hard
