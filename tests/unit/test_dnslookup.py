import dns.message
import dns.name
import pytest

from acme_registry.dnsconfig import HostPort
from acme_registry.dnslookup import DnsLookup, answer_ttl, is_ip_address

QNAME = dns.name.from_text("_validation-persist.example.test.")


def response(text: str) -> dns.message.Message:
    return dns.message.from_text(
        "id 1\nopcode QUERY\nflags QR AA\n;QUESTION\n"
        f"{QNAME} IN TXT\n" + text.replace("\n    ", "\n").strip() + "\n"
    )


def test_the_records_ttl():
    answer = response(
        """;ANSWER
    _validation-persist.example.test. 300 IN TXT "ca.test; accounturi=https://ca.test/a/1"
    """
    )
    assert answer_ttl(answer, QNAME) == 300


def test_no_such_record_uses_the_negative_ttl_the_lower_of_soa_ttl_and_minimum():
    nxdomain = response(
        """;AUTHORITY
    example.test. 3600 IN SOA ns1.example.test. hostmaster.example.test. 1 3600 600 86400 900
    """
    )
    assert answer_ttl(nxdomain, QNAME) == 900
    low_soa_ttl = response(
        """;AUTHORITY
    example.test. 120 IN SOA ns1.example.test. hostmaster.example.test. 1 3600 600 86400 900
    """
    )
    assert answer_ttl(low_soa_ttl, QNAME) == 120


def test_unknown_without_an_soa():
    assert answer_ttl(response(""), QNAME) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("::1", True), ("2001:db8::53", True), ("ns1.example.test", False)],
)
def test_ip_addresses_are_not_looked_up(host, expected):
    assert is_ip_address(host) is expected


def test_an_address_is_its_own_address_and_messages_name_the_resolvers():
    lookup = DnsLookup((HostPort("192.0.2.53", 5353), HostPort("2001:db8::53")))
    assert lookup.addresses("192.0.2.7") == ["192.0.2.7"]
    assert lookup.via() == "via DNS_RESOLVERS 192.0.2.53:5353,[2001:db8::53]:53"
