"""DNS validation through the real agent (`acme-registry run`): Pebble 2.10 resolving through
BIND, nothing answering HTTP-01, so only the records the agent wrote can prove the names."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.agent import CREDS, AgentProcess, served_instead_of
from tests.support.bind import (
    BindServer,
    TestZone,
    free_dns_port,
    port_free_on,
    start_bind_servers,
    start_zone_server,
    write_nsupdate_hook,
)
from tests.support.clients import Skopeo, wait_for_tls
from tests.support.pebble import Pebble
from tests.support.pebble_dns import PebbleWithDns, validating_pebble
from tests.support.ports import free_port

ZONE = "example.test"
NAMES = f"{ZONE},*.{ZONE}"
RECORD = f"_acme-challenge.{ZONE}"
# With the SOA minimum at 600, "no such record" may be cached for min(the SOA's TTL, its
# minimum) = min(60, 600) s: longer than dns-persist-01's 30 s, so the next look waits for it.
LONG_NEGATIVE_TTL_ZONE = 600
NEGATIVE_TTL = 60
OTHER_RECORD_TTL = 900


@pytest.fixture
def bind(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BindServer]:
    # The zone's SOA minimum (default 1 s) by indirect parametrization. Nothing here caches:
    # the agent and Pebble ask this BIND directly.
    server = start_zone_server(tmp_path / "bind", ZONE, getattr(request, "param", 1))
    yield server
    server.stop()


@pytest.fixture
def pebble(tmp_path: Path, bind: BindServer) -> Iterator[PebbleWithDns]:
    instance = validating_pebble(tmp_path / "pebble", bind.server)
    instance.start()
    yield instance
    instance.stop()


def dns_agent(
    tmp_path: Path, pebble: PebbleWithDns, bind: BindServer, registry_binary: Path, **extra: str
) -> AgentProcess:
    env = AgentProcess.environment(
        tmp_path / "agent",
        domains=extra.pop("ACME_DOMAINS", NAMES),
        directory=pebble.directory_url,
        ca_bundle=pebble.ca_bundle,
        # The agent's port 80 listener: Pebble has no way to it (its HTTP-01 goes to port 9).
        http_port=free_port(),
        registry_binary=registry_binary,
        # The test zone is only on this BIND: ask it, not the authoritative servers on 53.
        DNS_PROPAGATION_CHECK="resolvers",
        DNS_RESOLVERS=extra.pop("DNS_RESOLVERS", bind.server),
        **extra,
    )
    return AgentProcess(tmp_path / "agent", env).start()


def rfc2136_settings(bind: BindServer) -> dict[str, str]:
    key = bind.zone.key
    return {
        "ACME_CHALLENGE": "dns-01",
        "DNS_PROVIDER": "rfc2136",
        "DNS_RFC2136_SERVER": bind.server,
        "DNS_RFC2136_TSIG_KEY_NAME": key.name,
        "DNS_RFC2136_TSIG_SECRET": key.secret,
    }


def served_names(agent: AgentProcess, pebble: PebbleWithDns, name: str) -> set[str]:
    leaf = wait_for_tls("127.0.0.1", agent.registry_port, name, pebble.root_pem(), 90)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def test_dns01_rfc2136_name_and_wildcard_served_and_records_removed(
    tmp_path, pebble, bind, registry_binary, oci_image
):
    bind.add_txt(RECORD, "an unrelated value the operator keeps")
    # What an order killed between adding its records and removing them leaves behind.
    bind.add_txt(RECORD, "left-by-a-killed-order")
    orders = tmp_path / "agent" / "data" / "orders"
    orders.mkdir(parents=True, mode=0o700)
    (tmp_path / "agent" / "data").chmod(0o700)
    state = {"identifier": ZONE, "fqdn": RECORD, "value": "left-by-a-killed-order"}
    (orders / "dns01-records.json").write_text(json.dumps({"records": [state]}))
    started = time.monotonic()
    agent = dns_agent(tmp_path, pebble, bind, registry_binary, **rfc2136_settings(bind))
    try:
        assert served_names(agent, pebble, ZONE) == {ZONE, f"*.{ZONE}"}
        elapsed = time.monotonic() - started
        print(f"dns-01: first verified TLS handshake {elapsed:.3f} s after `acme-registry run`")
        # The wildcard covers any one label below the zone, verified by name.
        assert served_names(agent, pebble, f"registry.{ZONE}") == {ZONE, f"*.{ZONE}"}
        agent.wait_ready(timeout=60)
        # Only the operator's value is left: both of the agent's were removed, exactly, and
        # the one the killed order left too.
        assert bind.txt(RECORD) == {"an unrelated value the operator keeps"}
        assert not (agent.data_dir / "orders" / "dns01-records.json").exists()
        assert pebble.orders_created() == 1

        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [f"registry.{ZONE}"], creds=CREDS)
        ref = f"registry.{ZONE}:{agent.registry_port}/demo:v1"
        skopeo.push(oci_image, "v1", ref)
        skopeo.pull(ref, tmp_path / "pulled", "v1")

        # A renewal: a new order, proven through DNS again (Pebble reuses no authorization).
        first = wait_for_tls("127.0.0.1", agent.registry_port, ZONE, pebble.root_pem(), 10)
        renew = agent.cli("renew", timeout=120)
        assert renew.returncode == 0, renew.stderr + agent.log()
        second = served_instead_of(agent, pebble, first, 30, name=ZONE)
        assert second.serial_number != first.serial_number
        assert pebble.orders_created() == 2
        assert bind.txt(RECORD) == {"an unrelated value the operator keeps"}
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()
    assert bind.zone.key.secret not in agent.log()


def wait_for_status(agent: AgentProcess, accept, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    answer: dict = {}
    while time.monotonic() < deadline:
        result = agent.cli("status", "--json")
        if result.returncode == 0:
            answer = json.loads(result.stdout)
            if accept(answer):
                return answer
        time.sleep(0.2)
    raise AssertionError(f"status never matched: {answer}\n{agent.log()}")


def test_dns01_provider_failure_is_reason_dns_and_leaves_no_record(
    tmp_path, pebble, bind, registry_binary
):
    settings = rfc2136_settings(bind)
    # A key BIND does not know: the update is refused.
    settings["DNS_RFC2136_TSIG_KEY_NAME"] = "not-the-zone-key"
    agent = dns_agent(tmp_path, pebble, bind, registry_binary, **settings)
    try:
        answer = wait_for_status(agent, lambda a: a["backoff"]["failures"] >= 1)
        assert "DNS_RFC2136" in answer["backoff"]["last_error"], answer
        metrics = urllib.request.urlopen(f"{agent.admin_url}/metrics", timeout=10).read().decode()
        assert 'acme_registry_renewal_failures_total{reason="dns"} 1' in metrics, metrics
        assert bind.txt(RECORD) == set()
        assert not (agent.data_dir / "orders" / "dns01-records.json").exists()
        assert bind.zone.key.secret not in json.dumps(answer)
    finally:
        agent.stop()
    assert bind.zone.key.secret not in agent.log()


def test_dns01_exec_hook_failure_reaches_the_log_and_status(
    tmp_path, pebble, bind, registry_binary
):
    hook = tmp_path / "failing-hook"
    hook.write_text("#!/bin/sh\necho 'provider API: 403 token lacks zone:edit' >&2\nexit 3\n")
    hook.chmod(0o755)
    agent = dns_agent(
        tmp_path,
        pebble,
        bind,
        registry_binary,
        ACME_CHALLENGE="dns-01",
        DNS_PROVIDER="exec",
        DNS_EXEC_COMMAND=str(hook),
    )
    try:
        answer = wait_for_status(agent, lambda a: a["backoff"]["failures"] >= 1)
        error = answer["backoff"]["last_error"]
        expected = f"{hook} present {RECORD}.: exit status 3: provider API: 403 token lacks"
        assert expected in error, answer
        assert expected in agent.log()
        metrics = urllib.request.urlopen(f"{agent.admin_url}/metrics", timeout=10).read().decode()
        assert 'acme_registry_renewal_failures_total{reason="dns"} 1' in metrics, metrics
    finally:
        agent.stop()


PERSIST_RECORD = f"_validation-persist.{ZONE}."


def seconds_to_next_check(status_answer: dict) -> float:
    due = dt.datetime.fromisoformat(status_answer["next_check"])
    return (due - dt.datetime.now(dt.UTC)).total_seconds()


@pytest.mark.parametrize("bind", [LONG_NEGATIVE_TTL_ZONE], indirect=True)
def test_dns_persist01_precondition_then_issuance_with_no_dns_credentials(
    tmp_path, pebble, bind, registry_binary
):
    agent = dns_agent(
        tmp_path,
        pebble,
        bind,
        registry_binary,
        ACME_CHALLENGE="dns-persist-01",
        ACME_HTTP_PORT="off",
    )
    try:
        # Missing: the agent says which record to create, and places no order.
        answer = wait_for_status(agent, lambda a: a.get("dns_persist_problem"))
        problem = answer["dns_persist_problem"]
        assert f"no dns-persist-01 record at {PERSIST_RECORD}" in problem, problem
        result = agent.cli("dns-persist-record", "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        account = json.loads(
            (agent.data_dir / "accounts").glob("*/account.json").__next__().read_text()
        )
        value = f"pebble.letsencrypt.org; accounturi={account['uri']}; policy=wildcard"
        assert json.loads(result.stdout) == {
            "records": [{"name": PERSIST_RECORD, "type": "TXT", "value": value}]
        }
        assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
        assert f'create TXT {PERSIST_RECORD} "{value}"' in problem
        assert answer["backoff"]["failures"] == 0 and answer["certificate"] is None
        # Checked again after the answer's TTL (the zone's negative TTL), not after 30 s.
        assert NEGATIVE_TTL - 25 < seconds_to_next_check(answer) <= NEGATIVE_TTL, answer
        ready = agent.cli("health", "--ready")
        assert ready.returncode == 1 and PERSIST_RECORD in ready.stdout, ready.stdout
        plain = agent.cli("dns-persist-record")
        assert plain.stdout == f'{PERSIST_RECORD} IN TXT "{value}"\n'

        # A record for another account: refused the same way, still no order.
        other = "pebble.letsencrypt.org; accounturi=https://127.0.0.1/my-account/1; policy=wildcard"
        bind.add_txt(PERSIST_RECORD, other, ttl=OTHER_RECORD_TTL)
        renew = agent.cli("renew", timeout=120)
        assert renew.returncode == 1 and "names another ACME account" in renew.stderr, renew
        assert pebble.orders_created() == 0
        answer = json.loads(agent.cli("status", "--json").stdout)
        assert answer["backoff"]["failures"] == 0
        # The next look waits for the record's own TTL.
        assert OTHER_RECORD_TTL - 60 < seconds_to_next_check(answer) <= OTHER_RECORD_TTL, answer

        # The record, created once: the certificate follows.
        bind.delete_txt(PERSIST_RECORD, other)
        bind.add_txt(PERSIST_RECORD, value)
        renew = agent.cli("renew", timeout=120)
        assert renew.returncode == 0, renew.stderr + agent.log()
        assert served_names(agent, pebble, ZONE) == {ZONE, f"*.{ZONE}"}
        assert pebble.orders_created() == 1
        assert wait_for_status(agent, lambda a: a["dns_persist_problem"] is None)
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()
    assert "no port-80 listener (ACME_HTTP_PORT=off)" in agent.log()


def test_dns01_through_an_exec_hook_calling_nsupdate(tmp_path, pebble, bind, registry_binary):
    script, hook_env = write_nsupdate_hook(tmp_path / "hook", bind)
    hook_env.pop("PATH")  # the agent's own PATH has nsupdate too
    agent = dns_agent(
        tmp_path,
        pebble,
        bind,
        registry_binary,
        ACME_CHALLENGE="dns-01",
        DNS_PROVIDER="exec",
        DNS_EXEC_COMMAND=str(script),
        # The wildcard first: the agent's own probe must not connect as "*.example.test".
        ACME_DOMAINS=f"*.{ZONE},{ZONE}",
        **hook_env,
    )
    try:
        assert served_names(agent, pebble, ZONE) == {ZONE, f"*.{ZONE}"}
        agent.wait_ready(timeout=60)
        hook_log = Path(hook_env["HOOK_LOG"]).read_text().splitlines()
        assert sorted(hook_log) == sorted(
            [f"present {RECORD}."] * 2 + [f"cleanup {RECORD}."] * 2
        ), hook_log
        assert bind.txt(RECORD) == set()
    finally:
        agent.stop_cleanly()


def test_dns_persist01_certificate_follows_the_record_by_itself_then_renews(
    tmp_path, pebble, bind, registry_binary
):
    """No `renew`: the precondition is looked at again 30 s later (the zone's negative TTL
    is 1 s) and the certificate follows. Then a renewal, still with no DNS credentials."""
    agent = dns_agent(
        tmp_path,
        pebble,
        bind,
        registry_binary,
        ACME_CHALLENGE="dns-persist-01",
        ACME_HTTP_PORT="off",
    )
    assert not any(name.startswith("DNS_RFC2136") or name == "DNS_PROVIDER" for name in agent.env)
    try:
        answer = wait_for_status(agent, lambda a: a.get("dns_persist_problem"))
        assert 0 < seconds_to_next_check(answer) <= 30, answer
        result = agent.cli("dns-persist-record", "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        (record,) = json.loads(result.stdout)["records"]
        # The log says which record to create, with its exact value.
        log = agent.log()
        assert "dns-persist-01: no order placed" in log
        assert f'create TXT {PERSIST_RECORD} "{record["value"]}"' in log
        bind.add_txt(record["name"], record["value"])

        first = wait_for_tls("127.0.0.1", agent.registry_port, ZONE, pebble.root_pem(), 90)
        assert pebble.orders_created() == 1
        renew = agent.cli("renew", timeout=120)
        assert renew.returncode == 0, renew.stderr + agent.log()
        second = served_instead_of(agent, pebble, first, 30, name=ZONE)
        assert second.serial_number != first.serial_number
        assert pebble.orders_created() == 2
        assert json.loads(agent.cli("status", "--json").stdout)["backoff"]["failures"] == 0
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_dns_persist_record_needs_the_issuer_when_the_directory_names_none(
    tmp_path, registry_binary
):
    """Pebble 2.4's directory has no caaIdentities: exit 2 naming ACME_DNS_PERSIST_ISSUER,
    and no order is spent to learn it; with the setting, the record."""
    with Pebble(tmp_path / "pebble24", free_port()) as old_pebble:
        assert "caaIdentities" not in old_pebble.directory().get("meta", {})
        env = AgentProcess.environment(
            tmp_path / "agent",
            domains=ZONE,
            directory=old_pebble.directory_url,
            ca_bundle=old_pebble.ca_bundle,
            http_port=free_port(),
            registry_binary=registry_binary,
            ACME_CHALLENGE="dns-persist-01",
        )
        agent = AgentProcess(tmp_path / "agent", env)
        refused = agent.cli("dns-persist-record", timeout=60)
        assert refused.returncode == 2, refused
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("acme-registry: configuration error: ACME_DNS_PERSIST_ISSUER: ")
        assert refused.stdout == ""
        # Nothing written: no account key was made for a command that could not answer.
        assert not (agent.data_dir / "accounts").exists()

        agent.env["ACME_DNS_PERSIST_ISSUER"] = "ca.example"
        named = agent.cli("dns-persist-record", "--json", timeout=60)
        assert named.returncode == 0, named.stderr
        (record,) = json.loads(named.stdout)["records"]
        assert record["name"] == PERSIST_RECORD
        assert record["value"].startswith("ca.example; accounturi=https://127.0.0.1:")
        assert old_pebble.orders_created() == 0


def sync_later(source: BindServer, target: BindServer, name: str, delay: float, stop, log):
    """A slow secondary: ``target``'s TXT set at ``name`` follows ``source``'s ``delay`` s
    after each change. Appends (monotonic time, values) to ``log`` after each copy."""
    copied: set[str] = set()
    while not stop.is_set():
        values = source.txt(name)
        if values != copied:
            time.sleep(delay)
            values = source.txt(name)
            for value in values - copied:
                target.add_txt(name, value)
            for value in copied - values:
                target.delete_txt(name, value)
            copied = values
            log.append((time.monotonic(), frozenset(values)))
        time.sleep(0.05)


def test_dns01_agent_waits_for_every_authoritative_server_on_port_53(tmp_path, registry_binary):
    """The default DNS_PROPAGATION_CHECK=authoritative on port 53 as in production: the zone
    has two name servers, the record reaches the second 2 s after the first, and Pebble asks
    only the second. The order succeeds at the first attempt only if the agent told the CA
    to validate after the second server had both values.

    The second server is [::1]:53, not 127.0.0.2:53: named listens only on addresses an
    interface has (lo has 127.0.0.1 and ::1; `listen-on { 127.0.0.2; }` makes named start
    but bind nothing, checked with BIND 9.18), and adding an address to lo would change the
    machine's network configuration.
    """
    addresses = ("127.0.0.1", "::1")
    if not port_free_on(addresses, 53):
        pytest.fail("port 53 is taken on 127.0.0.1 or ::1: stop the local DNS server there")
    zone = TestZone(ZONE, addresses)
    first, second = start_bind_servers(tmp_path / "bind53", zone, 53)
    stop = threading.Event()
    copies: list[tuple[float, frozenset[str]]] = []
    syncer = threading.Thread(target=sync_later, args=(first, second, RECORD, 2.0, stop, copies))
    pebble = validating_pebble(tmp_path / "pebble", second.server)
    agent = None
    try:
        pebble.start()
        syncer.start()
        key = zone.key
        env = AgentProcess.environment(
            tmp_path / "agent",
            domains=NAMES,
            directory=pebble.directory_url,
            ca_bundle=pebble.ca_bundle,
            http_port=free_port(),
            registry_binary=registry_binary,
            ACME_CHALLENGE="dns-01",
            DNS_PROVIDER="rfc2136",
            DNS_RFC2136_SERVER=first.server,
            DNS_RFC2136_TSIG_KEY_NAME=key.name,
            DNS_RFC2136_TSIG_SECRET=key.secret,
            # The zone exists only here: its SOA and NS come from the first server (a split
            # horizon); the TXT checks then go to every NS address on port 53.
            DNS_RESOLVERS=first.server,
        )
        assert "DNS_PROPAGATION_CHECK" not in env  # the default: authoritative
        agent = AgentProcess(tmp_path / "agent", env).start()
        assert served_names(agent, pebble, ZONE) == {ZONE, f"*.{ZONE}"}
        answer = json.loads(agent.cli("status", "--json").stdout)
        assert answer["backoff"]["failures"] == 0, answer
        assert pebble.orders_created() == 1
        log = agent.log()
        assert "TXT records in place (DNS_PROPAGATION_CHECK=authoritative)" in log
        # Both values reached the second server, by the copy, before the certificate.
        assert any(len(values) == 2 for _, values in copies), copies
    finally:
        stop.set()
        if syncer.is_alive():
            syncer.join()
        if agent is not None:
            agent.stop()
        pebble.stop()
        first.stop()
        second.stop()


def test_dns01_record_that_never_becomes_visible_fails_with_reason_dns_and_is_removed(
    tmp_path, pebble, bind, registry_binary
):
    """A failed order cleans up what it added: the only resolver asked is a second server of
    the zone that never gets the record, so the propagation check times out; the record the
    agent wrote on the first server is removed, and the CA was never asked to validate."""
    (lagging,) = start_bind_servers(tmp_path / "lagging", bind.zone, free_dns_port(["127.0.0.1"]))
    settings = rfc2136_settings(bind)
    try:
        agent = dns_agent(
            tmp_path,
            pebble,
            bind,
            registry_binary,
            **{**settings, "DNS_RESOLVERS": lagging.server, "DNS_PROPAGATION_TIMEOUT": "3"},
        )
        try:
            answer = wait_for_status(agent, lambda a: a["backoff"]["failures"] >= 1, timeout=90)
            error = answer["backoff"]["last_error"]
            assert "TXT records not visible after 3 s" in error, answer
            assert lagging.server in error
            metrics = urllib.request.urlopen(f"{agent.admin_url}/metrics", timeout=10)
            assert 'acme_registry_renewal_failures_total{reason="dns"} 1' in metrics.read().decode()
            assert bind.txt(RECORD) == set()  # both values removed from the first server
            assert not (agent.data_dir / "orders" / "dns01-records.json").exists()
            # The challenge was never answered: no POST to a challenge URL reached Pebble.
            assert pebble.orders_created() == 1
            assert "POST /chalZ/" not in pebble.log_text()
        finally:
            agent.stop()
    finally:
        lagging.stop()
