"""The token service's HTTPS server: HTTP/1.1 on asyncio, a replaceable certificate, and
optionally the PROXY protocol v2 for the client address.

Small on purpose: the endpoint answers logins, never registry traffic. Request heads are
bounded (8 KiB) and must arrive within 10 s, bodies within 16 KiB; keep-alive connections
close after 30 s idle or 100 requests; at most 512 connections at once.

**The certificate** (:class:`ServerCertificate`) is read into a fresh ``ssl.SSLContext`` by
:meth:`ServerCertificate.load`; each new connection upgrades to TLS with the context current
at that moment, so after a renewal new connections get the new certificate and those
already open keep theirs. The PROXY header, when enabled, comes before the TLS handshake,
so the server accepts plain TCP and starts TLS itself.

:class:`ThreadedServer` runs it all on an event loop in a thread of its own, for the agent
(which is not asyncio): ``start()`` binds (raising OSError, e.g. the port is taken) and
returns; ``stop()`` closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import proxyproto

log = logging.getLogger(__name__)

MAX_HEAD = 8192
MAX_BODY = 16384
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0
MAX_REQUESTS_PER_CONNECTION = 100
MAX_CONNECTIONS = 512

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request, str], Awaitable[Response]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- parsing (pure) ----------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[Request, bool]:
    """A request head (through the blank line) -> (Request without body, keep_alive)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HTTPError(400, "undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not target.startswith("/"):
        raise HTTPError(400, "the request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise HTTPError(400, "malformed header line")
        key = name.lower()
        if key in headers and key in ("authorization", "content-length", "host", "content-type"):
            raise HTTPError(400, f"header {name} repeated")
        headers[key] = value.strip()
    if "transfer-encoding" in headers:
        raise HTTPError(501, "chunked bodies are not accepted")
    split = urlsplit(target)
    query = parse_qs(split.query, keep_blank_values=True)
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return Request(method, split.path, query, headers), keep_alive


def content_length(request: Request) -> int:
    raw = request.headers.get("content-length", "0")
    if not raw.isdigit():
        raise HTTPError(400, "malformed Content-Length")
    length = int(raw)
    if length > MAX_BODY:
        raise HTTPError(413, f"bodies are limited to {MAX_BODY} bytes")
    return length


def render(response: Response, keep_alive: bool) -> bytes:
    reason = _REASONS.get(response.status, "Status")
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines.append(f"Content-Length: {len(response.body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def client_address(host: str) -> str:
    """``::ffff:192.0.2.7`` (a dual-stack socket's IPv4 peer) -> ``192.0.2.7``."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


# -- the certificate ---------------------------------------------------------------------


class ServerCertificate:
    """The TLS context new connections use; :meth:`load` replaces it."""

    def __init__(self, cert_file: Path, key_file: Path | None = None) -> None:
        self._context = self._make(cert_file, key_file)
        self._lock = threading.Lock()

    def load(self, cert_file: Path, key_file: Path | None = None) -> None:
        """Read a new chain and key (one file may hold both); raises before swapping."""
        context = self._make(cert_file, key_file)
        with self._lock:
            self._context = context

    @property
    def context(self) -> ssl.SSLContext:
        with self._lock:
            return self._context

    @staticmethod
    def _make(cert_file: Path, key_file: Path | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        return context


# -- the server --------------------------------------------------------------------------


class TokenHTTPServer:
    """HTTP/1.1 over TLS on asyncio; ``handler(request, client_address)`` answers."""

    def __init__(
        self,
        handler: Handler,
        certificate: ServerCertificate,
        *,
        proxy_protocol: bool = False,
    ) -> None:
        self.handler = handler
        self.certificate = certificate
        self.proxy_protocol = proxy_protocol
        self._listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: dict[asyncio.Task[None], socket.socket] = {}

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        """Bind and listen (host "" = every address, IPv6 and IPv4); the bound addresses."""
        self._listeners = [_listen(host, port)]
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept(sock)) for sock in self._listeners]
        return [sock.getsockname()[:2] for sock in self._listeners]

    async def close(self) -> None:
        """Stop listening and end open connections (keep-alive ones would wait 30 s)."""
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        tasks = list(self._connections)
        for sock in self._connections.values():
            # Shutting the socket down ends the task's read at once: no TLS close_notify
            # exchange with an idle keep-alive client.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _accept(self, listener: socket.socket) -> None:
        # Accepting raw sockets (not asyncio.start_server's streams) lets the PROXY header be
        # read to its last byte and no further: the TLS ClientHello right behind it must
        # reach the TLS layer, not sit in a stream's buffer.
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: wait instead of spinning
                log.warning("token: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                sock.close()
                continue
            task = loop.create_task(self._connection(sock, client_address(str(peer[0]))))
            self._connections[task] = sock
            task.add_done_callback(lambda t: self._connections.pop(t, None))

    async def _connection(self, sock: socket.socket, client: str) -> None:
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        try:
            sock.setblocking(False)
            if self.proxy_protocol:
                client = await asyncio.wait_for(self._proxy_client(sock, client), HEAD_TIMEOUT)
            reader = asyncio.StreamReader(limit=MAX_HEAD)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self.certificate.context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._serve(reader, writer, client)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("token: connection from %s ended: %s", client, type(exc).__name__)
        except proxyproto.ProxyProtocolError as exc:
            log.warning("token: connection without a valid PROXY header closed: %s", exc)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)
            else:
                sock.close()

    @staticmethod
    async def _proxy_client(sock: socket.socket, peer: str) -> str:
        header = await _recv_exactly(sock, proxyproto.HEADER_LENGTH)
        body = await _recv_exactly(sock, proxyproto.body_length(header))
        parsed = proxyproto.parse(header, body)
        return client_address(parsed.source[0]) if parsed.source else peer

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> None:
        for served in range(MAX_REQUESTS_PER_CONNECTION):
            timeout = HEAD_TIMEOUT if served == 0 else IDLE_TIMEOUT
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            except asyncio.LimitOverrunError:
                await self._send(writer, Response(431, b"request head too large"), False)
                return
            except asyncio.IncompleteReadError:
                return  # the client closed between requests
            try:
                request, keep_alive = parse_head(head)
                length = content_length(request)
                if length:
                    request.body = await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT)
            except HTTPError as exc:
                await self._send(writer, Response(exc.status, str(exc).encode()), False)
                return
            try:
                response = await self.handler(request, client)
            except Exception:
                log.exception("token: request failed")
                response = Response(500, b"internal error")
                keep_alive = False
            keep_alive = keep_alive and served + 1 < MAX_REQUESTS_PER_CONNECTION
            await self._send(writer, response, keep_alive)
            if not keep_alive:
                return

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
        writer.write(render(response, keep_alive))
        await writer.drain()


async def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Exactly ``count`` bytes (never more: the rest of the stream is not ours to read)."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < count:
        chunk = await loop.sock_recv(sock, count - len(data))
        if not chunk:
            raise proxyproto.ProxyProtocolError("connection closed inside the PROXY header")
        data += chunk
    return data


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket: "" is every address (one dual-stack IPv6 socket, or IPv4 only
    where the host has no IPv6)."""
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addresses: list[tuple[socket.AddressFamily, str]] = [(family, host)]
    else:
        addresses = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    error: OSError | None = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE or host:
                raise
            error = exc
    assert error is not None
    raise error


class ThreadedServer:
    """A :class:`TokenHTTPServer` on its own event loop in a daemon thread."""

    def __init__(self, server: TokenHTTPServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.addresses: list[tuple[str, int]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="token-service")
        self._thread.daemon = True

    def start(self) -> ThreadedServer:
        """Bind and serve; OSError (e.g. EADDRINUSE) is raised here, in the caller."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            self.server.start(self.host, self.port), self._loop
        )
        try:
            self.addresses = future.result(timeout=30)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            raise
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.server.close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
