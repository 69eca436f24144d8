import datetime as dt
import json

import pytest
from acme import messages

from acme_registry.config import ConfigError
from acme_registry.dnschallenge import DnsPersist01Response
from acme_registry.dnspersist import (
    PersistRecord,
    PersistStatus,
    check_record,
    choose_issuer,
    group_by_record,
    parse_challenge,
    parse_value,
    quote_txt,
    recheck_delay,
    record_name,
    records_for,
    render_json,
    render_zone_lines,
)

ISSUER = "pebble.letsencrypt.org"
ACCOUNT = "https://ca.test/acme/acct/1"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def test_record_names():
    assert record_name("Example.COM.") == "_validation-persist.example.com."
    assert record_name("*.example.com") == "_validation-persist.example.com."


def test_records_one_per_base_name_with_wildcard_policy():
    records = records_for(["example.com", "*.example.com", "www.example.org"], ISSUER, ACCOUNT)
    assert records == [
        PersistRecord(
            "_validation-persist.example.com.",
            f"{ISSUER}; accounturi={ACCOUNT}; policy=wildcard",
        ),
        PersistRecord("_validation-persist.www.example.org.", f"{ISSUER}; accounturi={ACCOUNT}"),
    ]


def test_json_rendering_is_exactly_the_documented_shape():
    records = records_for(["example.com", "*.example.com"], ISSUER, ACCOUNT)
    text = render_json(records)
    assert text == (
        '{"records": [{"name": "_validation-persist.example.com.", "type": "TXT", '
        f'"value": "{ISSUER}; accounturi={ACCOUNT}; policy=wildcard"}}]}}'
    )
    assert json.loads(text)["records"][0]["value"].startswith(ISSUER)


def test_zone_file_lines():
    records = records_for(["a.example.com", "b.example.com"], ISSUER, ACCOUNT)
    assert render_zone_lines(records) == (
        f'_validation-persist.a.example.com. IN TXT "{ISSUER}; accounturi={ACCOUNT}"\n'
        f'_validation-persist.b.example.com. IN TXT "{ISSUER}; accounturi={ACCOUNT}"\n'
    )


def test_quote_txt_escapes_and_splits_long_values():
    assert quote_txt('a "b" \\c') == '"a \\"b\\" \\\\c"'
    long = quote_txt("x" * 300)
    assert long == f'"{"x" * 255}" "{"x" * 45}"'


def test_parse_value():
    value = parse_value(f" {ISSUER}. ;AccountURI = {ACCOUNT} ; Policy=Wildcard; persistUntil=1 ")
    assert value.issuer == ISSUER and value.account_uri == ACCOUNT
    assert value.allows_wildcard
    assert value.persist_until == dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=dt.UTC)
    assert value.problem is None
    assert parse_value(ISSUER).account_uri is None
    assert parse_value(f"{ISSUER}; persistUntil=soon").problem is not None
    assert parse_value(f"{ISSUER}; accounturi").problem is not None
    assert parse_value(f"{ISSUER}; accounturi={ACCOUNT}; future=1").problem is None


def verdict(identifiers, found, issuers=(ISSUER,)):
    return check_record(identifiers, found, issuers=list(issuers), account_uri=ACCOUNT, now=NOW)


def test_verdict_ok():
    result = verdict(["example.com"], ["v=spf1 -all", f"{ISSUER}; accounturi={ACCOUNT}"])
    assert result.ok and result.status is PersistStatus.OK
    wild = verdict(
        ["*.example.com", "example.com"], [f"{ISSUER};accounturi={ACCOUNT};policy=wildcard"]
    )
    assert wild.ok


def test_verdict_missing_gives_the_exact_value_to_create():
    result = verdict(["example.com"], ["other-ca.example; accounturi=x"])
    assert result.status is PersistStatus.MISSING
    assert result.record.value == f"{ISSUER}; accounturi={ACCOUNT}"
    assert result.message() == (
        "no dns-persist-01 record at _validation-persist.example.com.: create TXT "
        f'_validation-persist.example.com. "{ISSUER}; accounturi={ACCOUNT}"'
    )


def test_verdict_other_account():
    result = verdict(["example.com"], [f"{ISSUER}; accounturi=https://ca.test/acme/acct/2"])
    assert result.status is PersistStatus.OTHER_ACCOUNT
    assert "another ACME account" in result.message()
    assert "acct/2" in result.message() and f"accounturi={ACCOUNT}" in result.message()


def test_verdict_expired():
    expired = int((NOW - dt.timedelta(seconds=1)).timestamp())
    result = verdict(["example.com"], [f"{ISSUER}; accounturi={ACCOUNT}; persistUntil={expired}"])
    assert result.status is PersistStatus.EXPIRED and "persistUntil" in result.message()
    later = int((NOW + dt.timedelta(days=1)).timestamp())
    assert verdict(["example.com"], [f"{ISSUER}; accounturi={ACCOUNT}; persistUntil={later}"]).ok


