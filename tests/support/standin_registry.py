#!/usr/bin/env python3
"""A stand-in for registry 3.x where only 2.8.2 is installed: what socket activation needs.

Run as REGISTRY_BINARY. ``--version`` prints what a 3.x release prints; ``serve CONFIG``
reads the (JSON) config the agent writes and serves HTTPS with its http.tls pair:

- on the inherited fd 3 when LISTEN_FDS=1 and LISTEN_PID is this process (as go-systemd's
  ``activation.Listeners()`` requires; the variables are then unset), else on http.addr;
- every GET answers 200 ``{}`` (so /v2/ and the load client's manifest path), one request
  per connection;
- on SIGTERM (as the registry with http.draintimeout does) it stops accepting, finishes the
  requests it accepted, and exits 0.

Standard library only, and nothing from the product: it stands for a binary we do not own.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
from typing import Any

VERSION = "github.com/distribution/distribution/v3 v3.1.1+standin"
LISTEN_FD = 3


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing idles in a drain

    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would be most of the I/O under load


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = False  # server_close() waits for requests in progress: the drain
    block_on_close = True

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.context = context

    def get_request(self) -> tuple[socket.socket, Any]:
        # Non-blocking: another generation on the same socket may take the connection
        # between select() and accept(); BlockingIOError is then ignored by socketserver.
        conn, addr = self.socket.accept()
        conn.settimeout(10)
        return conn, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the request's thread, never in the accept loop.
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def inherited_socket() -> socket.socket | None:
    if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socket.socket(fileno=LISTEN_FD)


def bound_socket(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host or not host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and not host:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host or "::", int(port)))
    sock.listen(4096)
    return sock


def serve(config_path: str) -> int:
    with open(config_path, encoding="utf-8") as config_file:
        config = json.load(config_file)
    http_config = config["http"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(http_config["tls"]["certificate"], http_config["tls"]["key"])
    sock = inherited_socket()
    if sock is None:
        sock = bound_socket(http_config["addr"])
        print(f"standin-registry: listening on {http_config['addr']}", flush=True)
    else:
        print("standin-registry: serving on the inherited socket (LISTEN_FDS=1)", flush=True)
    sock.setblocking(False)
    server = Server(sock, context)

    def on_sigterm(signum: int, frame: object) -> None:
        print("standin-registry: SIGTERM: draining", flush=True)
        # shutdown() waits for serve_forever() to return: not from its own thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    server.serve_forever(poll_interval=0.005)
    server.server_close()  # closes our copy of the listener, then joins requests in flight
    print("standin-registry: drained, exiting 0", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[1:2] in (["--version"], ["-v"]):
        print(f"{argv[0]} {VERSION}")
        return 0
    if len(argv) == 3 and argv[1] == "serve":
        return serve(argv[2])
    print(f"usage: {argv[0]} serve CONFIG | --version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
