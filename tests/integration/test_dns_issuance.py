"""Certificates from Pebble 2.10 validated through real DNS (BIND), with the acme library.

No agent here: these tests drive ``acme`` directly with the DNS modules, so they show the
exact calls the issuer makes for dns-01 and dns-persist-01 (whose challenge ``acme`` does not
parse). Pebble resolves only through BIND, and nothing answers HTTP-01, so only the DNS
records can have validated the names.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import josepy as jose
import pytest
from acme import client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from acme_registry import dnschallenge, dnspersist
from acme_registry.dnsconfig import HostPort, PropagationSettings, Rfc2136Settings
from acme_registry.dnspropagation import PropagationChecker
from acme_registry.dnsproviders import DnsProvider, ExecProvider, Rfc2136Provider
from tests.support.bind import (
    BindServer,
    TestZone,
    free_dns_port,
    start_bind_servers,
    start_zone_server,
    write_nsupdate_hook,
)
from tests.support.pebble_dns import PebbleWithDns, validating_pebble

ZONE = "example.test"
PEB = []
NAMES = [ZONE, f"*.{ZONE}"]


@pytest.fixture
def bind(tmp_path: Path) -> Iterator[BindServer]:
    server = start_zone_server(tmp_path / "bind", ZONE)
    yield server
    server.stop()


@pytest.fixture
def pebble(tmp_path: Path, bind: BindServer) -> Iterator[PebbleWithDns]:
    # No badNonce here: these tests drive the acme library directly and count Pebble's
    # orders, and retrying a new_order whose authorization fetch got two badNonces in a row
    # (the library retries once) placed a third order (seen once in a clean-clone run). The
    # agent's own badNonce handling is tested against Pebble's default 5 % elsewhere.
    instance = validating_pebble(tmp_path / "pebble", bind.server, nonce_reject=0)
    instance.start()
    PEB[:] = [instance]
    yield instance
    instance.stop()


def acme_client(pebble: PebbleWithDns) -> tuple[client.ClientV2, messages.RegistrationResource]:
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(
        key, alg=jose.ES256, verify_ssl=str(pebble.ca_bundle), user_agent="acme-registry-test"
    )
    net.session.trust_env = False
    directory = client.ClientV2.get_directory(pebble.directory_url, net)
    acme = client.ClientV2(directory, net)
    # Pebble rejects 5 % of nonces and acme retries only once: retry the whole call.
    regr = retry_bad_nonce(
        lambda: acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
    )
    return acme, regr


def retry_bad_nonce(call, attempts: int = 5):
    for attempt in range(attempts):
        try:
            return call()
        except messages.Error as error:
            if error.code != "badNonce" or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def csr_for(names: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return crypto_util.make_csr(key, names)


def assert_certificate(fullchain_pem: str, pebble: PebbleWithDns, names: list[str]) -> None:
    chain = x509.load_pem_x509_certificates(fullchain_pem.encode())
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(names)
    # Each certificate is signed by the next, the last by the root Pebble serves.
    root = x509.load_pem_x509_certificate(pebble.root_pem())
    for cert, issuer in zip(chain, [*chain[1:], root], strict=True):
        cert.verify_directly_issued_by(issuer)


def dns01_order(
    acme: client.ClientV2,
    provider: DnsProvider,
    propagation: PropagationChecker,
    names: list[str],
) -> tuple[messages.OrderResource, dict[str, set[str]]]:
    """dns-01 as the issuer does it: present every record, wait, answer, finalize, clean up."""
    order = retry_bad_nonce(lambda: acme.new_order(csr_for(names), profile="default"))
    account_key = acme.net.key
    records = dnschallenge.dns01_records(order.authorizations, account_key)
    dnschallenge.present_all(provider, records)
    try:
        # Before the CA is told: every value visible on every authoritative server.
        propagation.wait_visible(dnschallenge.wanted(records), timeout=60)
        for record in records:
            response = dnschallenge.answer(record, account_key)
            retry_bad_nonce(lambda c=record.challenge, r=response: acme.answer_challenge(c, r))
        deadline = dt.datetime.now() + dt.timedelta(seconds=90)
        finished = retry_bad_nonce(lambda: acme.poll_and_finalize(order, deadline=deadline))
    finally:
        # Also after a failure: remove exactly what was added.
        assert dnschallenge.cleanup_all(provider, records) == []
    return finished, dnschallenge.wanted(records)


def test_dns01_through_rfc2136_for_a_name_and_its_wildcard(pebble, bind):
    key = bind.zone.key
    provider = Rfc2136Provider(
        Rfc2136Settings(
            server=HostPort(bind.address, bind.port), key_name=key.name, secret=key.secret
        )
    )
    propagation = PropagationChecker(
        PropagationSettings(resolvers=(HostPort(bind.address, bind.port),)),
        authoritative_port=bind.port,
        poll_interval=0.2,
    )
    acme, _ = acme_client(pebble)
    record = f"_acme-challenge.{ZONE}"
    bind.add_txt(record, "an unrelated value the operator keeps")

    first, presented = dns01_order(acme, provider, propagation, NAMES)
    # One record name, two values (the name's and the wildcard's).
    assert list(presented) == [record]
    assert len(presented[record]) == 2
    assert_certificate(first.fullchain_pem, pebble, NAMES)
    assert bind.txt(record) == {"an unrelated value the operator keeps"}

    # A renewal: a new order, validated through DNS again (no authorization reuse).
    second, _ = dns01_order(acme, provider, propagation, NAMES)
    assert_certificate(second.fullchain_pem, pebble, NAMES)
    assert second.fullchain_pem != first.fullchain_pem
    assert bind.txt(record) == {"an unrelated value the operator keeps"}
    assert pebble.orders_created() == 2


def persist_order(acme: client.ClientV2, names: list[str], issuer: str) -> messages.OrderResource:
    """dns-persist-01: nothing to write; answer {} to the challenge acme cannot parse."""
    order = retry_bad_nonce(lambda: acme.new_order(csr_for(names), profile="default"))
    for found in dnschallenge.persist_challenges(order.authorizations, issuer):
        assert found.parsed.token is None and found.parsed.account_uri is None  # Pebble 2.10
        retry_bad_nonce(
            lambda c=found.challenge: acme.answer_challenge(c, dnschallenge.DnsPersist01Response())
        )
    deadline = dt.datetime.now() + dt.timedelta(seconds=90)
    return retry_bad_nonce(lambda: acme.poll_and_finalize(order, deadline=deadline))


def test_dns_persist01_record_created_once_then_issuance_without_credentials(pebble, bind):
    acme, regr = acme_client(pebble)
    # The issuer domain name comes from the directory, before any order.
    issuer = dnspersist.choose_issuer(pebble.directory()["meta"], None)
    assert issuer == "pebble.letsencrypt.org"
    (record,) = dnspersist.records_for(NAMES, issuer, regr.uri)
    assert record.name == f"_validation-persist.{ZONE}."
    assert record.value == f"{issuer}; accounturi={regr.uri}; policy=wildcard"

    # The precondition check, with no DNS credentials: what the CA would see.
    propagation = PropagationChecker(
        PropagationSettings(resolvers=(HostPort(bind.address, bind.port),)),
        authoritative_port=bind.port,
    )

    def verdict() -> dnspersist.PersistVerdict:
        observed = propagation.observe(record.name)
        values = set.intersection(*(set(v) for v in observed.values() if not isinstance(v, str)))
        return dnspersist.check_record(
            NAMES, values, issuers=[issuer], account_uri=regr.uri, now=dt.datetime.now(dt.UTC)
        )

    missing = verdict()
    assert missing.status is dnspersist.PersistStatus.MISSING
    assert record.value in missing.message()
    # A record for another account is named as such.
    bind.add_txt(record.name, f"{issuer}; accounturi={regr.uri}-someone-else; policy=wildcard")
    assert verdict().status is dnspersist.PersistStatus.OTHER_ACCOUNT
    assert pebble.orders_created() == 0  # no order is spent on a failing precondition

    # The operator creates the record once, from the printed zone-file line.
    bind.add_txt(record.name, record.value)
    assert verdict().ok
    first = persist_order(acme, NAMES, issuer)
    assert_certificate(first.fullchain_pem, pebble, NAMES)
    second = persist_order(acme, NAMES, issuer)
    assert_certificate(second.fullchain_pem, pebble, NAMES)
    assert pebble.orders_created() == 2


def test_dns_persist01_without_the_record_is_refused_by_the_ca(pebble, bind):
    """What the precondition check saves: the CA's own verdict on a missing record."""
    acme, _ = acme_client(pebble)
    with pytest.raises(errors.ValidationError) as error:
        persist_order(acme, [ZONE], "pebble.letsencrypt.org")
    (failed,) = error.value.failed_authzrs
    (challenge,) = [c for c in failed.body.challenges if c.error is not None]
    assert challenge.error.typ == "urn:ietf:params:acme:error:unauthorized"
    assert "DNS-PERSIST-01" in str(challenge.error.detail)


