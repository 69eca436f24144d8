"""The port-80 request-head parser and response framing, without any socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acme_registry.httphead import (
    MAX_HEADER_BYTES,
    MAX_HEADER_LINES,
    MAX_REQUEST_LINE,
    HeadParser,
    Reject,
    Request,
    normalise_host,
    normalise_target,
    parse_header_line,
    parse_request_line,
    redirect_host,
    response,
    strip_port,
)

DOMAINS = ("registry.example.com", "alt.example.org")


def parse(data: bytes) -> Request | None:
    return HeadParser().feed(data)


def status_of(data: bytes) -> int:
    with pytest.raises(Reject) as rejected:
        parse(data)
    return rejected.value.status


# -- complete heads -------------------------------------------------------------------------


def test_a_plain_get():
    request = parse(b"GET /v2/ HTTP/1.1\r\nHost: registry.example.com\r\nAccept: */*\r\n\r\n")
    assert request == Request("GET", "/v2/", "HTTP/1.1", "registry.example.com", False)


def test_no_host_is_none():
    request = parse(b"GET /a?b HTTP/1.0\r\n\r\n")
    assert request is not None
    assert request.host is None


def test_host_value_is_trimmed_of_spaces_and_tabs():
    request = parse(b"GET / HTTP/1.1\r\nHost: \t a.example \t\r\n\r\n")
    assert request is not None and request.host == "a.example"


def test_header_names_are_case_insensitive():
    request = parse(b"GET / HTTP/1.1\r\nhOsT: a.example\r\n\r\n")
    assert request is not None and request.host == "a.example"


def test_bare_lf_line_ends_are_accepted():
    request = parse(b"GET /x HTTP/1.1\nHost: a\n\n")
    assert request == Request("GET", "/x", "HTTP/1.1", "a")


def test_mixed_line_ends_are_accepted():
    request = parse(b"GET /x HTTP/1.1\r\nHost: a\n\r\n")
    assert request is not None and request.host == "a"


def test_up_to_four_empty_lines_before_the_request_line_are_skipped():
    assert parse(b"\r\n\n\r\n\r\nGET / HTTP/1.1\r\n\r\n") is not None
    assert status_of(b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n") == 400


@pytest.mark.parametrize(
    ("field", "announced"),
    [
        (b"Content-Length: 10", True),
        (b"Content-Length: 0", False),
        (b"Transfer-Encoding: chunked", True),
        (b"X-Other: 1", False),
    ],
)
def test_a_body_is_announced_by_length_or_transfer_encoding(field, announced):
    request = parse(b"POST / HTTP/1.1\r\n" + field + b"\r\n\r\n")
    assert request is not None and request.body_announced is announced


def test_an_incomplete_head_needs_more():
    parser = HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert parser.feed(b"\r\n") is not None


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=40))
def test_the_split_into_pieces_does_not_matter(cuts):
    head = b"GET /x?y HTTP/1.1\r\nHost: alt.example.org:80\r\nContent-Length: 3\r\n\r\nabc"
    parser = HeadParser()
    result, start = None, 0
    for cut in [*cuts, len(head)]:
        piece, start = head[start : start + cut], start + cut
        if piece:
            result = parser.feed(piece)
            if result is not None:
                break
    assert result == Request("GET", "/x?y", "HTTP/1.1", "alt.example.org:80", True)


def test_leftover_and_received_count_what_came_after_the_head():
    parser = HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\n\r\n") is not None
    assert not parser.leftover
    assert parser.received == 18
    parser = HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n") is not None
    assert parser.leftover


def test_end_of_input_before_anything_is_a_silent_close_and_after_bytes_a_400():
    HeadParser().end_of_input()
    parser = HeadParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n")
    with pytest.raises(Reject) as rejected:
        parser.end_of_input()
    assert rejected.value.status == 400


# -- malformed heads: 400 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\r\n",  # a TLS ClientHello
        b"hello\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / http/1.1\r\n\r\n",
        b"GET / HTTP/1.1x\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b" GET / HTTP/1.1\r\n\r\n",
        b"GET\t/ HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_request_lines_are_400(data):
    assert status_of(data) == 400


@pytest.mark.parametrize(
    "data",
    [
        b"GET /x\rSet-Cookie: a=b HTTP/1.1\r\nHost: a\r\n\r\n",  # CR in the target
        b"GET /x\x00y HTTP/1.1\r\n\r\n",  # NUL
        b"GET /x\x1by HTTP/1.1\r\n\r\n",  # ESC
        b"GET /x\x7fy HTTP/1.1\r\n\r\n",  # DEL
        b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",  # non-ASCII
        b"GET /x\r\nSet-Cookie: a=b HTTP/1.1\r\n\r\n",  # a line of its own: no colon rule
    ],
)
def test_control_and_non_ascii_bytes_in_the_request_line_are_400(data):
    assert status_of(data) == 400


@pytest.mark.parametrize(
    "field",
    [
        b"Host: registry.example.com\rSet-Cookie: a=b",  # lone CR inside a value
        b"Host: a\x00b",  # NUL
        b"X: a\x7fb",  # DEL
        b"X: a\x01b",
        b"X: a\x1fb",
    ],
)
def test_control_characters_in_field_values_are_400(field):
    assert status_of(b"GET /x HTTP/1.1\r\n" + field + b"\r\n\r\n") == 400


def test_htab_and_obs_text_in_field_values_are_accepted():
    request = parse(b"GET / HTTP/1.1\r\nX: a\tb\xe9\r\n\r\n")
    assert request is not None


@pytest.mark.parametrize(
    "field",
    [
        b"No colon here",
        b"Host : a",  # whitespace before the colon (RFC 9112 section 5.1)
        b"Host\t: a",
        b": empty-name",
        b"X(y): z",
    ],
)
def test_malformed_field_lines_are_400(field):
    assert status_of(b"GET / HTTP/1.1\r\n" + field + b"\r\n\r\n") == 400


@pytest.mark.parametrize("fold", [b" folded", b"\tfolded"])
def test_obsolete_line_folding_is_400(fold):
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\n" + fold + b"\r\n\r\n") == 400


@pytest.mark.parametrize(
    "fields",
    [
        b"Host: a\r\nHost: b\r\n",
        b"Host: a\r\nHost: a\r\n",
        b"Host: a\r\nhost: b\r\n",
    ],
)
def test_more_than_one_host_is_400(fields):
    assert status_of(b"GET / HTTP/1.1\r\n" + fields + b"\r\n") == 400


def test_a_duplicate_host_is_refused_only_once_the_head_is_complete():
    parser = HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n") is None
    with pytest.raises(Reject):
        parser.feed(b"\r\n")


# -- limits: 414 and 431 -----------------------------------------------------------------------


def request_line(length: int) -> bytes:
    target = "/" + "a" * (length - len("GET / HTTP/1.1"))
    line = f"GET {target} HTTP/1.1".encode()
    assert len(line) == length
    return line


def test_a_request_line_at_the_limit_is_accepted():
    assert parse(request_line(MAX_REQUEST_LINE) + b"\r\n\r\n") is not None
    assert parse(request_line(MAX_REQUEST_LINE) + b"\n\n") is not None


@pytest.mark.parametrize("extra", [1, 2, 5000, 100_000])
def test_a_request_line_over_the_limit_is_414(extra):
    assert status_of(request_line(MAX_REQUEST_LINE + extra) + b"\r\n\r\n") == 414


def test_an_overlong_request_line_is_414_before_its_end_arrives():
    parser = HeadParser()
    assert parser.feed(b"GET /" + b"a" * (MAX_REQUEST_LINE - 4)) is None
    with pytest.raises(Reject) as rejected:
        parser.feed(b"a" * 2)
    assert rejected.value.status == 414


def fields_of(sizes: list[int]) -> bytes:
    """Field lines whose lengths (each with its CRLF) are ``sizes``."""
    lines = []
    for i, size in enumerate(sizes):
        name = f"X-{i}: ".encode()
        lines.append(name + b"v" * (size - len(name) - 2) + b"\r\n")
        assert len(lines[-1]) == size
    return b"".join(lines)


def test_header_fields_of_exactly_8_kib_are_accepted():
    fields = fields_of([819] * 9 + [MAX_HEADER_BYTES - 9 * 819])
    assert len(fields) == MAX_HEADER_BYTES
    assert parse(b"GET / HTTP/1.1\r\n" + fields + b"\r\n") is not None


@pytest.mark.parametrize(
    "sizes",
    [
        [819] * 9 + [MAX_HEADER_BYTES - 9 * 819 + 1],
        [1007] * 10,
        [9000],
        [200_000],
    ],
)
def test_header_fields_over_8_kib_are_431(sizes):
    assert status_of(b"GET / HTTP/1.1\r\n" + fields_of(sizes) + b"\r\n") == 431


def test_an_overlong_field_is_431_before_its_end_arrives():
    parser = HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nX: " + b"v" * (MAX_HEADER_BYTES - 10)) is None
    with pytest.raises(Reject) as rejected:
        parser.feed(b"v" * 20)
    assert rejected.value.status == 431


def test_64_fields_are_accepted_and_65_are_431():
    def head(count: int) -> bytes:
        return b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(count)) + b"\r\n"

    assert parse(head(MAX_HEADER_LINES)) is not None
    assert status_of(head(MAX_HEADER_LINES + 1)) == 431
    assert status_of(head(1000)) == 431


# -- the pieces ------------------------------------------------------------------------------


def test_parse_request_line_keeps_the_exact_target():
    assert parse_request_line(b"HEAD /a%2Fb?c=d HTTP/1.0") == Request(
        "HEAD", "/a%2Fb?c=d", "HTTP/1.0"
    )


def test_parse_header_line_lowercases_the_name_only():
    assert parse_header_line(b"X-Thing:  Value ") == (b"x-thing", b"Value")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", "/"),
        ("/v2/_catalog?n=10&last=a", "/v2/_catalog?n=10&last=a"),
        ("/x#frag", "/x"),
        ("/x?y#frag", "/x?y"),
        ("/@evil.example", "/@evil.example"),
        ("/x%0d%0aSet-Cookie:%20a=b", "/x%0d%0aSet-Cookie:%20a=b"),
        # Network-path references: never a Location that leaves the domain.
        ("//evil.example/x", "/evil.example/x"),
        ("///evil.example", "/evil.example"),
        ("/\\evil.example/x", "/evil.example/x"),
        ("/\\/evil.example", "/evil.example"),
        # Absolute form: the authority is dropped, the path and query kept.
        ("http://evil.example/x", "/x"),
        ("http://evil.example/x?y=1", "/x?y=1"),
        ("HTTPS://evil.example", "/"),
        ("http://evil.example?q", "/?q"),
        ("http://evil.example//evil2.example/x", "/evil2.example/x"),
        ("http://user@evil.example/x", "/x"),
        ("http://evil.example/\\evil2.example", "/evil2.example"),
    ],
)
def test_normalise_target(target, expected):
    assert normalise_target(target) == expected


@pytest.mark.parametrize("target", ["*", "evil.example/x", "ftp://evil.example/x", "@evil"])
def test_a_target_that_is_not_a_path_is_400(target):
    with pytest.raises(Reject) as rejected:
        normalise_target(target)
    assert rejected.value.status == 400


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("a.example", "a.example"),
        ("a.example:80", "a.example"),
        ("a.example:x", "a.example:x"),
        ("[::1]:80", "::1"),
        ("[::1]", "::1"),
        (" a.example ", "a.example"),
    ],
)
def test_strip_port(host, name):
    assert strip_port(host) == name


def test_normalise_host():
    assert normalise_host(" Registry.Example.COM. ") == "registry.example.com"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Registry.Example.COM:80", "registry.example.com"),
        ("ALT.example.org", "alt.example.org"),
        ("alt.example.org.:8080", "alt.example.org"),
        ("evil.example", "registry.example.com"),
        ("registry.example.com.evil.example", "registry.example.com"),
        ("[::1]:80", "registry.example.com"),
        ("127.0.0.1", "registry.example.com"),
        ("", "registry.example.com"),
        (None, "registry.example.com"),
    ],
)
def test_redirect_host_is_always_a_configured_name(host, expected):
    assert redirect_host(host, DOMAINS) == expected


# -- responses ---------------------------------------------------------------------------------


def test_a_response_is_framed_with_length_and_close():
    data = response(
        301,
        head_only=False,
        headers=[("Location", "https://a.example/")],
        date="Tue, 01 Dec 2026 10:00:00 GMT",
    )
    assert data == (
        b"HTTP/1.1 301 Moved Permanently\r\n"
        b"Server: acme-registry\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 22\r\n"
        b"Connection: close\r\n"
        b"Location: https://a.example/\r\n"
        b"\r\n"
        b"301 Moved Permanently\n"
    )


def test_a_head_response_has_the_length_but_no_body():
    data = response(200, head_only=True, body=b"token.thumbprint")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 16\r\n" in head + b"\r\n"
    assert body == b""


@pytest.mark.parametrize("status", [200, 301, 400, 404, 405, 408, 414, 431])
def test_every_status_has_its_reason(status):
    assert response(status, head_only=False).startswith(f"HTTP/1.1 {status} ".encode())


IP_AND_WILDCARD = ("registry.example.com", "*.example.net", "192.0.2.7", "2001:db8::7")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("192.0.2.7:80", "192.0.2.7"),
        ("[2001:DB8:0::7]:80", "[2001:db8::7]"),
        ("[2001:db8::7]", "[2001:db8::7]"),
        ("[::1]:80", "registry.example.com"),
        ("Mirror.Example.NET", "mirror.example.net"),
        ("a.b.example.net", "registry.example.com"),
        ("example.net", "registry.example.com"),
        ("-bad.example.net", "registry.example.com"),
    ],
)
def test_redirect_host_with_ip_addresses_and_wildcards(host, expected):
    assert redirect_host(host, IP_AND_WILDCARD) == expected


def test_redirect_host_brackets_a_configured_ipv6_fallback():
    assert redirect_host("evil.example", ("::1",)) == "[::1]"
    assert redirect_host(None, ("*.example.net",)) == "example.net"
