"""The HTTP-01 responder over real loopback sockets: challenges, redirects and hostile input."""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from acme_registry.responder import ChallengeResponder

DOMAINS = ("registry.example.com", "alt.example.org")
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHZ = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
PREFIX = "/.well-known/acme-challenge/"


class Lookup:
    """A token table that records what it was asked."""

    def __init__(self, table: dict[str, str] | None = None) -> None:
        self.table = {TOKEN: KEY_AUTHZ} if table is None else table
        self.calls: list[str] = []

    def __call__(self, token: str) -> str | None:
        self.calls.append(token)
        return self.table.get(token)


@pytest.fixture
def make_responder() -> Iterator[Callable[..., ChallengeResponder]]:
    started: list[ChallengeResponder] = []

    def make(lookup=None, host: str = "127.0.0.1", **kwargs) -> ChallengeResponder:
        responder = ChallengeResponder(DOMAINS, lookup or Lookup(), 0, host, **kwargs)
        responder.start()
        started.append(responder)
        return responder

    yield make
    for responder in started:
        responder.stop()


@pytest.fixture
def lookup() -> Lookup:
    return Lookup()


@pytest.fixture
def responder(make_responder, lookup) -> ChallengeResponder:
    return make_responder(lookup)


def request(
    responder: ChallengeResponder,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str = "127.0.0.1",
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection(host, responder.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send ``data`` as is and return everything the server answers until it closes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("ascii").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}"
        headers[name.lower()] = value.strip()
    return int(status), headers, body


def raw_status(port: int, data: bytes) -> int:
    return parse(raw(port, data))[0]


def assert_common_headers(headers: dict[str, str], body: bytes) -> None:
    assert headers["server"] == "acme-registry"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)


# -- challenges ---------------------------------------------------------------------------


def test_pending_token_answers_the_exact_key_authorization(responder, lookup):
    response, body = request(responder, "GET", PREFIX + TOKEN)
    assert response.status == 200
    assert body == KEY_AUTHZ.encode()
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert response.getheader("Content-Length") == str(len(KEY_AUTHZ))
    assert response.getheader("Server") == "acme-registry"
    assert response.getheader("Connection") == "close"
    assert lookup.calls == [TOKEN]