def test_dns01_through_an_exec_hook_calling_nsupdate(tmp_path, pebble, bind):
    script, env = write_nsupdate_hook(tmp_path / "hook", bind)
    provider = ExecProvider(script, env=env)
    propagation = PropagationChecker(
        PropagationSettings(resolvers=(HostPort(bind.address, bind.port),)),
        authoritative_port=bind.port,
        poll_interval=0.2,
    )
    acme, _ = acme_client(pebble)
    order, presented = dns01_order(acme, provider, propagation, NAMES)
    assert_certificate(order.fullchain_pem, pebble, NAMES)
    assert [len(values) for values in presented.values()] == [2]
    assert sorted(Path(env["HOOK_LOG"]).read_text().split("\n")[:-1]) == sorted(
        [f"present _acme-challenge.{ZONE}."] * 2 + [f"cleanup _acme-challenge.{ZONE}."] * 2
    )
    assert bind.txt(f"_acme-challenge.{ZONE}") == set()


def test_dns01_waits_for_the_authoritative_server_the_ca_asks(tmp_path):
    """Pebble asks only the second server, which gets the records a while after the first:
    the certificate is issued because the CA was told to validate only once both had them."""
    zone = TestZone(ZONE, ("127.0.0.1", "::1"))
    first, second = start_bind_servers(tmp_path / "two", zone, free_dns_port(["127.0.0.1", "::1"]))
    pebble = validating_pebble(tmp_path / "pebble-two", second.server)
    record = f"_acme-challenge.{ZONE}"
    # Set as the copy to the second server begins: the checker cannot see every value there
    # before, and setting it after the copy raced a checker that saw the copy first (CI).
    copying = threading.Event()
    stop = threading.Event()

    def propagate_later() -> None:
        # A slow secondary: whatever the first server holds reaches the second 1 s later.
        while not stop.is_set():
            values = first.txt(record)
            if len(values) == 2:
                time.sleep(1.0)
                copying.set()
                for value in values:
                    second.add_txt(record, value)
                return
            time.sleep(0.1)

    class RecordingChecker:
        def __init__(self, inner: PropagationChecker) -> None:
            self.inner = inner
            self.returned_after_copy: bool | None = None
            self.second_had: set[str] = set()
            self.wanted: set[str] = set()

        def wait_visible(self, wanted, timeout=None):
            result = self.inner.wait_visible(wanted, timeout=timeout)
            self.returned_after_copy = copying.is_set()
            self.second_had = set(second.txt(record))
            self.wanted = set(wanted[record])
            return result

    thread = threading.Thread(target=propagate_later)
    try:
        pebble.start()
        key = zone.key
        provider = Rfc2136Provider(
            Rfc2136Settings(
                server=HostPort(first.address, first.port), key_name=key.name, secret=key.secret
            )
        )
        checker = RecordingChecker(
            PropagationChecker(
                PropagationSettings(resolvers=(HostPort(first.address, first.port),)),
                authoritative_port=first.port,
                poll_interval=0.2,
            )
        )
        acme, _ = acme_client(pebble)
        thread.start()
        order, _ = dns01_order(acme, provider, checker, NAMES)  # type: ignore[arg-type]
        assert checker.returned_after_copy is True
        # Every value, not just the copy's start: the second server had them all on return.
        assert len(checker.wanted) == 2 and checker.wanted <= checker.second_had
        assert_certificate(order.fullchain_pem, pebble, NAMES)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        pebble.stop()
        first.stop()
        second.stop()
