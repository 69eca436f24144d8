"""The agent's control socket: a unix socket in DATA_DIR, never the network.

One JSON request per connection (``{"command": "health"}``), one JSON answer. The CLI's
``health``, ``status`` and ``renew`` commands use it; ``docker exec`` reaches it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        handlers = self.handlers

        class Connection(socketserver.StreamRequestHandler):
            timeout = 10

            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST)
                try:
                    request = json.loads(line)
                    handler = handlers[request["command"]]
                    answer = handler(request)
                except (ValueError, KeyError, TypeError):
                    answer = {"ok": False, "error": "unknown or malformed request"}
                except Exception as error:  # an answer, not a dead agent
                    log.exception("control request failed")
                    answer = {"ok": False, "error": str(error)}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        old_umask = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Connection)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="control", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, command: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
    """Ask the running agent; OSError when it does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        raise OSError("the agent sent no answer") from None
    if not isinstance(answer, dict):
        raise OSError("the agent sent a malformed answer")
    return answer