def test_head_on_a_pending_token_sends_headers_only(responder):
    answer = raw(responder.port, f"HEAD {PREFIX}{TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, headers, body = parse(answer)
    assert status == 200
    assert headers["content-length"] == str(len(KEY_AUTHZ))
    assert body == b""


def test_unknown_token_is_404(responder, lookup):
    response, body = request(responder, "GET", PREFIX + "unknownToken_123")
    assert response.status == 404
    assert_common_headers({k.lower(): v for k, v in response.getheaders()}, body)
    assert lookup.calls == ["unknownToken_123"]


@pytest.mark.parametrize(
    "token",
    ["abc.def", "%41bc", "a+b", "a=", "x" * 257, "", "..", "..%2f..%2fetc%2fpasswd"],
)
def test_token_that_is_not_base64url_is_404_without_a_lookup(responder, lookup, token):
    response, _ = request(responder, "GET", PREFIX + token)
    assert response.status == 404
    assert lookup.calls == []


@pytest.mark.parametrize(
    "path",
    [
        PREFIX + TOKEN + "/extra",
        PREFIX + TOKEN + "/",
        PREFIX + "../../../etc/passwd",
        PREFIX + "sub/" + TOKEN,
        PREFIX.rstrip("/"),
    ],
)
def test_extra_path_segments_are_404(responder, lookup, path):
    response, _ = request(responder, "GET", path)
    assert response.status == 404
    assert lookup.calls == []


def test_longest_valid_token_is_looked_up(make_responder):
    token = "A" * 256
    responder = make_responder(Lookup({token: token + ".thumb"}))
    response, body = request(responder, "GET", PREFIX + token)
    assert (response.status, body) == (200, (token + ".thumb").encode())


def test_lookup_that_raises_is_404_and_logged(make_responder, caplog):
    def broken(token: str) -> str | None:
        raise RuntimeError("database on fire")

    responder = make_responder(broken)
    with caplog.at_level(logging.WARNING, logger="acme_registry.responder"):
        response, _ = request(responder, "GET", PREFIX + TOKEN)
    assert response.status == 404
    assert any("lookup failed" in r.getMessage() for r in caplog.records)
    # The responder is still serving afterwards.
    assert request(responder, "GET", PREFIX + TOKEN)[0].status == 404


def test_lookup_returning_a_non_string_is_404(make_responder):
    responder = make_responder(lambda token: b"bytes are not a key authorization")
    assert request(responder, "GET", PREFIX + TOKEN)[0].status == 404


def test_serving_a_challenge_logs_a_shortened_token_at_info(responder, caplog):
    with caplog.at_level(logging.INFO, logger="acme_registry.responder"):
        assert request(responder, "GET", PREFIX + TOKEN)[0].status == 200
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(TOKEN[:8] in m and "served" in m for m in messages)
    assert not any(TOKEN in m for m in messages)


def test_challenge_is_served_for_an_absolute_form_target(responder):
    answer = raw(
        responder.port,
        f"GET http://registry.example.com{PREFIX}{TOKEN} HTTP/1.1\r\n"
        "Host: registry.example.com\r\n\r\n".encode(),
    )
    status, _, body = parse(answer)
    assert (status, body) == (200, KEY_AUTHZ.encode())


# -- methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", PREFIX + TOKEN])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"])
def test_other_methods_are_405(responder, lookup, method, path):
    response, body = request(responder, method, path, body=b"payload")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert_common_headers({k.lower(): v for k, v in response.getheaders()}, body)
    assert lookup.calls == []


def test_connect_is_405(responder):
    answer = raw(responder.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil\r\n\r\n")
    status, headers, _ = parse(answer)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_get_with_a_body_is_answered_and_closed(responder):
    body = b"x" * 20000
    answer = raw(
        responder.port,
        b"GET /v2/ HTTP/1.1\r\nHost: registry.example.com\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    status, headers, _ = parse(answer)
    assert status == 301
    assert headers["location"] == "https://registry.example.com/v2/"


# -- redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Registry.Example.COM:80", "registry.example.com"),
        ("ALT.example.org", "alt.example.org"),
        ("alt.example.org.:8080", "alt.example.org"),
        ("registry.example.com", "registry.example.com"),
    ],
)
def test_redirect_keeps_a_configured_host(responder, host, expected):
    response, body = request(responder, "GET", "/v2/_catalog?n=10&last=a", {"Host": host})
    assert response.status == 301
    assert response.getheader("Location") == f"https://{expected}/v2/_catalog?n=10&last=a"
    assert_common_headers({k.lower(): v for k, v in response.getheaders()}, body)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "registry.example.com.evil.example",
        "evil.example:80",
        "[::1]:80",
        "127.0.0.1",
    ],
)
def test_redirect_with_a_foreign_host_goes_to_the_first_domain(responder, host):
    response, _ = request(responder, "GET", "/x", {"Host": host})
    assert response.status == 301
    assert response.getheader("Location") == "https://registry.example.com/x"


def test_redirect_without_host_goes_to_the_first_domain(responder):
    status, headers, _ = parse(raw(responder.port, b"GET /a?b HTTP/1.0\r\n\r\n"))
    assert status == 301
    assert headers["location"] == "https://registry.example.com/a?b"


def test_redirects_log_at_debug_only(responder, caplog):
    with caplog.at_level(logging.DEBUG, logger="acme_registry.responder"):
        request(responder, "GET", "/v2/", {"Host": "registry.example.com", "Cookie": "secret"})
    records = [r for r in caplog.records if "redirect" in r.getMessage()]
    assert records
    assert all(r.levelno == logging.DEBUG for r in records)
    assert not any("secret" in r.getMessage() for r in caplog.records)


def test_head_redirect_has_no_body(responder):
    status, headers, body = parse(raw(responder.port, b"HEAD /v2/ HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert status == 301
    assert headers["location"] == "https://registry.example.com/v2/"
    assert int(headers["content-length"]) > 0
    assert body == b""


def test_other_well_known_paths_redirect(responder):
    response, _ = request(responder, "GET", "/.well-known/security.txt")
    assert response.status == 301
    assert response.getheader("Location") == "https://registry.example.com/.well-known/security.txt"


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("http://evil.example/x", "/x"),
        ("http://evil.example/x?y=1", "/x?y=1"),
        ("HTTPS://evil.example", "/"),
        ("http://evil.example?q", "/?q"),
        ("http://evil.example//evil2.example/x", "/evil2.example/x"),
        ("http://user@evil.example/x", "/x"),
    ],
)
def test_absolute_form_target_never_redirects_elsewhere(responder, target, location):
    answer = raw(responder.port, f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
    status, headers, _ = parse(answer)
    assert status == 301
    assert headers["location"] == "https://registry.example.com" + location


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("//evil.example/x", "/evil.example/x"),
        ("///evil.example", "/evil.example"),
        ("/\\evil.example/x", "/evil.example/x"),
        ("/\\/evil.example", "/evil.example"),
        ("/x#frag", "/x"),
        ("/@evil.example", "/@evil.example"),
    ],
)
def test_network_path_targets_stay_on_the_domain(responder, target, location):
    answer = raw(responder.port, f"GET {target} HTTP/1.1\r\nHost: alt.example.org\r\n\r\n".encode())
    status, headers, _ = parse(answer)
    assert status == 301
    assert headers["location"] == "https://alt.example.org" + location


