"""The port-80 responder: ACME HTTP-01 challenges, and a redirect to HTTPS for everything else.

This listener faces the public internet, so it is a deliberately small HTTP/1.x server of its
own rather than ``http.server``: every request head is read under one total deadline and hard
size limits, exactly one request is served per connection, and nothing from the request reaches
a response header unless it has been validated first.

* ``GET``/``HEAD /.well-known/acme-challenge/<token>`` answers ``lookup(token)`` verbatim (200),
  or 404. The path is never mapped to the filesystem.
* Any other ``GET``/``HEAD`` is redirected (301) to ``https://<domain><path>``, where ``<domain>``
  is always one of the configured names, so the redirect cannot be aimed elsewhere.
* Other methods get 405; malformed or oversized requests get 400, 414 or 431; never a 5xx.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from email.utils import formatdate

log = logging.getLogger(__name__)

TokenLookup = Callable[[str], str | None]
"""Maps a challenge token to its key authorization; ``None`` when no such challenge is pending."""

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
MAX_REQUEST_LINE = 4096
MAX_HEADER_BYTES = 8192
MAX_HEADER_LINES = 64
DEFAULT_MAX_CONNECTIONS = 256

_SERVER = "acme-registry"
_ALLOW = "GET, HEAD"
_RECV_SIZE = 4096
# After answering, unread request bytes (a body, the rest of an oversized head) are drained for
# a moment so that closing does not send a TCP reset that could destroy the answer in flight.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 64 * 1024
# accept() failing for lack of file descriptors would otherwise spin the accept loop.
_ACCEPT_BACKOFF_SECONDS = 0.1
_DROP_WARNING_INTERVAL = 10.0

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_NAME = _METHOD
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
# Visible ASCII only: this excludes spaces, control characters (CR, LF, NUL, ...) and non-ASCII
# bytes, which is what makes the target safe to copy into a Location header.
_TARGET = re.compile(rb"[\x21-\x7e]+")
_ABSOLUTE_FORM = re.compile(r"https?://", re.IGNORECASE)
# Field values may hold HTAB and obs-text but no other control characters (CR, LF, NUL, DEL).
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DOMAIN = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)

_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


class _Reject(Exception):
    """The request cannot be served; answer ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Timeout(Exception):
    """The request head did not arrive within the deadline."""


class _Closed(Exception):
    """The peer went away; there is nobody left to answer."""


class _Request:
    __slots__ = ("body_announced", "host", "method", "target", "version")

    def __init__(self, method: str, target: str, version: str) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.host: str | None = None
        self.body_announced = False


