import datetime as dt

from acme_registry import dnspersist
from acme_registry.config import load_settings
from acme_registry.dnslookup import TxtAnswer
from acme_registry.persistcheck import PersistPrecondition

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
ACCOUNT = "https://ca.test/acct/1"
SETTINGS = load_settings(
    {
        "ACME_DOMAINS": "example.com,*.example.com,other.example",
        "ACME_CHALLENGE": "dns-persist-01",
        "REGISTRY_BINARY": "/bin/sh",
    }
)
RECORDS = dnspersist.records_for(SETTINGS.domains, "ca.test", ACCOUNT)


class Shown:
    """What each of two authoritative servers shows, per record name, with one TTL."""

    def __init__(self, table: dict[str, list[frozenset[str] | str]], ttl: int | None) -> None:
        self.table = table
        self.ttl = ttl

    def answers(self, fqdn: str) -> dict[str, TxtAnswer]:
        shown = self.table.get(fqdn, [frozenset()])
        return {f"ns{i}": TxtAnswer(v, self.ttl) for i, v in enumerate(shown)}


def precondition(table, records=lambda: RECORDS, ttl: int | None = 60) -> PersistPrecondition:
    return PersistPrecondition(SETTINGS, records, Shown(table, ttl))  # type: ignore[arg-type]


def check(table, records=lambda: RECORDS) -> str | None:
    return precondition(table, records).check(NOW)


def test_records_on_every_server_pass():
    both = {r.name: [frozenset({r.value}), frozenset({r.value, "x"})] for r in RECORDS}
    assert check(both) is None


def test_a_record_missing_on_one_server_names_it_with_its_value():
    table = {r.name: [frozenset({r.value})] * 2 for r in RECORDS}
    other = RECORDS[1]
    table[other.name] = [frozenset({other.value}), "timed out"]
    problem = check(table)
    assert problem is not None
    assert problem.startswith(f"no dns-persist-01 record at {other.name}")
    assert f'create TXT {other.name} "{other.value}"' in problem
    assert RECORDS[0].name not in problem


def test_the_wildcard_needs_the_policy():
    no_policy = dnspersist.record_value("ca.test", ACCOUNT)
    table = {r.name: [frozenset({r.value})] * 2 for r in RECORDS}
    table[RECORDS[0].name] = [frozenset({no_policy})] * 2
    problem = check(table)
    assert problem is not None and "policy=wildcard" in problem


def test_records_that_cannot_be_known_are_the_problem():
    assert check({}, records=lambda: "ACME_DNS_PERSIST_ISSUER: required") == (
        "ACME_DNS_PERSIST_ISSUER: required"
    )


def test_the_next_look_is_30_s_or_the_answers_ttl_when_longer():
    short = precondition({}, ttl=5)
    assert short.check(NOW) is not None and short.delay() == 30
    # A missing record whose zone's negative TTL is an hour: looked at again in an hour.
    long = precondition({}, ttl=3600)
    assert long.check(NOW) is not None and long.delay() == 3600
    unknown = precondition({}, ttl=None)
    assert unknown.check(NOW) is not None and unknown.delay() == 30
