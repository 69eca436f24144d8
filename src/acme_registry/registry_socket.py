"""The registry's address, bound by the agent itself.

Bound at start, so that "this port cannot be bound" is found by the real bind, not a probe
that something else could race. It listens only just before the first registry generation
starts: a listening socket with nothing behind it accepts connections and leaves them hanging
through the first order or a backoff, and a load balancer's TCP check would call the replica
up. From then on, with socket activation, every generation serves on this one socket (handed
over by :class:`Handoff`), so old and new generations accept from one kernel queue and a
rotation refuses nothing. Without activation (registry 2.x) the socket is closed just before
the first generation starts, and the registry binds the address itself.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import threading
from pathlib import Path

from .listen import DEFAULT_BACKLOG, bind_address

log = logging.getLogger(__name__)


class RegistrySocket:
    """The bound address. With ``activation`` it listens before the first generation and
    every generation serves on it; without, it is released then for the registry to bind."""

    def __init__(self, sock: socket.socket, activation: bool) -> None:
        self._sock: socket.socket | None = sock
        self.activation = activation
        self.listening = False

    @classmethod
    def bind(cls, host: str, port: int, activation: bool) -> RegistrySocket:
        return cls(bind_address(host, port), activation)

    def prepare_for_first_generation(self) -> None:
        if self.activation:
            self.listen()
        else:
            self.release()

    def fileno(self) -> int:
        if self._sock is None:
            raise OSError(errno.EBADF, "the registry socket was released")
        return self._sock.fileno()

    def listen(self) -> None:
        """Start accepting into the kernel queue the generations serve from (idempotent)."""
        if self._sock is None:
            raise OSError(errno.EBADF, "the registry socket was released")
        if not self.listening:
            self._sock.listen(DEFAULT_BACKLOG)
            self.listening = True

    def release(self) -> None:
        """Give the address up, for a registry that binds it itself."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.listening = False

    close = release


class Handoff:
    """A unix socket (mode 0600 in the private run directory) that gives every client one
    copy of the registry's listening socket (SCM_RIGHTS), then hangs up.

    The clients are the generations' exec wrappers (:mod:`acme_registry.activation`); a
    generation that supervisord restarts after a crash gets the same socket again.
    """

    def __init__(self, path: Path, registry_socket: RegistrySocket) -> None:
        self.path = path
        self.registry_socket = registry_socket
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old_umask)
        server.listen(16)
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="registry-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() wakes the accept() blocked in the thread; close() alone does not.
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while (server := self._server) is not None:
            try:
                conn, _ = server.accept()
            except OSError:
                if self._server is None:
                    return
                continue
            with conn:
                try:
                    if not self.registry_socket.listening:
                        # A generation starts only after listen(); this is a bug, not a race.
                        log.error("a registry generation asked for the socket before listen()")
                        continue
                    fds = array.array("i", [self.registry_socket.fileno()])
                    conn.sendmsg([b"S"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                except OSError as error:
                    log.warning("could not hand the registry socket over: %s", error)