@pytest.mark.parametrize("target", ["*", "evil.example/x", "ftp://evil.example/x", "@evil"])
def test_target_not_starting_with_a_slash_is_400(responder, target):
    assert raw_status(responder.port, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode()) == 400


# -- hostile and malformed input ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /x\rSet-Cookie: a=b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x\x00y HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x\x1by HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x\r\nSet-Cookie: a=b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: registry.example.com\rSet-Cookie: a=b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
    ],
)
def test_control_characters_are_400(responder, data):
    status, headers, _ = parse(raw(responder.port, data))
    assert status == 400
    assert "set-cookie" not in headers
    assert "location" not in headers


def test_encoded_crlf_stays_encoded_in_the_location(responder):
    answer = raw(responder.port, b"GET /x%0d%0aSet-Cookie:%20a=b HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers, _ = parse(answer)
    assert status == 301
    assert headers["location"] == "https://registry.example.com/x%0d%0aSet-Cookie:%20a=b"
    assert "set-cookie" not in headers


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\r\n",
        b"hello\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / http/1.1\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"\r\n\r\n\r\n\r\n\r\n\r\n",
    ],
)
def test_malformed_requests_are_400(responder, data):
    status, headers, body = parse(raw(responder.port, data))
    assert status == 400
    assert_common_headers(headers, body)


