"""Renewal on its own against Pebble 2.10 (from Debian sid): short-lived certificates,
ARI windows steered through Pebble's management API, and `replaces` refused."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.agent import (
    NAME,
    served,
    served_instead_of,
    start_agent,
    status,
)
from tests.support.clients import tls_probe
from tests.support.pebble import (
    PEBBLE_PROFILES,
    ari_cert_id,
    pebble_finds_replaced,
    pebble_sid_binary,
)
from tests.support.ports import free_port


@pytest.fixture
def pebble_210(pebble_factory):
    def make(**kwargs):
        return pebble_factory(
            free_port(),
            binary=pebble_sid_binary(),
            config_overrides={"profiles": PEBBLE_PROFILES},
            **kwargs,
        )

    return make


def test_short_lived_certificates_renew_on_their_own_with_replaces(
    tmp_path, pebble_210, registry_binary
):
    pebble = pebble_210()
    agent = start_agent(tmp_path, pebble, registry_binary, ACME_PROFILE="shortlived")
    serials: list[int] = []
    try:
        served(agent, pebble)
        deadline = time.monotonic() + 300
        while len(serials) < 4:
            assert time.monotonic() < deadline, f"serials seen: {serials}\n{agent.log()}"
            cert = tls_probe("127.0.0.1", agent.registry_port, NAME, pebble.root_pem())
            if cert is not None and cert.serial_number not in serials:
                serials.append(cert.serial_number)
                lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
                assert lifetime <= dt.timedelta(seconds=60)
            time.sleep(0.2)
        agent.wait_ready()
    finally:
        agent.stop_cleanly()
    log = agent.log()
    sent = re.findall(r"renewal order replaces (\S+)", log)
    refused = re.findall(r"the CA refused to mark (\S+) as replaced", log)
    # Every renewal sent `replaces`; Pebble refused only the ones it cannot look up.
    assert len(sent) + len(refused) >= 3
    assert all(not pebble_finds_replaced(cert_id) for cert_id in refused), log
    assert len(pebble.replacements()) == len(sent)


def test_a_changed_ari_window_is_honoured_at_the_next_check(tmp_path, pebble_210, registry_binary):
    pebble = pebble_210()
    agent = start_agent(
        tmp_path,
        pebble,
        registry_binary,
        ACME_PROFILE="default",
        ACME_REGISTRY_ARI_MAX_RECHECK="2",
    )
    try:
        first = served(agent, pebble)
        agent.wait_ready()
        deadline = time.monotonic() + 15
        while "ARI window" not in (status(agent)["certificate"] or {}).get("renewal", {}).get(
            "reason", ""
        ):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        planned = dt.datetime.fromisoformat(status(agent)["certificate"]["renewal"]["at"])
        assert planned > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)

        now = dt.datetime.now(dt.UTC)
        pebble.set_renewal_info(
            first.public_bytes(Encoding.PEM),
            now - dt.timedelta(minutes=1),
            now + dt.timedelta(seconds=3),
            explanation_url="https://ca.test/why-renew-now",
        )
        second = served_instead_of(agent, pebble, first, 30)
        agent.wait_ready()
        assert status(agent)["certificate"]["serial"] == f"{second.serial_number:x}"
    finally:
        agent.stop_cleanly()
    log = agent.log()
    assert "https://ca.test/why-renew-now" in log
    first_id = ari_cert_id(first.public_bytes(Encoding.PEM))
    if pebble_finds_replaced(first_id):
        assert len(pebble.replacements()) == 1
        assert f"renewal order replaces {first_id}" in log
    else:
        # Pebble's serial lookup misses this serial: the agent ordered without `replaces`.
        assert pebble.replacements() == []
        assert f"the CA refused to mark {first_id} as replaced" in log


def test_refused_replaces_is_ordered_again_without_it(tmp_path, pebble_210, registry_binary):
    pebble = pebble_210()
    agent = start_agent(tmp_path, pebble, registry_binary, ACME_PROFILE="default")
    try:
        first = served(agent, pebble)
    finally:
        agent.stop()
    # A new account: the old certificate belongs to another one, so the CA refuses to let
    # this account's order replace it.
    shutil.rmtree(agent.data_dir / "accounts")
    agent.start()
    try:
        served(agent, pebble)
        result = agent.cli("renew", timeout=120)
        assert result.returncode == 0, result.stderr + agent.log()
        second = served_instead_of(agent, pebble, first, 10)
        assert f"{second.serial_number:x}" in result.stdout
    finally:
        agent.stop()
    assert "refused to mark" in agent.log()


def test_an_unknown_profile_is_a_clear_error_before_any_order(
    tmp_path, pebble_210, registry_binary
):
    pebble = pebble_210()
    agent = start_agent(tmp_path, pebble, registry_binary, ACME_PROFILE="tlsserver")
    try:
        deadline = time.monotonic() + 20
        while "could not obtain" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        error = status(agent)["backoff"]["last_error"]
        assert "ACME_PROFILE: 'tlsserver' is not offered by the CA" in error
        assert "default, shortlived" in error
    finally:
        agent.stop()
    assert pebble.orders_created() == 0
