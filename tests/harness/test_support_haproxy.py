"""tests/support/haproxy.py: round-robin over real listeners, and a server taken out."""

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.haproxy import HAProxy


class _Named(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.server.name)  # type: ignore[attr-defined]


@pytest.fixture
def servers() -> Iterator[list[socketserver.ThreadingTCPServer]]:
    started = []
    for name in (b"one", b"two"):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Named)
        server.daemon_threads = True
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(16)


def test_round_robin_and_a_server_taken_out(tmp_path: Path, servers) -> None:  # type: ignore[no-untyped-def]
    ports = [s.server_address[1] for s in servers]
    with HAProxy(tmp_path, {"front": ports}) as proxy:
        answers = {ask(proxy.ports["front"]) for _ in range(6)}
        assert answers == {b"one", b"two"}
        proxy.disable("front", 1)
        assert proxy.server_states("front")["r1"] == "MAINT"
        assert {ask(proxy.ports["front"]) for _ in range(6)} == {b"two"}
        proxy.enable("front", 1)
        assert {ask(proxy.ports["front"]) for _ in range(6)} == {b"one", b"two"}