class _Run:
    """The sockets and threads of one start()..stop() cycle."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        # Writing to wake_w interrupts the accept thread's select() when stopping.
        self.wake_r, self.wake_w = socket.socketpair()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.active: set[socket.socket] = set()
        self.active_lock = threading.Lock()


class ChallengeResponder:
    """Serves HTTP-01 challenges for ``domains`` on ``port``; see the module docstring.

    ``host`` "" listens on every IPv6 and IPv4 address; any other value binds only that address.
    ``read_timeout`` bounds the time a client has for its whole request head.
    ``max_connections`` caps the connections served at once; further ones are closed at once.
    """

    def __init__(
        self,
        domains: Sequence[str],
        lookup: TokenLookup,
        port: int,
        host: str = "",
        *,
        read_timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if isinstance(domains, str):
            raise TypeError("domains must be a sequence of names, not one string")
        names = [_normalise_host(name) for name in domains]
        if not names:
            raise ValueError("at least one domain is required")
        for name in names:
            # The names end up in Location headers, so only plain DNS names are acceptable.
            if len(name) > 253 or not _DOMAIN.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid DNS name")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
        if read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._domains = tuple(dict.fromkeys(names))
        self._lookup = lookup
        self._requested_port = port
        self._host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._read_timeout = float(read_timeout)
        self._max_connections = max_connections

        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._bound_port: int | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._last_drop_warning = -_DROP_WARNING_INTERVAL

    @property
    def port(self) -> int:
        """The bound port once started (``port=0`` picks a free one); the requested one before."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains

    def start(self) -> None:
        """Bind, listen and serve from daemon threads; returns once connections are accepted."""
        with self._lock:
            if self._run is not None:
                raise RuntimeError("the challenge responder is already running")
            listener = self._bind()
            try:
                listener.setblocking(False)
                run = _Run(listener)
            except OSError:
                listener.close()
                raise
            self._bound_port = int(listener.getsockname()[1])
            run.thread = threading.Thread(
                target=self._accept_loop,
                args=(run,),
                name=f"acme-http01:{self._bound_port}",
                daemon=True,
            )
            try:
                run.thread.start()
            except BaseException:
                for sock in (listener, run.wake_r, run.wake_w):
                    sock.close()
                raise
            self._run = run
        log.info(
            "HTTP-01 responder listening on %s port %d",
            self._host or "every address",
            self._bound_port,
        )

    def stop(self) -> None:
        """Stop accepting, close the listener and cut open connections. Safe to call twice."""
        with self._lock:
            run, self._run = self._run, None
        if run is None:
            return
        run.stopping.set()
        with contextlib.suppress(OSError):
            run.wake_w.send(b"x")
        # Joined outside self._lock: the accept thread may be waiting for a lock of its own.
        if run.thread is not None and run.thread is not threading.current_thread():
            run.thread.join(timeout=5.0)
        for sock in (run.listener, run.wake_r, run.wake_w):
            sock.close()
        with run.active_lock:
            active = list(run.active)
        # Shutting the sockets down wakes their threads out of recv(); the threads close them.
        for conn in active:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        log.info("HTTP-01 responder on port %d stopped", self._bound_port)

    # -- listening -------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        if self._host:
            infos = socket.getaddrinfo(
                self._host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, address = infos[0]
            return socket.create_server(address, family=family, backlog=128)
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(
                    ("::", self._requested_port),
                    family=socket.AF_INET6,
                    backlog=128,
                    dualstack_ipv6=True,
                )
            except OSError as exc:
                # Only "this machine has no IPv6" falls back; "port in use" must stay an error.
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                log.info("IPv6 unavailable (%s); listening on IPv4 only", exc)
        return socket.create_server(("0.0.0.0", self._requested_port), backlog=128)

    def _accept_loop(self, run: _Run) -> None:
        listener, stopping = run.listener, run.stopping
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(run.wake_r, selectors.EVENT_READ)
            while not stopping.is_set():
                try:
                    selector.select()
                    if stopping.is_set():
                        return
                    conn, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if stopping.is_set():
                        return
                    log.warning("HTTP-01 responder: accept failed: %s", exc)
                    time.sleep(_ACCEPT_BACKOFF_SECONDS)
                    continue
                try:
                    self._dispatch(run, conn, peer)
                except Exception:  # the listener must outlive any one connection
                    log.warning("HTTP-01 responder: could not serve %s", peer[0], exc_info=True)
                    conn.close()

    def _dispatch(self, run: _Run, conn: socket.socket, peer: tuple[object, ...]) -> None:
        if not self._slots.acquire(blocking=False):
            conn.close()
            # A flood must not turn into a flood of log lines too: one warning per interval.
            now = time.monotonic()
            if now - self._last_drop_warning >= _DROP_WARNING_INTERVAL:
                self._last_drop_warning = now
                log.warning(
                    "HTTP-01 responder: %d connections open; dropping new ones (from %s)",
                    self._max_connections,
                    peer[0],
                )
            return
        with run.active_lock:
            run.active.add(conn)
        try:
            threading.Thread(
                target=self._serve_connection,
                args=(run, conn, str(peer[0])),
                name="acme-http01-conn",
                daemon=True,
            ).start()
        except RuntimeError:  # the interpreter could not start a thread
            self._forget(run, conn)
            conn.close()

    def _forget(self, run: _Run, conn: socket.socket) -> None:
        with run.active_lock:
            run.active.discard(conn)
        self._slots.release()

    # -- one connection, one request ------------------------------------------------------

    def _serve_connection(self, run: _Run, conn: socket.socket, peer: str) -> None:
        try:
            with conn:
                self._serve(conn, peer)
        except Exception:  # one bad connection must never take anything else down
            log.warning("HTTP-01 responder: unexpected error serving %s", peer, exc_info=True)
        finally:
            self._forget(run, conn)

    def _serve(self, conn: socket.socket, peer: str) -> None:
        reader = _HeadReader(conn, time.monotonic() + self._read_timeout)
        try:
            request = reader.read_request()
        except _Closed:
            return
        except _Timeout:
            log.debug("HTTP-01 responder: %s timed out sending a request head", peer)
            if reader.received:
                self._send(conn, 408, head_only=False)
            return
        except _Reject as rejected:
            log.debug("HTTP-01 responder: rejected a request from %s: %d", peer, rejected.status)
            self._send(conn, rejected.status, head_only=False)
            _linger(conn)
            return

        self._answer(conn, peer, request)
        if request.body_announced or reader.leftover:
            _linger(conn)

    def _answer(self, conn: socket.socket, peer: str, request: _Request) -> None:
        head_only = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            self._send(conn, 405, head_only=False, headers=[("Allow", _ALLOW)])
            return
        try:
            path_and_query = _normalise_target(request.target)
        except _Reject as rejected:
            self._send(conn, rejected.status, head_only=head_only)
            return
        path = path_and_query.partition("?")[0]

        if path == CHALLENGE_PREFIX.rstrip("/") or path.startswith(CHALLENGE_PREFIX):
            token = path[len(CHALLENGE_PREFIX) :]
            body = self._key_authorization(token, peer) if _TOKEN.fullmatch(token) else None
            if body is None:
                self._send(conn, 404, head_only=head_only)
            else:
                self._send(conn, 200, head_only=head_only, body=body)
            return

        location = f"https://{self._redirect_host(request.host)}{path_and_query}"
        log.debug("HTTP-01 responder: redirecting %s to %.200s", peer, location)
        self._send(conn, 301, head_only=head_only, headers=[("Location", location)])

    def _key_authorization(self, token: str, peer: str) -> bytes | None:
        short = token[:8] + ("..." if len(token) > 8 else "")
        try:
            answer = self._lookup(token)
        except Exception:
            log.warning("HTTP-01 responder: token lookup failed for %s", short, exc_info=True)
            return None
        if answer is None:
            log.info("HTTP-01 challenge %s requested by %s: not pending", short, peer)
            return None
        if not isinstance(answer, str):
            log.warning("HTTP-01 responder: lookup gave %s, not str", type(answer).__name__)
            return None
        try:
            body = answer.encode("utf-8")
        except UnicodeEncodeError:
            log.warning("HTTP-01 responder: key authorization for %s is not encodable", short)
            return None
        log.info("HTTP-01 challenge %s served to %s", short, peer)
        return body

    def _redirect_host(self, requested: str | None) -> str:
        if requested is not None:
            name = _normalise_host(_strip_port(requested))
            if name in self._domains:
                return name
        return self._domains[0]

    def _send(
        self,
        conn: socket.socket,
        status: int,
        *,
        head_only: bool,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> None:
        reason = _REASONS[status]
        if body is None:
            body = f"{status} {reason}\n".encode("ascii")
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: {_SERVER}",
            f"Date: {formatdate(usegmt=True)}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        # The answer is small enough for the socket buffer, so this only waits on a dead peer.
        with contextlib.suppress(OSError):
            conn.settimeout(self._read_timeout)
            conn.sendall(head if head_only else head + body)


class _HeadReader:
    """Reads one request head from ``conn`` under a total deadline and the size limits."""

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self._conn = conn
        self._deadline = deadline
        self._buffer = bytearray()
        self.received = 0

    @property
    def leftover(self) -> bool:
        return bool(self._buffer)

    def read_request(self) -> _Request:
        line = self._read_line(MAX_REQUEST_LINE, 414)
        # RFC 9112 section 2.2: empty lines before the request line are to be ignored.
        skipped = 0
        while not line:
            skipped += 1
            if skipped > 4:
                raise _Reject(400)
            line = self._read_line(MAX_REQUEST_LINE, 414)
        request = _parse_request_line(line)

        header_bytes = 0
        header_lines = 0
        hosts: list[bytes] = []
        while True:
            # Each field line counts with its CRLF; the empty line that ends the head does not.
            line = self._read_line(max(MAX_HEADER_BYTES - header_bytes - 2, 0), 431)
            if not line:
                break
            header_bytes += len(line) + 2
            header_lines += 1
            if header_bytes > MAX_HEADER_BYTES or header_lines > MAX_HEADER_LINES:
                raise _Reject(431)
            name, value = _parse_header_line(line)
            if name == b"host":
                hosts.append(value)
            elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                request.body_announced = True

        if len(hosts) > 1:
            raise _Reject(400)
        if hosts:
            request.host = hosts[0].decode("latin-1")
        return request

    def _read_line(self, limit: int, status: int) -> bytes:
        """One line without its CRLF (or bare LF); ``status`` when it would exceed ``limit``."""
        while True:
            end = self._buffer.find(b"\n", 0, limit + 2)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > limit:
                    raise _Reject(status)
                return line
            if len(self._buffer) > limit + 1:
                raise _Reject(status)
            self._fill()

    def _fill(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        try:
            self._conn.settimeout(remaining)
            chunk = self._conn.recv(_RECV_SIZE)
        except TimeoutError:
            raise _Timeout from None
        except OSError:
            raise _Closed from None
        if not chunk:
            # A client that half-closed mid-head still deserves to know why nothing happens.
            raise _Reject(400) if self.received else _Closed
        self.received += len(chunk)
        self._buffer += chunk


def _parse_request_line(line: bytes) -> _Request:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _Reject(400)
    method, target, version = parts
    if not _METHOD.fullmatch(method) or not _VERSION.fullmatch(version):
        raise _Reject(400)
    if not _TARGET.fullmatch(target):
        raise _Reject(400)
    return _Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"))


def _parse_header_line(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    # No whitespace before the colon and no obsolete line folding (RFC 9112 sections 5.1, 5.2).
    if not colon or not _HEADER_NAME.fullmatch(name):
        raise _Reject(400)
    value = value.strip(b" \t")
    if _BAD_FIELD_VALUE.search(value):
        raise _Reject(400)
    return name.lower(), value


def _normalise_target(target: str) -> str:
    """The path and query to redirect to, always starting with exactly one ``/``."""
    if _ABSOLUTE_FORM.match(target):
        # Only the path and query of an absolute-form target are used; its authority is not.
        rest = target.split("://", 1)[1]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    elif not target.startswith("/"):
        raise _Reject(400)
    target = target.partition("#")[0]
    # "//evil.example" (or "/\\evil.example", which browsers read alike) in a Location is a
    # network-path reference: reduce any run of leading slashes and backslashes to one slash.
    return "/" + target.lstrip("/\\")


def _strip_port(host: str) -> str:
    host = host.strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def _normalise_host(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _linger(conn: socket.socket) -> None:
    """Half-close, then drain what the client is still sending, for a bounded time."""
    deadline = time.monotonic() + _LINGER_SECONDS
    drained = 0
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        while drained < _LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            conn.settimeout(remaining)
            chunk = conn.recv(_RECV_SIZE)
            if not chunk:
                return
            drained += len(chunk)
