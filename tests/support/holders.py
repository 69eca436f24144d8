"""Thousands of idle TCP clients that sent half a request, held open by a child process.

The child has a file table of its own, so a test can hold 10,000 connections against a server
in its own process without the two sides sharing one open-file limit. It connects ``count``
sockets to the server one after the other, sends each ``payload``, and then watches them all:
what each received, and when the server closed it (seconds after that socket's connect).

Run as ``python -m tests.support.holders HOST PORT COUNT PAYLOAD_HEX``; it prints one JSON
line once every socket is connected, then one per ``status`` line read on stdin, and exits
(closing every socket) at ``quit`` or the end of stdin. :class:`IdleClients` drives it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.lifecycle import StartStop

REPO = Path(__file__).resolve().parents[2]
# A connect() that finds the server's accept queue full waits for a SYN retry (1 s, 3 s...).
CONNECT_TIMEOUT = 30.0
_STARTUP_TIMEOUT = 180.0


@dataclass
class Status:
    """What the held connections saw so far."""

    connected: int  # connections that completed their handshake
    failed: int  # connects that failed (refused, timed out)
    open: int  # still open: nothing closed them yet
    closed: int  # closed by the server (EOF or reset)
    connect_seconds: float  # the time all connects took
    first_lines: dict[str, int]  # status line of what closed connections received -> count
    lifetimes: list[float]  # per closed connection: seconds from its connect to its close

    @classmethod
    def from_json(cls, line: str) -> Status:
        return cls(**json.loads(line))


class IdleClients(StartStop):
    """``count`` connections to ``host``:``port`` that each sent ``payload``, held by a child."""

    def __init__(self, host: str, port: int, count: int, payload: bytes) -> None:
        self.args = [host, str(port), str(count), payload.hex()]
        self.proc: subprocess.Popen[str] | None = None
        self.started: Status | None = None

    def start(self) -> Status:
        """Connect them all; returns once every connect finished (or failed)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.holders", *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.started = self._read(_STARTUP_TIMEOUT)
        return self.started

    def status(self, timeout: float = 60.0) -> Status:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def wait_closed(self, timeout: float) -> Status:
        """Poll until the server closed every held connection or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.open == 0 or time.monotonic() > deadline:
                return status
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _read(self, timeout: float) -> Status:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"the connection holder gave no answer within {timeout} s")
        return Status.from_json(line)


def raise_own_file_limit(needed: int) -> None:
    """Raise this process's soft open-file limit to ``needed`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- the child ---------------------------------------------------------------------------------


class _Held:
    __slots__ = ("answer", "closed_at", "connected_at", "sock")

    def __init__(self, sock: socket.socket, connected_at: float) -> None:
        self.sock = sock
        self.connected_at = connected_at
        self.closed_at: float | None = None
        self.answer = b""


def _connect_all(host: str, port: int, count: int, payload: bytes) -> tuple[list[_Held], int]:
    held: list[_Held] = []
    failed = 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect((host, port))
            connected_at = time.monotonic()
            sock.setblocking(False)
        except OSError:
            sock.close()
            failed += 1
            continue
        entry = _Held(sock, connected_at)
        held.append(entry)
        # A server that closes at once makes this fail; the watcher sees the close.
        with contextlib.suppress(OSError):
            sock.send(payload)
    return held, failed


def _status(held: list[_Held], failed: int, connect_seconds: float) -> dict[str, Any]:
    first_lines: dict[str, int] = {}
    lifetimes = []
    for entry in held:
        if entry.closed_at is None:
            continue
        lifetimes.append(round(entry.closed_at - entry.connected_at, 4))
        first = entry.answer.split(b"\r\n", 1)[0].decode("latin-1") if entry.answer else ""
        first_lines[first] = first_lines.get(first, 0) + 1
    closed = len(lifetimes)
    return {
        "connected": len(held),
        "failed": failed,
        "open": len(held) - closed,
        "closed": closed,
        "connect_seconds": round(connect_seconds, 3),
        "first_lines": first_lines,
        "lifetimes": lifetimes,
    }


def _watch(held: list[_Held], failed: int, connect_seconds: float) -> None:
    poller = select.poll()
    by_fd = {entry.sock.fileno(): entry for entry in held}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    stdin = sys.stdin.fileno()
    poller.register(stdin, select.POLLIN)
    pending = b""
    while True:
        for fd, _ in poller.poll(100):
            if fd == stdin:
                data = os.read(stdin, 4096)
                pending += data
                while b"\n" in pending or not data:
                    line, _, pending = pending.partition(b"\n")
                    if not data or line.strip() == b"quit":
                        return
                    if line.strip() == b"status":
                        print(json.dumps(_status(held, failed, connect_seconds)), flush=True)
                continue
            entry = by_fd[fd]
            try:
                chunk = entry.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                    raise
                chunk = b""
            if chunk:
                entry.answer += chunk
                continue
            entry.closed_at = time.monotonic()
            poller.unregister(fd)
            entry.sock.close()


def main(argv: list[str]) -> int:
    host, port, count, payload = argv[0], int(argv[1]), int(argv[2]), bytes.fromhex(argv[3])
    raise_own_file_limit(count + 64)
    started = time.monotonic()
    held, failed = _connect_all(host, port, count, payload)
    connect_seconds = time.monotonic() - started
    print(json.dumps(_status(held, failed, connect_seconds)), flush=True)
    _watch(held, failed, connect_seconds)
    for entry in held:
        entry.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
