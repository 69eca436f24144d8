"""The token server's HTTP framing (pure parts)."""

from __future__ import annotations

import pytest

from acme_registry.tokenhttp import (
    MAX_BODY,
    HTTPError,
    Request,
    Response,
    client_address,
    content_length,
    parse_head,
    render,
)


def test_parse_get() -> None:
    request, keep_alive = parse_head(
        b"GET /token?service=s&scope=a&scope=b HTTP/1.1\r\n"
        b"Host: x\r\nAuthorization: Basic abc\r\n\r\n"
    )
    assert (request.method, request.path) == ("GET", "/token")
    assert request.query == {"service": ["s"], "scope": ["a", "b"]}
    assert request.headers["authorization"] == "Basic abc"
    assert keep_alive


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    ],
)
def test_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert parse_head(head)[1] is keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /token\r\n\r\n", 400),
        (b"GET http://x/token HTTP/1.1\r\n\r\n", 400),
        (b"GET /token HTTP/2\r\n\r\n", 400),
        (b"GET /token HTTP/1.1\r\nBad header\r\n\r\n", 400),
        (b"GET /token HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET /token HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n", 400),
        (b"POST /token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ],
)
def test_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as info:
        parse_head(head)
    assert info.value.status == status


def test_content_length() -> None:
    assert content_length(Request("POST", "/", {}, {"content-length": "12"})) == 12
    assert content_length(Request("POST", "/", {}, {})) == 0
    for bad, status in (("-1", 400), ("1e3", 400), (str(MAX_BODY + 1), 413)):
        with pytest.raises(HTTPError) as info:
            content_length(Request("POST", "/", {}, {"content-length": bad}))
        assert info.value.status == status


def test_render() -> None:
    data = render(Response(429, b"{}", [("Retry-After", "30")]), keep_alive=False)
    assert data == (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )


def test_client_address() -> None:
    assert client_address("::ffff:127.0.0.2") == "127.0.0.2"
    assert client_address("::1") == "::1"
    assert client_address("fe80::1%eth0") == "fe80::1"
    assert client_address("127.0.0.1") == "127.0.0.1"


def test_a_taken_port_fails_in_the_caller(tmp_path) -> None:
    import socket

    from acme_registry.tokenhttp import ServerCertificate, ThreadedServer, TokenHTTPServer
    from tests.support.tls import TestCA

    pem = tmp_path / "tls.pem"
    pem.write_bytes(TestCA().issue(["registry.test"]))

    async def handler(request: Request, client: str) -> Response:
        return Response(200)

    server = TokenHTTPServer(handler, ServerCertificate(pem))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            ThreadedServer(server, "127.0.0.1", port).start()
