import pytest

from acme_registry import names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("registry.example.com", True),
        ("a", True),
        ("xn--bcher-kva.example", True),
        ("-bad.example", False),
        ("bad-.example", False),
        ("bad_name.example", False),
        ("a" * 64 + ".example", False),
        (".".join(["a" * 63] * 4), False),  # 255 characters
        ("double..dot", False),
    ],
)
def test_host_names(name, expected):
    assert names.is_dns_name(name) is expected


def test_min_labels_and_underscores():
    assert not names.is_dns_name("localhost", min_labels=2)
    assert names.is_dns_name("_acme-challenge.example.test", labels=names.DNS_LABEL)
    assert not names.is_dns_name("_acme-challenge.example.test")


def test_ip_literals():
    assert names.is_ip("127.0.0.1") and names.is_ip("::1") and names.is_ip("[::1]")
    assert not names.is_ip("registry.test") and not names.is_ip("1.2.3")


def test_tokens_and_user_names():
    assert names.is_acme_token("a" * 256) and not names.is_acme_token("a" * 257)
    assert not names.is_acme_token("abc\n") and not names.is_acme_token("a/b")
    assert names.is_user_name("ci.bot-1") and not names.is_user_name("a:b")