def test_client_half_closing_mid_head_gets_400(responder):
    with connect(responder.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert parse(read_all(sock))[0] == 400


def test_request_line_at_the_limit_is_accepted(responder):
    target = "/" + "a" * (4096 - len("GET / HTTP/1.1"))
    line = f"GET {target} HTTP/1.1"
    assert len(line) == 4096
    assert raw_status(responder.port, f"{line}\r\nHost: a\r\n\r\n".encode()) == 301


@pytest.mark.parametrize("extra", [1, 5000, 100_000])
def test_oversized_request_line_is_414(responder, extra):
    target = "/" + "a" * (4096 - len("GET / HTTP/1.1") + extra)
    status, headers, body = parse(raw(responder.port, f"GET {target} HTTP/1.1\r\n\r\n".encode()))
    assert status == 414
    assert_common_headers(headers, body)


def test_oversized_request_line_without_newline_is_414(responder):
    assert raw_status(responder.port, b"GET /" + b"a" * 5000) == 414


def test_headers_just_within_8_kib_are_accepted(responder):
    # Ten field lines, each with its CRLF, adding up to exactly 8192 bytes.
    fields = [f"X-{i}: " + "v" * (819 - 5 - 2) for i in range(9)]
    fields.append("X-9: " + "v" * (8192 - 9 * 819 - 5 - 2))
    assert sum(len(f) + 2 for f in fields) == 8192
    head = "GET / HTTP/1.1\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n"
    assert raw_status(responder.port, head.encode()) == 301


@pytest.mark.parametrize(
    "fields",
    [
        [f"X-{i}: " + "v" * 1000 for i in range(10)],
        ["X-Big: " + "v" * 9000],
        ["X-Big: " + "v" * 200_000],
        [f"X-{i}: " + "v" * (819 - 5 - 2) for i in range(10)] + ["X: y"],
    ],
)
def test_oversized_headers_are_431(responder, fields):
    head = "GET / HTTP/1.1\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n"
    status, headers, body = parse(raw(responder.port, head.encode()))
    assert status == 431
    assert_common_headers(headers, body)


def test_64_headers_are_accepted_and_65_are_431(responder):
    def head(count: int) -> bytes:
        return (
            "GET / HTTP/1.1\r\n" + "".join(f"X-{i}: a\r\n" for i in range(count)) + "\r\n"
        ).encode()

    assert raw_status(responder.port, head(64)) == 301
    assert raw_status(responder.port, head(65)) == 431
    assert raw_status(responder.port, head(1000)) == 431


# -- timeouts and concurrency -------------------------------------------------------------


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def test_a_stalled_client_does_not_delay_another(make_responder):
    responder = make_responder(read_timeout=5.0)
    with connect(responder.port) as stalled:
        stalled.sendall(b"GET /.well-known/acme-chall")
        time.sleep(0.1)
        started = time.monotonic()
        response, body = request(responder, "GET", PREFIX + TOKEN)
        elapsed = time.monotonic() - started
        assert (response.status, body) == (200, KEY_AUTHZ.encode())
        assert elapsed < 1.0
        # The stalled client is still waiting: nothing was answered to it yet.
        assert select.select([stalled], [], [], 0)[0] == []


def test_slow_loris_is_cut_after_read_timeout_in_total(make_responder):
    responder = make_responder(read_timeout=1.5)
    trickle = b"GET / HTTP/1.1\r\nHost: registry.example.com\r\nX-Slow: " + b"a" * 100
    with connect(responder.port) as sock:
        started = time.monotonic()
        answer = b""
        for byte in trickle:
            # Send one byte every 0.3 s until the server answers or closes.
            if select.select([sock], [], [], 0.3)[0]:
                answer = read_all(sock)
                break
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the trickling client was never cut off")
        elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 3.0
    assert answer == b"" or parse(answer)[0] == 408


def test_a_silent_client_is_closed_after_read_timeout(make_responder):
    responder = make_responder(read_timeout=0.5)
    with connect(responder.port) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
        assert 0.4 <= time.monotonic() - started < 2.0


def test_connections_over_the_cap_are_closed_at_once(make_responder):
    responder = make_responder(read_timeout=5.0, max_connections=2)
    holders = [connect(responder.port) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(b"GET / HT")
        time.sleep(0.2)
        with connect(responder.port) as extra:
            started = time.monotonic()
            assert read_all(extra) == b""
            assert time.monotonic() - started < 1.0
    finally:
        for sock in holders:
            sock.close()
    # Freed slots serve again.
    deadline = time.monotonic() + 3
    while True:
        try:
            assert request(responder, "GET", PREFIX + TOKEN)[0].status == 200
            break
        except (ConnectionError, http.client.RemoteDisconnected):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_many_concurrent_clients_are_all_served(responder):
    results: list[int] = []

    def fetch() -> None:
        results.append(request(responder, "GET", PREFIX + TOKEN)[0].status)

    threads = [threading.Thread(target=fetch) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [200] * 32


# -- addresses and lifecycle --------------------------------------------------------------


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_every_address_listens_on_ipv4(make_responder):
    responder = make_responder(host="")
    response, body = request(responder, "GET", PREFIX + TOKEN, host="127.0.0.1")
    assert (response.status, body) == (200, KEY_AUTHZ.encode())


def test_every_address_falls_back_to_ipv4_without_dual_stack(make_responder, monkeypatch):
    monkeypatch.setattr(socket, "has_dualstack_ipv6", lambda: False)
    responder = make_responder(host="")
    assert request(responder, "GET", PREFIX + TOKEN)[0].status == 200


def test_every_address_falls_back_to_ipv4_when_ipv6_cannot_bind(make_responder, monkeypatch):
    real = socket.create_server

    def no_ipv6(address, *, family=socket.AF_INET, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(address, family=family, **kwargs)

    monkeypatch.setattr(socket, "create_server", no_ipv6)
    responder = make_responder(host="")
    assert request(responder, "GET", PREFIX + TOKEN)[0].status == 200


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_every_address_listens_on_ipv6_and_ipv4_at_once(make_responder):
    responder = make_responder(host="")
    for host in ("::1", "127.0.0.1"):
        response, body = request(responder, "GET", PREFIX + TOKEN, host=host)
        assert (response.status, body) == (200, KEY_AUTHZ.encode())
    status, headers, _ = parse(
        raw(responder.port, b"GET /v2/ HTTP/1.1\r\nHost: [::1]\r\n\r\n", "::1")
    )
    assert (status, headers["location"]) == (301, "https://registry.example.com/v2/")


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_a_specific_host_binds_only_that_address(make_responder):
    responder = make_responder(host="127.0.0.1")
    with pytest.raises(ConnectionRefusedError):
        connect(responder.port, "::1").close()
    v6 = make_responder(host="::1")
    assert request(v6, "GET", PREFIX + TOKEN, host="::1")[0].status == 200
    with pytest.raises(ConnectionRefusedError):
        connect(v6.port, "127.0.0.1").close()


def test_stop_refuses_new_connections_and_is_idempotent(lookup):
    responder = ChallengeResponder(DOMAINS, lookup, 0, "127.0.0.1")
    responder.start()
    port = responder.port
    assert port != 0
    assert request(responder, "GET", PREFIX + TOKEN)[0].status == 200
    responder.stop()
    responder.stop()
    assert responder.port == port
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()


def test_stop_cuts_a_connection_in_progress(lookup):
    responder = ChallengeResponder(DOMAINS, lookup, 0, "127.0.0.1", read_timeout=30)
    responder.start()
    with connect(responder.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(0.1)
        started = time.monotonic()
        responder.stop()
        assert read_all(sock) == b""
        assert time.monotonic() - started < 2.0


def test_start_twice_is_an_error_and_restart_after_stop_works(lookup):
    responder = ChallengeResponder(DOMAINS, lookup, 0, "127.0.0.1")
    responder.start()
    try:
        with pytest.raises(RuntimeError):
            responder.start()
    finally:
        responder.stop()
    responder.start()
    try:
        assert request(responder, "GET", PREFIX + TOKEN)[0].status == 200
    finally:
        responder.stop()


def test_port_in_use_is_an_error(lookup):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        responder = ChallengeResponder(DOMAINS, lookup, other.getsockname()[1], "127.0.0.1")
        with pytest.raises(OSError):
            responder.start()


@pytest.mark.parametrize(
    "domains", [(), ("bad domain",), ("evil.example\r\nX: y",), ("a..b",), ("*.*.example.com",)]
)
def test_invalid_domains_are_rejected(lookup, domains):
    with pytest.raises(ValueError):
        ChallengeResponder(domains, lookup, 0)


def test_domains_are_normalised(lookup):
    responder = ChallengeResponder(["Registry.Example.COM."], lookup, 0, "127.0.0.1")
    responder.start()
    try:
        response, _ = request(responder, "GET", "/", {"Host": "REGISTRY.example.com"})
        assert response.getheader("Location") == "https://registry.example.com/"
    finally:
        responder.stop()


def test_ip_address_names_serve_challenges_and_redirect_in_brackets():
    lookup = Lookup({"tok": "tok.thumb"})
    responder = ChallengeResponder(("127.0.0.1", "::1", "*.example.net"), lookup, 0, "127.0.0.1")
    responder.start()
    try:
        response, body = request(
            responder, "GET", "/.well-known/acme-challenge/tok", {"Host": "127.0.0.1"}
        )
        assert (response.status, body) == (200, b"tok.thumb")
        response, _ = request(responder, "GET", "/v2/", {"Host": "[::1]:80"})
        assert response.getheader("Location") == "https://[::1]/v2/"
        response, _ = request(responder, "GET", "/v2/", {"Host": "mirror.example.net"})
        assert response.getheader("Location") == "https://mirror.example.net/v2/"
        response, _ = request(responder, "GET", "/v2/", {"Host": "evil.example"})
        assert response.getheader("Location") == "https://127.0.0.1/v2/"
    finally:
        responder.stop()


# -- the second look (a shared store): in a thread, bounded, never on the event loop --------

OTHER = "zv0QwN1Z8eR3mYk6W9HcT2aJpLs5UdXfGbIoEyKrAq4"


def test_a_token_unknown_here_is_answered_by_the_remote_lookup(make_responder) -> None:
    asked: list[tuple[str, str | None]] = []

    def remote(token: str, host: str | None) -> str | None:
        asked.append((token, host))
        return f"{token}.remote" if token == OTHER else None

    responder = make_responder(remote=remote)
    response, body = request(
        responder, "GET", PREFIX + OTHER, headers={"Host": "registry.example.com"}
    )
    assert response.status == 200 and body == f"{OTHER}.remote".encode()
    assert asked == [(OTHER, "registry.example.com")]
    response, _ = request(responder, "GET", PREFIX + TOKEN)  # known here: no remote look
    assert response.status == 200 and len(asked) == 1
    response, _ = request(responder, "GET", PREFIX + "u" * 43)
    assert response.status == 404


def test_a_slow_remote_lookup_delays_nobody_else_and_times_out(make_responder) -> None:
    release = threading.Event()

    def remote(token: str, host: str | None) -> str | None:
        release.wait(10)
        return "too late"

    responder = make_responder(remote=remote, remote_timeout=1.5)
    slow: dict[str, object] = {}

    def ask_slow() -> None:
        started = time.monotonic()
        slow["response"] = request(responder, "GET", PREFIX + OTHER)[0].status
        slow["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=ask_slow)
    thread.start()
    time.sleep(0.2)
    # The remote lookup blocks for 10 s unless released: had it run on the event loop, this
    # request (5 s timeout) could not be answered.
    response, _ = request(responder, "GET", "/v2/", headers={"Host": "registry.example.com"})
    assert response.status == 301
    thread.join(10)
    release.set()
    # Not answered from the lookup past its bound (1.5 s), and well before it returned.
    assert slow["response"] == 404 and float(slow["seconds"]) < 8  # type: ignore[arg-type]
