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
import ipaddress
import logging
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
        self._server: asyncio.Server | None = None
        self._connections = 0
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        """Bind and listen (host "" = every address, IPv6 and IPv4); the bound addresses."""
        self._server = await asyncio.start_server(
            self._connection, host or None, port, limit=MAX_HEAD, reuse_address=True
        )
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def close(self) -> None:
        """Stop listening and end open connections (keep-alive ones would wait 30 s)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        tasks = list(self._tasks)
        for writer in self._tasks.values():
            # Aborting ends the task's read at once; no TLS close_notify with an idle client.
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = writer
        try:
            peer = writer.get_extra_info("peername")
            client = client_address(str(peer[0])) if peer else "unknown"
            if self.proxy_protocol:
                client = await self._proxy_client(reader, client)
            await writer.start_tls(
                self.certificate.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
            await self._serve(reader, writer, client)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("token: connection ended: %s", type(exc).__name__)
        except proxyproto.ProxyProtocolError as exc:
            log.warning("token: connection without a valid PROXY header closed: %s", exc)
        finally:
            self._connections -= 1
            if task is not None:
                self._tasks.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _proxy_client(self, reader: asyncio.StreamReader, peer: str) -> str:
        header = await asyncio.wait_for(reader.readexactly(proxyproto.HEADER_LENGTH), HEAD_TIMEOUT)
        length = proxyproto.body_length(header)
        body = await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT)
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
