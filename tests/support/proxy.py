"""A TCP forwarder that holds each connection before passing it on: it makes the
"issuance in progress" window of a test last as long as the test needs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class DelayingProxy:
    def __init__(self, listen_port: int, target_port: int, delay: float) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.delay = delay
        self._server = socket.create_server(("127.0.0.1", listen_port))
        self._closed = False

    def start(self) -> DelayingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        time.sleep(self.delay)
        with client, contextlib.suppress(OSError):
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            with upstream:
                threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
                _pump(client, upstream)
                time.sleep(0.5)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