def test_verdict_wildcard_needs_the_policy():
    result = verdict(["example.com", "*.example.com"], [f"{ISSUER}; accounturi={ACCOUNT}"])
    assert result.status is PersistStatus.NO_WILDCARD_POLICY
    assert result.record.value.endswith("; policy=wildcard")


def test_verdict_malformed_and_ranking():
    assert verdict(["example.com"], [ISSUER]).status is PersistStatus.MALFORMED
    # A record for this account that expired says more than one for another account.
    expired = int((NOW - dt.timedelta(days=1)).timestamp())
    found = [
        f"{ISSUER}; accounturi=https://other",
        f"{ISSUER}; accounturi={ACCOUNT}; persistUntil={expired}",
    ]
    assert verdict(["example.com"], found).status is PersistStatus.EXPIRED
    # Any of the CA's issuer names counts; the value to create names the first.
    other_name = verdict(
        ["example.com"],
        [f"letsencrypt.org; accounturi={ACCOUNT}"],
        issuers=(ISSUER, "letsencrypt.org"),
    )
    assert other_name.ok


def test_verdict_argument_errors():
    with pytest.raises(ValueError):
        verdict(["a.example.com", "b.example.com"], [])
    with pytest.raises(ValueError):
        verdict(["a.example.com"], [], issuers=())


def test_group_by_record_and_recheck():
    assert group_by_record(["example.com", "x.example.org", "*.example.com"]) == {
        "_validation-persist.example.com.": ["example.com", "*.example.com"],
        "_validation-persist.x.example.org.": ["x.example.org"],
    }
    assert recheck_delay([]) == 30 and recheck_delay([None]) == 30
    assert recheck_delay([10, None]) == 30
    # The longest answer TTL counts: any resolver may hold the old answer that long.
    assert recheck_delay([300, 60, None]) == 300


def test_issuer_choice():
    meta = {"caaIdentities": ["Pebble.LetsEncrypt.org", "second.example"]}
    assert choose_issuer(meta, None) == ISSUER
    assert choose_issuer(meta, "second.example") == "second.example"
    assert choose_issuer(meta, "elsewhere.example") == ISSUER
    assert choose_issuer({}, "letsencrypt.org") == "letsencrypt.org"
    assert choose_issuer({"caaIdentities": []}, "letsencrypt.org") == "letsencrypt.org"
    with pytest.raises(ConfigError) as error:
        choose_issuer(None, None)
    assert error.value.variable == "ACME_DNS_PERSIST_ISSUER"


PEBBLE_CHALLENGE = {
    "url": "https://127.0.0.1:14000/chalZ/Z3nEJefLmdyNeOtlMYZwQSrUoloo84m18RIqu0n81TE",
    "status": "pending",
    "type": "dns-persist-01",
    "issuer-domain-names": ["pebble.letsencrypt.org"],
}


def test_parse_pebble_challenge():
    challenge = parse_challenge(PEBBLE_CHALLENGE)
    assert challenge.url == PEBBLE_CHALLENGE["url"]
    assert challenge.status == "pending"
    assert challenge.issuer_domain_names == (ISSUER,)
    assert challenge.token is None and challenge.account_uri is None
    with_extras = parse_challenge({**PEBBLE_CHALLENGE, "token": "", "accounturi": ACCOUNT})
    assert with_extras.token is None and with_extras.account_uri == ACCOUNT


@pytest.mark.parametrize(
    "change",
    [
        {"type": "dns-01"},
        {"url": "http://plain"},
        {"issuer-domain-names": []},
        {"issuer-domain-names": ["not a name"]},
        {"issuer-domain-names": "pebble.letsencrypt.org"},
    ],
)
def test_parse_challenge_refuses(change):
    with pytest.raises(ValueError):
        parse_challenge({**PEBBLE_CHALLENGE, **change})


def test_persist_response_is_an_empty_object_not_a_post_as_get():
    response = DnsPersist01Response()
    # acme sends b"" (POST-as-GET) for a falsy body; "{}" is what starts validation.
    assert bool(response)
    assert response.json_dumps() == "{}"


def test_choose_issuer_reads_acme_directory_meta():
    directory = messages.Directory.from_json(
        {"newOrder": "https://ca.test/order", "meta": {"caaIdentities": ["Pebble.LetsEncrypt.org"]}}
    )
    meta = directory.meta.to_partial_json()
    assert choose_issuer(meta, None) == "pebble.letsencrypt.org"
