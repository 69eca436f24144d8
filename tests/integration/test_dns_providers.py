"""DNS providers and the propagation check against real BIND 9 servers on loopback."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from acme_registry.dnsconfig import (
    ExecSettings,
    HostPort,
    PropagationSettings,
    Rfc2136Settings,
    load_dns_settings,
)
from acme_registry.dnspropagation import PropagationChecker
from acme_registry.dnsproviders import DnsError, ExecProvider, Rfc2136Provider, provider_for
from tests.support.bind import (
    BindServer,
    TestZone,
    free_dns_port,
    port_free_on,
    start_bind_servers,
    write_nsupdate_hook,
)

ZONE = "example.test"
RECORD = f"_acme-challenge.{ZONE}"
# Two authoritative servers on distinct loopback addresses and one port. The second one is
# ::1 rather than 127.0.0.2: named only listens on addresses an interface has, and lo has
# 127.0.0.1/8 and ::1, so this needs no change to the machine's network configuration.
# (Tried with BIND 9.18: `listen-on port P { 127.0.0.2; };` starts named, loads the zone and
# binds nothing, though a plain socket can bind 127.0.0.2; the other way, a network
# namespace with 127.0.0.2 on its lo, would need Pebble and the agent inside it too.)
ADDRESSES = ("127.0.0.1", "::1")


@pytest.fixture
def zone() -> TestZone:
    return TestZone(ZONE, ADDRESSES)


@pytest.fixture
def servers(tmp_path: Path, zone: TestZone) -> Iterator[list[BindServer]]:
    started = start_bind_servers(tmp_path / "bind", zone, free_dns_port(ADDRESSES))
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def primary(servers: list[BindServer]) -> BindServer:
    return servers[0]


def rfc2136_settings(server: BindServer, **changes: object) -> Rfc2136Settings:
    """The settings an operator would give, through the real parser."""
    key = server.zone.key
    env = {
        "ACME_CHALLENGE": "dns-01",
        "DNS_PROVIDER": "rfc2136",
        "DNS_RFC2136_SERVER": server.server,
        "DNS_RFC2136_TSIG_KEY_NAME": key.name,
        "DNS_RFC2136_TSIG_SECRET": key.secret,
        **{k: str(v) for k, v in changes.items()},
    }
    settings = load_dns_settings(env).provider
    assert isinstance(settings, Rfc2136Settings)
    return settings


def checker(servers: list[BindServer], check: str = "authoritative", **kw) -> PropagationChecker:
    resolvers = kw.pop("resolvers", (HostPort(servers[0].address, servers[0].port),))
    settings = PropagationSettings(check=check, resolvers=tuple(resolvers), timeout=60)
    return PropagationChecker(settings, authoritative_port=servers[0].port, poll_interval=0.2, **kw)


# -- rfc2136 -------------------------------------------------------------------------------


def test_rfc2136_a_name_and_its_wildcard_share_one_record_name(primary):
    provider = Rfc2136Provider(rfc2136_settings(primary))
    assert provider.zone_for(RECORD) == f"{ZONE}."
    # example.test and *.example.test: two values at the same name, both kept.
    provider.present(RECORD, "value-for-the-name")
    provider.present(f"{RECORD}.", "value-for-the-wildcard")
    assert primary.txt(RECORD) == {"value-for-the-name", "value-for-the-wildcard"}
    # Presenting again (an order resumed after a crash) changes nothing.
    provider.present(RECORD, "value-for-the-name")
    assert primary.txt(RECORD) == {"value-for-the-name", "value-for-the-wildcard"}

    provider.cleanup(RECORD, "value-for-the-name")
    assert primary.txt(RECORD) == {"value-for-the-wildcard"}
    provider.cleanup(RECORD, "value-for-the-wildcard")
    assert primary.txt(RECORD) == set()
    # Cleaning up what is already gone succeeds.
    provider.cleanup(RECORD, "value-for-the-wildcard")


def test_rfc2136_leaves_records_it_did_not_add(primary):
    primary.add_txt(RECORD, "an operator's own value")
    provider = Rfc2136Provider(rfc2136_settings(primary))
    provider.present(RECORD, "ours")
    provider.cleanup(RECORD, "ours")
    assert primary.txt(RECORD) == {"an operator's own value"}


def test_rfc2136_zone_found_from_a_deeper_name_and_given_explicitly(primary):
    provider = Rfc2136Provider(rfc2136_settings(primary))
    deep = f"_acme-challenge.a.b.{ZONE}"
    assert provider.zone_for(deep) == f"{ZONE}."
    explicit = Rfc2136Provider(rfc2136_settings(primary, DNS_RFC2136_ZONE=ZONE))
    explicit.present(deep, "deep")
    assert primary.txt(deep) == {"deep"}
    explicit.cleanup(deep, "deep")
    assert primary.txt(deep) == set()


def test_rfc2136_name_outside_every_zone(primary):
    provider = Rfc2136Provider(rfc2136_settings(primary))
    with pytest.raises(DnsError) as error:
        provider.present("_acme-challenge.other.invalid", "x")
    assert "not authoritative" in str(error.value) and "DNS_RFC2136_ZONE" in str(error.value)
    with pytest.raises(DnsError) as error:
        Rfc2136Provider(rfc2136_settings(primary, DNS_RFC2136_ZONE=ZONE)).present(
            "_acme-challenge.other.invalid", "x"
        )
    assert "not inside DNS_RFC2136_ZONE" in str(error.value)


def test_rfc2136_wrong_secret_is_a_clear_error_without_the_secret(primary):
    wrong = base64.b64encode(b"not the key the server has!!!!!!").decode()
    provider = Rfc2136Provider(rfc2136_settings(primary, DNS_RFC2136_TSIG_SECRET=wrong))
    with pytest.raises(DnsError) as error:
        provider.present(RECORD, "x")
    message = str(error.value)
    assert "BADSIG" in message and "DNS_RFC2136_TSIG_SECRET" in message
    assert wrong not in message and primary.zone.key.secret not in message
    assert "\n" not in message
    assert primary.txt(RECORD) == set()


def test_rfc2136_unknown_key_and_wrong_algorithm(primary):
    unknown = Rfc2136Provider(
        rfc2136_settings(primary, DNS_RFC2136_TSIG_KEY_NAME="nobody", DNS_RFC2136_ZONE=ZONE)
    )
    with pytest.raises(DnsError) as error:
        unknown.present(RECORD, "x")
    assert "BADKEY" in str(error.value) and "DNS_RFC2136_TSIG_KEY_NAME" in str(error.value)
    other_algorithm = Rfc2136Provider(
        rfc2136_settings(primary, DNS_RFC2136_TSIG_ALGORITHM="hmac-sha512", DNS_RFC2136_ZONE=ZONE)
    )
    with pytest.raises(DnsError) as error:
        other_algorithm.present(RECORD, "x")
    assert "BAD" in str(error.value)
    assert primary.txt(RECORD) == set()


def test_rfc2136_server_not_answering(tmp_path):
    port = free_dns_port(["127.0.0.1"])
    settings = Rfc2136Settings(
        server=HostPort("127.0.0.1", port), key_name="k", secret="c2VjcmV0", zone=ZONE
    )
    with pytest.raises(DnsError) as error:
        Rfc2136Provider(settings, timeout=2).present(RECORD, "x")
    assert f"127.0.0.1:{port} did not answer" in str(error.value)


# -- exec ----------------------------------------------------------------------------------


def hook(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dns-hook"
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_exec_provider_through_nsupdate(tmp_path, primary):
    script, env = write_nsupdate_hook(tmp_path / "hook", primary)
    settings = load_dns_settings(
        {"ACME_CHALLENGE": "dns-01", "DNS_PROVIDER": "exec", "DNS_EXEC_COMMAND": str(script)}
    ).provider
    assert isinstance(settings, ExecSettings)
    provider = ExecProvider(settings.command, env=env)
    provider.present(RECORD, "first")
    provider.present(RECORD, "second")
    assert primary.txt(RECORD) == {"first", "second"}
    provider.cleanup(RECORD, "first")
    assert primary.txt(RECORD) == {"second"}
    # lego's convention: the name is absolute.
    assert Path(env["HOOK_LOG"]).read_text().splitlines()[0] == f"present {RECORD}."


def test_exec_provider_failure_carries_status_and_stderr(tmp_path):
    script = hook(
        tmp_path, "#!/bin/sh\necho 'starting' >&2\necho 'API says: 403 denied' >&2\nexit 3\n"
    )
    with pytest.raises(DnsError) as error:
        ExecProvider(script).present(RECORD, "x")
    message = str(error.value)
    assert f"{script} present {RECORD}." in message
    assert "exit status 3" in message and "API says: 403 denied" in message
    assert "\n" not in message


def test_exec_provider_timeout(tmp_path):
    script = hook(tmp_path, "#!/bin/sh\necho 'waiting for the API' >&2\nexec sleep 30\n")
    with pytest.raises(DnsError) as error:
        ExecProvider(script, timeout=1).cleanup(RECORD, "x")
    assert "did not finish within 1 s" in str(error.value)


# -- propagation ---------------------------------------------------------------------------


def test_authoritative_check_waits_for_the_second_server(servers):
    first, second = servers
    provider = Rfc2136Provider(rfc2136_settings(first))
    propagation = checker(servers)
    # The check found both servers through the zone's NS records (resolved via the resolver).
    assert sorted(propagation.authoritative_servers(RECORD)) == [
        (f"ns1.{ZONE}.", "127.0.0.1"),
        (f"ns2.{ZONE}.", "::1"),
    ]
    provider.present(RECORD, "token-value")
    before = propagation.check({RECORD: ["token-value"]})
    assert not before.visible
    assert "::1" in before.describe() and "127.0.0.1" not in before.describe()

    reached_second = threading.Event()

    def propagate_later() -> None:
        time.sleep(1.0)
        second.add_txt(RECORD, "token-value")
        reached_second.set()

    thread = threading.Thread(target=propagate_later)
    thread.start()
    try:
        visibility = propagation.wait_visible({RECORD: ["token-value"]}, timeout=60)
    finally:
        thread.join()
    assert visibility.visible
    # It returned only once the second server had the record.
    assert reached_second.is_set()
    assert second.txt(RECORD) == {"token-value"}


def test_authoritative_check_times_out_naming_the_server_that_lacks_it(servers):
    first, _ = servers
    Rfc2136Provider(rfc2136_settings(first)).present(RECORD, "never-on-ns2")
    with pytest.raises(DnsError) as error:
        checker(servers).wait_visible({RECORD: ["never-on-ns2"]}, timeout=1)
    message = str(error.value)
    assert "not visible after 1 s" in message
    assert f"ns2.{ZONE}. [::1]:{first.port} lacks 'never-on-ns2'" in message
    assert "ns1" not in message


def test_wildcard_and_name_values_both_required(servers):
    first, second = servers
    for server in servers:
        server.add_txt(RECORD, "one")
    second.add_txt(RECORD, "two")
    propagation = checker(servers)
    assert not propagation.check({RECORD: ["one", "two"]}).visible
    first.add_txt(RECORD, "two")
    assert propagation.check({RECORD: ["one", "two"]}).visible


def test_resolvers_mode_asks_only_the_resolvers(servers):
    first, second = servers
    on_second = checker(servers, "resolvers", resolvers=(HostPort(second.address, second.port),))
    first.add_txt(RECORD, "v")
    # The first server has it, but only the second is a configured resolver.
    assert list(on_second.observe(RECORD)) == [second.server]
    assert not on_second.check({RECORD: ["v"]}).visible
    second.add_txt(RECORD, "v")
    assert on_second.wait_visible({RECORD: ["v"]}, timeout=30).visible
    both = checker(servers, "resolvers", resolvers=[HostPort(s.address, s.port) for s in servers])
    assert both.observe(RECORD) == {first.server: {"v"}, second.server: {"v"}}


def test_off_returns_at_once_and_observes_through_the_resolver(servers):
    first, _ = servers
    off = checker(servers, "off")
    assert off.wait_visible({RECORD: ["not there"]}).visible
    first.add_txt(RECORD, "v")
    assert off.observe(RECORD) == {"resolver": {"v"}}


def test_unreachable_name_servers_are_reported(servers):
    first, _ = servers
    # Authoritative servers asked on a port where nothing listens.
    settings = PropagationSettings(resolvers=(HostPort(first.address, first.port),))
    propagation = PropagationChecker(
        settings,
        authoritative_port=free_dns_port(ADDRESSES),
        query_timeout=0.5,
        poll_interval=0.2,
    )
    with pytest.raises(DnsError) as error:
        propagation.wait_visible({RECORD: ["v"]}, timeout=1)
    assert "no answer" in str(error.value) or "refused" in str(error.value).lower()


def test_authoritative_check_on_port_53_as_in_production(tmp_path, zone):
    """The default port, no override: BIND on 127.0.0.1:53 and [::1]:53 (tests run as root)."""
    if not port_free_on(ADDRESSES, 53):
        pytest.fail("port 53 is taken on 127.0.0.1 or ::1: stop the local DNS server there")
    servers = start_bind_servers(tmp_path / "bind53", zone, 53)
    try:
        first, second = servers
        settings = PropagationSettings(resolvers=(HostPort(first.address, 53),), timeout=30)
        propagation = PropagationChecker(settings, poll_interval=0.2)
        assert propagation.authoritative_port == 53
        Rfc2136Provider(rfc2136_settings(first)).present(RECORD, "on-53")
        assert not propagation.check({RECORD: ["on-53"]}).visible
        second.add_txt(RECORD, "on-53")
        assert propagation.wait_visible({RECORD: ["on-53"]}).visible
    finally:
        for server in servers:
            server.stop()


def test_exec_provider_environment_lacks_the_agents_secrets(tmp_path):
    out = tmp_path / "env.txt"
    script = hook(tmp_path, f"#!/bin/sh\nenv > {out}\n")
    env = {"PATH": "/usr/bin:/bin", "HOOK_TOKEN": "t", "ACME_EAB_HMAC_KEY": "k", "AUTH_USERS": "u"}
    ExecProvider(script, env=env).present(RECORD, "x")
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert seen["HOOK_TOKEN"] == "t"
    assert "ACME_EAB_HMAC_KEY" not in seen and "AUTH_USERS" not in seen


# -- DNS_RESOLVERS for every lookup --------------------------------------------------------


@pytest.fixture
def sub_zone_resolver(tmp_path: Path) -> Iterator[BindServer]:
    """A server that says ``sub.example.test`` is a zone of its own (the update server's
    copy of example.test has no such delegation): which answer the provider uses shows
    whom it asked."""
    zone = TestZone(f"sub.{ZONE}", ("127.0.0.1",))
    (server,) = start_bind_servers(tmp_path / "sub", zone, free_dns_port(["127.0.0.1"]))
    yield server
    server.stop()


def dns01_env(server: str, key_name: str, secret: str, **more: str) -> dict[str, str]:
    return {
        "ACME_CHALLENGE": "dns-01",
        "DNS_PROVIDER": "rfc2136",
        "DNS_RFC2136_SERVER": server,
        "DNS_RFC2136_TSIG_KEY_NAME": key_name,
        "DNS_RFC2136_TSIG_SECRET": secret,
        **more,
    }


def provider_from(env: dict[str, str]):
    """The provider the issuer builds from these settings (provider_for, as in issuer.py)."""
    settings = load_dns_settings(env)
    assert settings.provider is not None
    return provider_for(settings.provider, settings.propagation.resolvers)


def test_rfc2136_zone_found_through_dns_resolvers_when_set(primary, sub_zone_resolver):
    key = primary.zone.key
    deep = f"_acme-challenge.host.sub.{ZONE}"
    # Unset: the update server is asked, and for it the name is inside example.test.
    plain = provider_from(dns01_env(primary.server, key.name, key.secret))
    assert plain.zone_for(deep) == f"{ZONE}."  # type: ignore[attr-defined]
    # Set: the SOA lookup goes to DNS_RESOLVERS, which answer sub.example.test.
    via = provider_from(
        dns01_env(primary.server, key.name, key.secret, DNS_RESOLVERS=sub_zone_resolver.server)
    )
    assert via.zone_for(deep) == f"sub.{ZONE}."  # type: ignore[attr-defined]


def test_rfc2136_zone_lookup_never_falls_back_to_the_update_server(primary):
    key = primary.zone.key
    silent = f"127.0.0.1:{free_dns_port(['127.0.0.1'])}"
    provider = provider_from(dns01_env(primary.server, key.name, key.secret, DNS_RESOLVERS=silent))
    with pytest.raises(DnsError) as error:
        provider.present(RECORD, "x")
    message = str(error.value)
    assert f"via DNS_RESOLVERS {silent}" in message and "DNS_RFC2136_ZONE" in message
    assert primary.txt(RECORD) == set()


def test_rfc2136_server_host_name_resolved_through_dns_resolvers(primary):
    key = primary.zone.key
    # ns1.example.test exists only in the test zone: the system resolver cannot know it.
    by_name = f"ns1.{ZONE}:{primary.port}"
    with pytest.raises(DnsError) as error:
        provider_from(dns01_env(by_name, key.name, key.secret)).present(RECORD, "x")
    assert f"cannot resolve DNS server ns1.{ZONE}" in str(error.value)
    provider = provider_from(dns01_env(by_name, key.name, key.secret, DNS_RESOLVERS=primary.server))
    provider.present(RECORD, "through-the-resolvers")
    assert primary.txt(RECORD) == {"through-the-resolvers"}
    provider.cleanup(RECORD, "through-the-resolvers")
    assert primary.txt(RECORD) == set()


# -- TTLs (dns-persist-01's recheck interval) ----------------------------------------------


def test_answers_carry_the_record_ttl_or_the_negative_ttl(servers, zone):
    name = f"_validation-persist.{ZONE}"
    for check in ("authoritative", "resolvers"):
        missing = checker(servers, check).answers(name)
        # NXDOMAIN: min(the SOA's TTL, its minimum field) = the zone's negative TTL.
        assert {a.ttl for a in missing.values()} == {zone.negative_ttl}, (check, missing)
    for server in servers:
        server.add_txt(name, "ca.test; accounturi=https://ca.test/a/1", ttl=600)
    for check in ("authoritative", "resolvers", "off"):
        found = checker(servers, check).answers(name)
        assert {a.ttl for a in found.values()} == {600}, (check, found)
        assert {a.observation for a in found.values()} == {
            frozenset({"ca.test; accounturi=https://ca.test/a/1"})
        }
