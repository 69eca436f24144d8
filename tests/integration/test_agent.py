"""The agent end to end: real Pebble, the real registry binary, skopeo over verified TLS."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.agent import (
    CREDS,
    NAME,
    AgentProcess,
    fingerprint,
    served,
    start_agent,
)
from tests.support.clients import Skopeo
from tests.support.ports import free_port
from tests.support.proxy import DelayingProxy


def test_issues_serves_and_round_trips_an_image(
    tmp_path, pebble_factory, registry_binary, oci_image
):
    # Pebble's default 5 % nonce rejection stays on here: the agent must survive it.
    pebble = pebble_factory(free_port())
    started = time.monotonic()
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        leaf = served(agent, pebble)
        elapsed = time.monotonic() - started
        print(f"first verified TLS handshake {elapsed:.3f} s after `acme-registry run`")
        agent.wait_ready()

        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        ref = f"{NAME}:{agent.registry_port}/demo:v1"
        anonymous = Skopeo(tmp_path / "anonymous", pebble.root_pem(), [NAME])
        with pytest.raises(AssertionError, match="unauthorized"):
            anonymous.push(oci_image, "v1", ref)
        skopeo.push(oci_image, "v1", ref)
        skopeo.pull(ref, tmp_path / "pulled", "v1")
        pushed_digest = skopeo.manifest_digest(ref)
        from tests.support.oci import layout_manifest_digest

        assert pushed_digest == layout_manifest_digest(oci_image, "v1")
        assert layout_manifest_digest(tmp_path / "pulled", "v1") == pushed_digest

        crt, key = agent.cert_dir / "domain.crt", agent.cert_dir / "domain.key"
        assert crt.read_bytes().count(b"BEGIN CERTIFICATE") >= 2  # leaf first, then the chain
        assert crt.read_bytes().startswith(leaf.public_bytes(Encoding.PEM))
        assert key.stat().st_mode & 0o777 == 0o600
        assert pebble.orders_created() == 1
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_health_before_during_and_after_issuance(tmp_path, pebble_factory, registry_binary):
    # Pebble validates through a forwarder that holds each connection for 2 s: the window
    # in which the agent is alive but has no certificate yet.
    http_port, pebble_http_port = free_port(), free_port()
    proxy = DelayingProxy(pebble_http_port, http_port, delay=2.0).start()
    pebble = pebble_factory(pebble_http_port)
    env = AgentProcess.environment(
        tmp_path / "agent",
        domains=NAME,
        directory=pebble.directory_url,
        ca_bundle=pebble.ca_bundle,
        http_port=http_port,
        registry_binary=registry_binary,
    )
    agent = AgentProcess(tmp_path / "agent", env)
    try:
        assert agent.cli("health").returncode == 1
        assert agent.cli("health", "--ready").returncode == 1
        agent.start()
        deadline = time.monotonic() + 10
        while agent.cli("health").returncode != 0:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        during = agent.cli("health", "--ready")
        assert during.returncode == 1, during.stdout
        assert "no certificate" in during.stdout
        agent.wait_ready()
        assert agent.cli("health").returncode == 0
        served(agent, pebble)
    finally:
        agent.stop()
        proxy.stop()
    assert agent.cli("health").returncode == 1
    assert agent.cli("health", "--ready").returncode == 1


def test_restart_serves_the_same_certificate_without_a_new_order(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        first = served(agent, pebble)
    finally:
        agent.stop_cleanly()
    orders = pebble.orders_created()

    agent.start()
    try:
        again = served(agent, pebble)
        agent.wait_ready()
    finally:
        agent.stop_cleanly()
    assert fingerprint(again) == fingerprint(first)
    assert pebble.orders_created() == orders == 1


def test_changed_directory_gets_a_new_certificate(tmp_path, pebble_factory, registry_binary):
    http_port = free_port()
    first_ca = pebble_factory(http_port)
    agent = start_agent(tmp_path, first_ca, registry_binary)
    try:
        first = served(agent, first_ca)
    finally:
        agent.stop()
    first_ca.stop()

    second_ca = pebble_factory(http_port)
    agent.env.update(
        ACME_DIRECTORY=second_ca.directory_url, ACME_CA_BUNDLE=str(second_ca.ca_bundle)
    )
    agent.start()
    try:
        second = served(agent, second_ca)
        agent.wait_ready()
    finally:
        agent.stop()
    assert fingerprint(second) != fingerprint(first)
    assert second_ca.orders_created() == 1


def test_external_account_binding(tmp_path, pebble_factory, registry_binary):
    hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    pebble = pebble_factory(free_port(), eab_keys={"kid-1": hmac_key})
    key_file = tmp_path / "eab-hmac"
    key_file.write_text(hmac_key + "\n")
    agent = start_agent(
        tmp_path,
        pebble,
        registry_binary,
        ACME_EAB_KID="kid-1",
        ACME_EAB_HMAC_KEY_FILE=str(key_file),
        ACME_EMAIL="ops@registry.test",
    )
    try:
        served(agent, pebble)
        agent.wait_ready()
    finally:
        agent.stop()
    assert hmac_key not in agent.log()
    assert "externalAccountRequired" not in pebble.log_text()


def test_without_eab_an_eab_ca_refuses_and_the_agent_says_why(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port(), eab_keys={"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7"})
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        deadline = time.monotonic() + 20
        while "could not obtain a certificate" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        status = json.loads(agent.cli("status", "--json").stdout)
        assert status["certificate"] is None
        assert status["backoff"]["failures"] == 1
        assert "externalAccountRequired" in status["backoff"]["last_error"]
        assert agent.cli("health").returncode == 0
        assert agent.cli("health", "--ready").returncode == 1
    finally:
        agent.stop()


@pytest.mark.parametrize("key_type", ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"])
def test_each_key_type_issues_and_serves(tmp_path, pebble_factory, registry_binary, key_type):
    pebble = pebble_factory(free_port())
    agent = start_agent(
        tmp_path,
        pebble,
        registry_binary,
        ACME_KEY_TYPE=key_type,
        ACME_DOMAINS=f"{NAME},mirror.test",
    )
    try:
        leaf = served(agent, pebble)
        served(agent, pebble, name="mirror.test")
    finally:
        agent.stop()
    public = leaf.public_key()
    if key_type.startswith("ec"):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.key_size == int(key_type[2:])
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == int(key_type[3:])


def test_port_80_responder_of_the_running_agent(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as sock:
                sock.settimeout(5)
                sock.connect((host, pebble.http_port))
                sock.sendall(b"GET /v2/x?y=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
                answer = sock.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 301")
            assert f"Location: https://{NAME}/v2/x?y=1\r\n" in answer
        probe = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://127.0.0.1:{pebble.http_port}/.well-known/acme-challenge/unknown",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert probe.stdout == "404"
    finally:
        agent.stop()


def test_a_registry_that_keeps_failing_ends_run_with_status_1(tmp_path, pebble_factory):
    # supervisord gives up on a registry that exits at once (FATAL); the orchestrator must
    # see a failed container, not a healthy-looking one without a registry.
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, Path("/bin/false"))
    assert agent.proc is not None
    status = agent.proc.wait(timeout=60)
    assert status == 1, agent.log()
    assert "gave up" in agent.log()


def test_a_port_in_use_is_one_clear_line_before_anything_starts(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        agent = start_agent(
            tmp_path, pebble, registry_binary, REGISTRY_HTTP_ADDR=f"127.0.0.1:{port}"
        )
        assert agent.proc is not None
        assert agent.proc.wait(timeout=30) == 1
    lines = [line for line in agent.log().splitlines() if line.startswith("acme-registry:")]
    assert lines == [
        f"acme-registry: REGISTRY_HTTP_ADDR port {port} cannot be bound by uid 0 "
        "(Address already in use): something else listens there"
    ]
    assert pebble.orders_created() == 0
