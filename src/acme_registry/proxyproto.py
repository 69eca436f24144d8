"""PROXY protocol version 2 (HAProxy's binary header): the client address behind a TCP
load balancer. Pure; strict.

A connection with ``TOKEN_PROXY_PROTOCOL=true`` must start with the 16-byte header (the
12-byte signature, version/command, family/protocol, the length of what follows), then the
addresses, then optional TLVs (skipped). Anything else is an error and the connection is
closed: a balancer that does not send the header is misconfigured, and accepting a
connection without one would let any client pick the address the throttle sees.

``LOCAL`` (the balancer's own health checks) carries no client address: the TCP peer is used.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_LENGTH = 16
MAX_BODY = 512  # addresses (at most 216 for unix sockets) and a few TLVs

_LOCAL = 0x20
_PROXY = 0x21
_TCP4 = 0x11
_TCP6 = 0x21
_UNSPEC = 0x00


class ProxyProtocolError(ValueError):
    """The connection does not start with a valid PROXY v2 header."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the header says: the client's address and port, or None for LOCAL."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None


def body_length(header: bytes) -> int:
    """Check the first 16 bytes; return how many bytes follow them."""
    if len(header) != HEADER_LENGTH:
        raise ProxyProtocolError("short PROXY header")
    if header[:12] != SIGNATURE:
        raise ProxyProtocolError("no PROXY protocol v2 signature")
    command = header[12]
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"PROXY version/command 0x{command:02x} is not v2 LOCAL or PROXY")
    (length,) = struct.unpack("!H", header[14:16])
    if length > MAX_BODY:
        raise ProxyProtocolError(f"PROXY header length {length} is over {MAX_BODY}")
    family = header[13]
    if command == _PROXY:
        needed = {_TCP4: 12, _TCP6: 36}.get(family)
        if needed is None:
            raise ProxyProtocolError(f"PROXY family 0x{family:02x} is not TCP over IPv4 or IPv6")
        if length < needed:
            raise ProxyProtocolError("PROXY header too short for its addresses")
    return length


def parse(header: bytes, body: bytes) -> ProxyHeader:
    """The 16-byte header and its body (``body_length(header)`` bytes) -> ProxyHeader."""
    length = body_length(header)
    if len(body) != length:
        raise ProxyProtocolError("PROXY header body has the wrong length")
    if header[12] == _LOCAL:
        return ProxyHeader(source=None)
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if header[13] == _TCP4:
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    else:
        src6 = ipaddress.IPv6Address(body[0:16])
        dst = ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        # An IPv4 client through an IPv6 balancer: throttle it as the IPv4 address it is.
        src = src6.ipv4_mapped or src6
    return ProxyHeader(source=(str(src), sport), destination=(str(dst), dport))


def build(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header (for tests and the benchmark's balancer stand-in)."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be of one IP version")
    family = _TCP4 if src.version == 4 else _TCP6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return SIGNATURE + bytes([_PROXY, family]) + struct.pack("!H", len(body)) + body
