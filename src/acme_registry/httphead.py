"""A strict HTTP/1.x request-head parser and response framing for the port-80 responder (pure).

Port 80 faces the public internet, so the head is held to hard limits and anything unusual is
refused rather than guessed at: a 4 KiB request line (414 beyond), 8 KiB and 64 lines of
header fields (431 beyond), no obsolete line folding, no whitespace before a field's colon, no
control characters in the target or in field values, at most one ``Host`` (400 otherwise).
Bare LF line ends are accepted (RFC 9112 section 2.2), and up to four empty lines before the
request line are skipped.

:class:`HeadParser` is fed bytes as they arrive and never reads a socket itself, so the
same rules hold whichever server drives it and can be tested without one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

MAX_REQUEST_LINE = 4096
MAX_HEADER_BYTES = 8192
MAX_HEADER_LINES = 64
# Everything a head may hold: the request line, the skipped empty lines, the fields, the CRLFs.
MAX_HEAD_BYTES = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 16

SERVER = "acme-registry"
_MAX_EMPTY_LINES = 4

_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_NAME = _METHOD
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
# Visible ASCII only: this excludes spaces, control characters (CR, LF, NUL, ...) and non-ASCII
# bytes, which is what makes the target safe to copy into a Location header.
_TARGET = re.compile(rb"[\x21-\x7e]+")
# One DNS label, as a redirect may name it under a configured wildcard.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ABSOLUTE_FORM = re.compile(r"https?://", re.IGNORECASE)
# Field values may hold HTAB and obs-text but no other control characters (CR, LF, NUL, DEL).
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

REASONS = {
    200: "OK",
    301: "Moved Permanently",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


class Reject(Exception):
    """The request cannot be served; answer ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Request:
    """One parsed request head; ``host`` is the single Host field's value, if any."""

    method: str
    target: str
    version: str
    host: str | None = None
    body_announced: bool = False


class HeadParser:
    """Parses one request head from bytes fed to it in pieces of any size.

    :meth:`feed` returns the :class:`Request` once its head is complete (``None`` while more
    is needed) and raises :class:`Reject` as soon as the bytes so far break a rule: an
    oversized line is refused when it passes its limit, not when its end arrives.
    """

    __slots__ = (
        "_buffer",
        "_empty_lines",
        "_header_bytes",
        "_header_lines",
        "_hosts",
        "_request",
        "received",
    )

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._request: Request | None = None
        self._empty_lines = 0
        self._header_bytes = 0
        self._header_lines = 0
        self._hosts: list[bytes] = []
        self.received = 0

    @property
    def leftover(self) -> bool:
        """Bytes beyond the head (a body, a pipelined request) were received."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> Request | None:
        self.received += len(data)
        self._buffer += data
        while True:
            if self._request is None:
                line = self._next_line(MAX_REQUEST_LINE, 414)
                if line is None:
                    return None
                if not line:
                    self._empty_lines += 1
                    if self._empty_lines > _MAX_EMPTY_LINES:
                        raise Reject(400)
                    continue
                self._request = parse_request_line(line)
                continue
            # Each field line counts with its CRLF; the empty line that ends the head does not.
            line = self._next_line(max(MAX_HEADER_BYTES - self._header_bytes - 2, 0), 431)
            if line is None:
                return None
            if not line:
                return self._finish(self._request)
            self._header(line)

    def end_of_input(self) -> None:
        """The peer half-closed before the head was complete: 400 if it sent anything."""
        # A client that half-closed mid-head still deserves to know why nothing happens.
        if self.received:
            raise Reject(400)

    def _next_line(self, limit: int, status: int) -> bytes | None:
        """One line without its CRLF (or bare LF); ``status`` when it would exceed ``limit``."""
        end = self._buffer.find(b"\n", 0, limit + 2)
        if end >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                raise Reject(status)
            return line
        if len(self._buffer) > limit + 1:
            raise Reject(status)
        return None

    def _header(self, line: bytes) -> None:
        assert self._request is not None
        self._header_bytes += len(line) + 2
        self._header_lines += 1
        if self._header_bytes > MAX_HEADER_BYTES or self._header_lines > MAX_HEADER_LINES:
            raise Reject(431)
        name, value = parse_header_line(line)
        if name == b"host":
            self._hosts.append(value)
        elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            self._request.body_announced = True

    def _finish(self, request: Request) -> Request:
        if len(self._hosts) > 1:
            raise Reject(400)
        if self._hosts:
            request.host = self._hosts[0].decode("latin-1")
        return request


def parse_request_line(line: bytes) -> Request:
    """``method SP target SP HTTP/1.x``, exactly: one space each, visible ASCII in the target."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise Reject(400)
    method, target, version = parts
    if not _METHOD.fullmatch(method) or not _VERSION.fullmatch(version):
        raise Reject(400)
    if not _TARGET.fullmatch(target):
        raise Reject(400)
    return Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"))


