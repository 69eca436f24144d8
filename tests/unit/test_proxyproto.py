"""PROXY protocol v2 parsing: valid headers, and everything else refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acme_registry import proxyproto
from acme_registry.proxyproto import ProxyHeader, ProxyProtocolError, body_length, build, parse


def split(data: bytes) -> tuple[bytes, bytes]:
    return data[:16], data[16:]


def test_ipv4() -> None:
    header, body = split(build(("192.0.2.7", 40000), ("198.51.100.1", 5001)))
    assert body_length(header) == 12
    assert parse(header, body) == ProxyHeader(("192.0.2.7", 40000), ("198.51.100.1", 5001))


def test_ipv6_and_mapped_ipv4() -> None:
    header, body = split(build(("2001:db8::7", 1), ("2001:db8::1", 2)))
    assert parse(header, body).source == ("2001:db8::7", 1)
    header, body = split(build(("::ffff:192.0.2.7", 3), ("::ffff:192.0.2.1", 4)))
    assert parse(header, body).source == ("192.0.2.7", 3)


def test_tlvs_are_skipped() -> None:
    data = build(("192.0.2.7", 1), ("192.0.2.1", 2))
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP
    header = data[:14] + struct.pack("!H", 12 + len(tlv))
    assert parse(header, data[16:] + tlv).source == ("192.0.2.7", 1)


def test_local_uses_the_peer() -> None:
    header = proxyproto.SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00"
    assert parse(header, b"") == ProxyHeader(source=None)


@pytest.mark.parametrize(
    "header",
    [
        b"GET /token HTTP/1.1\r\n"[:16],  # a client speaking to the port directly
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 5,  # a TLS ClientHello
        proxyproto.SIGNATURE + bytes([0x11, 0x11]) + b"\x00\x0c",  # version 1
        proxyproto.SIGNATURE + bytes([0x22, 0x11]) + b"\x00\x0c",  # command 2
        proxyproto.SIGNATURE + bytes([0x21, 0x12]) + b"\x00\x0c",  # UDP
        proxyproto.SIGNATURE + bytes([0x21, 0x31]) + b"\x00\xd8",  # unix
        proxyproto.SIGNATURE + bytes([0x21, 0x11]) + b"\x00\x0b",  # too short for IPv4
        proxyproto.SIGNATURE + bytes([0x21, 0x21]) + b"\x00\x0c",  # too short for IPv6
        proxyproto.SIGNATURE + bytes([0x21, 0x11]) + b"\xff\xff",  # over the bound
        proxyproto.SIGNATURE[:11] + b"X" + bytes([0x21, 0x11]) + b"\x00\x0c",
        b"\r\n\r\n",
    ],
)
def test_refused(header: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        body_length(header)


def test_body_of_the_wrong_length() -> None:
    header, body = split(build(("192.0.2.7", 1), ("192.0.2.1", 2)))
    with pytest.raises(ProxyProtocolError):
        parse(header, body[:-1])


@given(st.binary(min_size=16, max_size=16), st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_raise_the_one_error(header: bytes, body: bytes) -> None:
    try:
        result = parse(header, body)
    except ProxyProtocolError:
        return
    assert header.startswith(proxyproto.SIGNATURE) and isinstance(result, ProxyHeader)
