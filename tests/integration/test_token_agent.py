"""AUTH_MODE=token through the real agent (`acme-registry run`), Pebble, the registry and skopeo.

The token service's building blocks are tested on their own in test_token_auth.py; here the
product wires them: the config it renders, the users and grants it reads, the CLI's grants,
the metrics, and the token service following a certificate renewal.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import NAME, AgentProcess, fingerprint, served, start_agent
from tests.support.clients import Skopeo, wait_for_tls
from tests.support.pebble import Pebble
from tests.support.ports import free_port

POLICY = """\
users:
  ci:
    push: ["team/*", "public/*"]
    delete: ["team/tmp/*"]
  node:
    pull: ["team/*"]
"""
PASSWORDS = {"ci": "ci-Pa55word-long", "node": "node-Pa55word-long"}


def start_token_agent(
    tmp_path: Path, pebble: Pebble, registry_binary: Path, **extra: str
) -> tuple[AgentProcess, int]:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    env = {
        "AUTH_MODE": "token",
        "AUTH_USERS": ",".join(f"{u}:{p}" for u, p in PASSWORDS.items()),
        "AUTH_POLICY_FILE": str(policy),
        "AUTH_ANONYMOUS_PULL": "public/*",
        "TOKEN_ADDR": f"127.0.0.1:{free_port()}",
        **extra,
    }
    agent = start_agent(tmp_path, pebble, registry_binary, **env)
    return agent, int(env["TOKEN_ADDR"].rsplit(":", 1)[1])


def skopeo(pebble: Pebble, workdir: Path, user: str | None = None, password: str = "") -> Skopeo:
    creds = f"{user}:{password or PASSWORDS[user]}" if user else None
    return Skopeo(workdir, pebble.root_pem(), [NAME], creds=creds)


def ref(agent: AgentProcess, repository: str, tag: str = "v1") -> str:
    return f"{NAME}:{agent.registry_port}/{repository}:{tag}"


def user_cli(agent: AgentProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "acme_registry", "user", *args],
        env=agent.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    import requests

    text = requests.get(f"{agent.admin_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_token_mode_through_the_agent(tmp_path, pebble_factory, registry_binary, oci_image):
    pebble = pebble_factory(free_port())
    agent, token_port = start_token_agent(tmp_path, pebble, registry_binary)
    try:
        leaf = served(agent, pebble)
        agent.wait_ready()
        # The token service serves the registry's certificate.
        token_leaf = wait_for_tls("127.0.0.1", token_port, NAME, pebble.root_pem(), 30)
        assert fingerprint(token_leaf) == fingerprint(leaf)

        ci = skopeo(pebble, tmp_path / "ci", "ci")
        ci.push(oci_image, "v1", ref(agent, "team/app"))
        ci.push(oci_image, "v1", ref(agent, "public/app"))
        node = skopeo(pebble, tmp_path / "node", "node")
        node.pull(ref(agent, "team/app"), tmp_path / "node-pulled", "v1")
        with pytest.raises(AssertionError) as denied:
            node.push(oci_image, "v1", ref(agent, "team/app", "v2"))
        assert "denied" in str(denied.value).lower()

        anonymous = skopeo(pebble, tmp_path / "anon")
        anonymous.pull(ref(agent, "public/app"), tmp_path / "anon-pulled", "v1")
        with pytest.raises(AssertionError):
            anonymous.pull(ref(agent, "team/app"), tmp_path / "anon-team", "v1")

        with pytest.raises(AssertionError):
            skopeo(pebble, tmp_path / "wrong", "ci", "not-the-password").pull(
                ref(agent, "team/app"), tmp_path / "wrong-pulled", "v1"
            )
        assert metric(agent, "acme_registry_auth_failures_total", reason="invalid_credentials") > 0
        assert metric(agent, "acme_registry_tokens_issued_total") > 0

        # Deleting: the agent turned storage.delete on (here through the environment, as
        # storage is configured by REGISTRY_STORAGE_*), and only the grant allows it.
        ci.push(oci_image, "v1", ref(agent, "team/tmp/scratch"))
        delete = ["delete", "--tls-verify=true", "--cert-dir", str(ci.cert_dir)]
        delete += ["--creds", f"ci:{PASSWORDS['ci']}"]
        with pytest.raises(AssertionError):
            ci.run(*delete, f"docker://{ref(agent, 'team/app')}")
        ci.run(*delete, f"docker://{ref(agent, 'team/tmp/scratch')}")
        with pytest.raises(AssertionError):
            ci.manifest_digest(ref(agent, "team/tmp/scratch"))

        # Run-time grants from the CLI, applied to the next token without a restart.
        added = user_cli(agent, "add", "extra", "--push", "extra/*", stdin="extra-Pa55word\n")
        assert added.returncode == 0, added.stderr
        extra = skopeo(pebble, tmp_path / "extra", "extra", "extra-Pa55word")
        extra.push(oci_image, "v1", ref(agent, "extra/app"))
        with pytest.raises(AssertionError):
            extra.push(oci_image, "v1", ref(agent, "team/app2"))
        listed = user_cli(agent, "list").stdout
        assert "extra\trun-time\tpush extra/*" in listed
        assert "ci\tAUTH_USERS\tpush team/* public/*" in listed
        bad = user_cli(agent, "add", "extra", "--pull", "Bad/*", stdin="x-Pa55word\n")
        assert bad.returncode == 2 and "--pull" in bad.stderr and len(bad.stderr.splitlines()) == 1

        # The policy file edited while running: the next token follows it, no restart.
        policy = tmp_path / "policy.yml"
        policy.write_text(POLICY + '    push: ["nodes/*"]\n')
        later = policy.stat().st_mtime + 5  # an mtime change, whatever the clock's grain
        os.utime(policy, (later, later))
        node.push(oci_image, "v1", ref(agent, "nodes/app"))

        # A renewal while logged in: the token service moves onto the new certificate.
        renewed = agent.cli("renew", timeout=120)
        assert renewed.returncode == 0, renewed.stderr + agent.log()
        new_leaf = wait_for_tls(
            "127.0.0.1",
            token_port,
            NAME,
            pebble.root_pem(),
            30,
            accept=lambda cert: fingerprint(cert) != fingerprint(leaf),
        )
        assert fingerprint(served(agent, pebble)) == fingerprint(new_leaf)
        ci.pull(ref(agent, "team/app"), tmp_path / "ci-after-renewal", "v1")
        ci.push(oci_image, "v1", ref(agent, "team/app", "v3"))
        status = agent.cli("status")
        assert status.returncode == 0, status.stderr
        shown = status.stdout + status.stderr
    finally:
        agent.stop_cleanly()
    log = agent.log()
    keyring = agent.data_dir / "token" / "keyring.json"
    ring = json.loads(keyring.read_text())
    key_body = "".join(ring["current"]["key"].strip().splitlines()[1:-1])
    for secret in (*PASSWORDS.values(), "extra-Pa55word", "not-the-password"):
        assert secret not in log and secret not in shown
    for material in (key_body[:40], ring["refresh_secret"]):  # the signing key, the HMAC key
        assert material not in log and material not in shown
    assert keyring.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in (agent.data_dir / "registry" / "token-roots.pem").read_bytes()
    # Tokens name their key by kid for 3.x (cheaper for it to check), by x5c for 2.8.
    version = subprocess.run(
        [str(registry_binary), "--version"], capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
    ).stdout  # fmt: skip
    expected = "kid" if "distribution/v3" in version else "x5c"
    assert f"tokens name their key by {expected})" in log


def test_token_addr_that_cannot_be_bound_is_one_line_exit_1(
    tmp_path, pebble_factory, registry_binary
):
    import socket

    pebble = pebble_factory(free_port())
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        agent, _ = start_token_agent(
            tmp_path, pebble, registry_binary, TOKEN_ADDR=f"127.0.0.1:{port}"
        )
        assert agent.proc is not None
        code = agent.proc.wait(timeout=30)
    finally:
        holder.close()
    assert code == 1
    problems = [line for line in agent.log().splitlines() if "TOKEN_ADDR" in line]
    assert len(problems) == 1 and str(port) in problems[0], agent.log()


def token_get(
    pebble: Pebble, port: int, user: str, password: str, source: str = "127.0.0.1"
) -> tuple[int, dict[str, str]]:
    """GET /token with basic credentials from ``source``: dialled on loopback, the
    certificate verified for NAME. Returns the status and the headers (lower-case names)."""
    context = ssl.create_default_context(cadata=pebble.root_pem().decode())
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    with context.wrap_socket(raw, server_hostname=NAME) as conn:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.sendall(
            f"GET /token?service={NAME}&scope=repository:team/app:pull HTTP/1.1\r\n"
            f"Host: {NAME}:{port}\r\nAuthorization: Basic {basic}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


def test_throttled_per_user_and_address_through_the_agent(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent, token_port = start_token_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
        agent.wait_ready()
        wait_for_tls("127.0.0.1", token_port, NAME, pebble.root_pem(), 30)
        statuses = [token_get(pebble, token_port, "ci", "wrong")[0] for _ in range(20)]
        assert statuses[0] == 401 and statuses[-1] == 429, statuses
        status, headers = token_get(pebble, token_port, "ci", PASSWORDS["ci"])
        assert status == 429 and int(headers["retry-after"]) > 0
        # Another user from that address, and that user from another address: at once.
        assert token_get(pebble, token_port, "node", PASSWORDS["node"])[0] == 200
        assert token_get(pebble, token_port, "ci", PASSWORDS["ci"], "127.0.0.2")[0] == 200
        assert metric(agent, "acme_registry_auth_failures_total", reason="throttled") > 0
    finally:
        agent.stop_cleanly()
