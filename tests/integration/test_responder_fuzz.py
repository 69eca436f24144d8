"""Fuzz the port-80 responder with raw request bytes (hypothesis): it never crashes, never
answers 5xx, never redirects off the configured names, and serves only pending tokens."""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acme_registry.responder import ChallengeResponder

DOMAINS = ("registry.test", "mirror.test")
TOKEN, KEY_AUTHORIZATION = "pending-token_1", "pending-token_1.thumbprint"
LOCATION = re.compile(rb"^Location: https://(?P<host>[^/\r\n]+)(?P<path>[^\r\n]*)\r$", re.M)


@pytest.fixture(scope="module")
def responder():
    server = ChallengeResponder(
        DOMAINS,
        lambda token: KEY_AUTHORIZATION if token == TOKEN else None,
        0,
        "127.0.0.1",
        read_timeout=2.0,
    )
    server.start()
    yield server
    server.stop()


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on garbage; read what it said
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def check(answer: bytes) -> None:
    if not answer:
        return  # closed without an answer: allowed for input that is not HTTP at all
    status_line = answer.split(b"\r\n", 1)[0]
    assert re.match(rb"^HTTP/1\.1 [1-4]\d\d ", status_line), status_line
    for match in LOCATION.finditer(answer):
        assert match["host"].decode() in DOMAINS, answer
        assert match["path"].startswith(b"/") and not match["path"].startswith(b"//"), answer
    if answer.startswith(b"HTTP/1.1 200"):
        body = answer.split(b"\r\n\r\n", 1)[1]
        assert body in (KEY_AUTHORIZATION.encode(), b""), answer


methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"CONNECT", b"get", b"G\x00T", b""])
paths = st.one_of(
    st.sampled_from(
        [
            b"/",
            b"/v2/",
            b"//evil.example/x",
            b"http://evil.example/x",
            b"/.well-known/acme-challenge/" + TOKEN.encode(),
            b"/.well-known/acme-challenge/../../etc/passwd",
            b"/.well-known/acme-challenge/" + TOKEN.encode() + b"/x",
            b"\\\\evil.example",
            b"*",
        ]
    ),
    st.binary(max_size=300).map(lambda b: b"/" + b),
)
hosts = st.one_of(
    st.sampled_from([b"registry.test", b"MIRROR.test:80", b"evil.example", b"registry.test.", b""]),
    st.binary(max_size=80),
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""])


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(method=methods, path=paths, host=hosts, version=versions, extra=st.binary(max_size=200))
def test_structured_requests(responder, method, path, host, version, extra):
    request = method + b" " + path + b" " + version + b"\r\nHost: " + host + b"\r\n" + extra
    check(exchange(responder.port, request + b"\r\n\r\n"))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2048))
def test_raw_bytes(responder, data):
    check(exchange(responder.port, data))


def test_the_pending_token_is_served_and_nothing_else(responder):
    answer = exchange(
        responder.port,
        f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(KEY_AUTHORIZATION.encode())
