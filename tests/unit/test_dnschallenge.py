import josepy as jose
import pytest
from acme import challenges, messages
from cryptography.hazmat.primitives.asymmetric import ec

from acme_registry import dnschallenge
from acme_registry.dnspersist import CHALLENGE_TYPE
from acme_registry.dnsproviders import DnsError

KEY = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


def authz(name, kinds, *, wildcard=False, status="pending", issuers=("ca.example",)):
    objects = []
    for i, kind in enumerate(kinds):
        url = f"https://ca.example/chall/{name}/{i}"
        if kind == CHALLENGE_TYPE:
            objects.append(
                {
                    "type": kind,
                    "url": url,
                    "status": "pending",
                    "issuer-domain-names": list(issuers),
                }
            )
        else:
            objects.append({"type": kind, "url": url, "status": "pending", "token": TOKEN})
    body = {
        "identifier": {"type": "dns", "value": name},
        "status": status,
        "challenges": objects,
    }
    if wildcard:
        body["wildcard"] = True
    return messages.AuthorizationResource(
        body=messages.Authorization.from_json(body), uri=f"https://ca.example/authz/{name}"
    )


class RecordingProvider:
    """A DnsProvider that keeps the TXT sets in memory and fails on request."""

    def __init__(self, fail_on=None):
        self.sets: dict[str, set[str]] = {}
        self.fail_on = fail_on

    def present(self, fqdn, value):
        if value == self.fail_on:
            raise DnsError(f"cannot add {value}")
        self.sets.setdefault(fqdn, set()).add(value)

    def cleanup(self, fqdn, value):
        if value == self.fail_on:
            raise DnsError(f"cannot remove {value}")
        self.sets.get(fqdn, set()).discard(value)


def test_a_name_and_its_wildcard_share_one_record_name():
    authzs = [
        authz("example.com", ["http-01", "dns-01"]),
        authz("example.com", ["dns-01"], wildcard=True),
        authz("done.example.com", ["dns-01"], status="valid"),
    ]
    records = dnschallenge.dns01_records(authzs, KEY)
    assert [r.identifier for r in records] == ["example.com", "*.example.com"]
    assert {r.fqdn for r in records} == {"_acme-challenge.example.com"}
    expected = challenges.DNS01(token=jose.b64decode(TOKEN)).validation(KEY)
    assert {r.value for r in records} == {expected}  # same token in this fixture
    assert dnschallenge.wanted(records) == {"_acme-challenge.example.com": {expected}}
    response = dnschallenge.answer(records[0], KEY)
    assert isinstance(response, challenges.DNS01Response)
    state = records[1].to_state()
    assert dnschallenge.record_from_state(state).fqdn == "_acme-challenge.example.com"
    with pytest.raises(ValueError):
        dnschallenge.answer(dnschallenge.record_from_state(state), KEY)


def test_no_dns01_offered():
    with pytest.raises(DnsError) as error:
        dnschallenge.dns01_records([authz("example.com", ["http-01", "tls-alpn-01"])], KEY)
    assert "no dns-01 challenge for example.com (only http-01, tls-alpn-01)" in str(error.value)


def test_present_all_rolls_back_on_failure_and_cleanup_goes_on():
    records = [
        dnschallenge.Dns01Record("a.example", "_acme-challenge.a.example", "one"),
        dnschallenge.Dns01Record("b.example", "_acme-challenge.b.example", "two"),
    ]
    provider = RecordingProvider(fail_on="two")
    with pytest.raises(DnsError):
        dnschallenge.present_all(provider, records)
    assert provider.sets == {"_acme-challenge.a.example": set()}
    provider.sets["_acme-challenge.a.example"].add("one")
    failures = dnschallenge.cleanup_all(provider, list(reversed(records)))
    assert [str(f) for f in failures] == ["cannot remove two"]
    assert provider.sets["_acme-challenge.a.example"] == set()


def test_persist_challenges():
    authzs = [
        authz("example.com", ["dns-01", CHALLENGE_TYPE]),
        authz("example.com", [CHALLENGE_TYPE], wildcard=True),
    ]
    found = dnschallenge.persist_challenges(authzs, "ca.example")
    assert [f.identifier for f in found] == ["example.com", "*.example.com"]
    assert found[0].parsed.issuer_domain_names == ("ca.example",)
    assert found[0].challenge.uri == "https://ca.example/chall/example.com/1"


def test_persist_challenge_missing_or_for_another_issuer():
    with pytest.raises(DnsError) as error:
        dnschallenge.persist_challenges([authz("example.com", ["dns-01"])], "ca.example")
    assert "no dns-persist-01 challenge for example.com" in str(error.value)
    with pytest.raises(DnsError) as error:
        dnschallenge.persist_challenges(
            [authz("example.com", [CHALLENGE_TYPE], issuers=("other.example",))], "ca.example"
        )
    assert "ACME_DNS_PERSIST_ISSUER" in str(error.value)