def parse_header_line(line: bytes) -> tuple[bytes, bytes]:
    """The field's lower-cased name and its value without surrounding spaces and tabs."""
    name, colon, value = line.partition(b":")
    # No whitespace before the colon and no obsolete line folding (RFC 9112 sections 5.1, 5.2).
    if not colon or not _HEADER_NAME.fullmatch(name):
        raise Reject(400)
    value = value.strip(b" \t")
    if _BAD_FIELD_VALUE.search(value):
        raise Reject(400)
    return name.lower(), value


def normalise_target(target: str) -> str:
    """The path and query to redirect to, always starting with exactly one ``/``."""
    if _ABSOLUTE_FORM.match(target):
        # Only the path and query of an absolute-form target are used; its authority is not.
        rest = target.split("://", 1)[1]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    elif not target.startswith("/"):
        raise Reject(400)
    target = target.partition("#")[0]
    # "//evil.example" (or "/\\evil.example", which browsers read alike) in a Location is a
    # network-path reference: reduce any run of leading slashes and backslashes to one slash.
    return "/" + target.lstrip("/\\")


def strip_port(host: str) -> str:
    """The name of a Host value: ``[v6]:port`` -> ``v6``, ``name:port`` -> ``name``."""
    host = host.strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def normalise_host(name: str) -> str:
    """Lower case, without surrounding spaces and without the root's trailing dot."""
    return name.strip().lower().rstrip(".")


def redirect_host(requested: str | None, domains: Sequence[str]) -> str:
    """The authority of the https redirect: the request's Host if we serve it, else ours.

    The Host counts when it is one of ``domains`` (normalised; an IP address in canonical
    form) or one label under one of their wildcards. Otherwise the first configured name
    that is not a wildcard (a lone wildcard: its base name). Never anything else: the
    redirect must not be aimable at a name we do not serve. An IPv6 address comes back in
    brackets, as a URL needs it.
    """
    if requested is not None:
        name = canonical_host(strip_port(requested))
        if name in domains or any(_under_wildcard(name, d) for d in domains):
            return url_host(name)
    concrete = [d for d in domains if not d.startswith("*.")]
    return url_host(concrete[0] if concrete else domains[0].removeprefix("*."))


def canonical_host(name: str) -> str:
    """A host as configured names are kept: normalised, an IP address in canonical form."""
    name = normalise_host(name)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def url_host(name: str) -> str:
    """``name`` as the host of a URL: an IPv6 address in brackets."""
    return f"[{name}]" if ":" in name else name


def _under_wildcard(name: str, domain: str) -> bool:
    if not domain.startswith("*."):
        return False
    label, dot, rest = name.partition(".")
    return bool(dot) and rest == domain[2:] and _LABEL.fullmatch(label) is not None


def response(
    status: int,
    *,
    head_only: bool,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    date: str | None = None,
) -> bytes:
    """A complete ``Connection: close`` answer; the body defaults to the status line's text."""
    reason = REASONS[status]
    if body is None:
        body = f"{status} {reason}\n".encode("ascii")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Server: {SERVER}",
        f"Date: {date or formatdate(usegmt=True)}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body
