"""An IP-address certificate with http-01 through the real agent and Pebble 2.10 profiles."""

from __future__ import annotations

import ipaddress

from cryptography import x509

from tests.support.agent import start_agent
from tests.support.clients import wait_for_tls
from tests.support.pebble import PEBBLE_PROFILES, pebble_sid_binary
from tests.support.ports import free_port


def test_ip_address_certificate_served_and_verified_by_connecting_to_the_ip(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(
        free_port(),
        binary=pebble_sid_binary(install=True),
        config_overrides={"profiles": PEBBLE_PROFILES},
    )
    # No ACME_PROFILE: with an IP among the names the agent must ask for "shortlived"
    # (Pebble would otherwise pick a profile at random).
    agent = start_agent(tmp_path, pebble, registry_binary, ACME_DOMAINS="127.0.0.1,::1")
    try:
        leaf = wait_for_tls("127.0.0.1", agent.registry_port, "127.0.0.1", pebble.root_pem(), 60)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.IPAddress)) == {
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1"),
        }
        assert san.get_values_for_type(x509.DNSName) == []
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifetime.total_seconds() < 3600, "not the shortlived profile"
        agent.wait_ready(timeout=60)  # the agent's own probe reaches the registry by IP too
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_ip_address_without_a_shortlived_profile_exits_2_before_any_order(
    tmp_path, pebble_factory, registry_binary
):
    # Pebble 2.10 configured with a "default" profile only.
    pebble = pebble_factory(
        free_port(),
        binary=pebble_sid_binary(install=True),
        config_overrides={"profiles": {"default": PEBBLE_PROFILES["default"]}},
    )
    agent = start_agent(tmp_path, pebble, registry_binary, ACME_DOMAINS="127.0.0.1")
    assert agent.proc is not None
    assert agent.proc.wait(timeout=30) == 2
    lines = agent.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "acme-registry: configuration error: ACME_PROFILE: "
    ), lines
    assert "'shortlived'" in lines[0] and "offers: default" in lines[0]
    assert pebble.orders_created() == 0
    assert not agent.data_dir.exists()
