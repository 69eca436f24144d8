"""Safe by default, through the running agent: authentication, users, the admin endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import CREDS, NAME, PASSWORD, served, start_agent
from tests.support.clients import registry_session
from tests.support.ports import free_port


def registry_get(agent, pebble, tmp_path, auth=None) -> requests.Response:
    session = registry_session(NAME, pebble.root_pem(), tmp_path / "session")
    return session.get(f"https://127.0.0.1:{agent.registry_port}/v2/", auth=auth, timeout=10)


def user_cli(agent, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "acme_registry", "user", *args],
        env=agent.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_credentials_users_and_secrets(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
        agent.wait_ready()  # readiness counts the 401 of /v2/ as a registry that answers
        user, password = CREDS.split(":", 1)
        assert registry_get(agent, pebble, tmp_path).status_code == 401
        assert registry_get(agent, pebble, tmp_path, (user, "wrong")).status_code == 401
        assert registry_get(agent, pebble, tmp_path, (user, password)).status_code == 200

        added = user_cli(agent, "add", "alice", stdin="alice-password-1\n")
        assert added.returncode == 0, added.stderr
        assert registry_get(agent, pebble, tmp_path, ("alice", "alice-password-1")).ok
        listed = user_cli(agent, "list")
        assert "alice\trun-time" in listed.stdout and f"{user}\tAUTH_USERS" in listed.stdout

        generated = user_cli(agent, "add", "bob")
        assert generated.returncode == 0
        bob_password = generated.stdout.split("password (shown once): ", 1)[1].strip()
        assert registry_get(agent, pebble, tmp_path, ("bob", bob_password)).ok

        assert user_cli(agent, "remove", "alice").returncode == 0
        time.sleep(0.05)
        assert (
            registry_get(agent, pebble, tmp_path, ("alice", "alice-password-1")).status_code == 401
        )
        refused = user_cli(agent, "remove", user)
        assert refused.returncode == 1 and "AUTH_USERS" in refused.stderr
    finally:
        agent.stop()
    log = agent.log()
    for secret in (PASSWORD, "alice-password-1", bob_password):
        assert secret not in log
    htpasswd = agent.data_dir / "auth" / "htpasswd"
    assert htpasswd.stat().st_mode & 0o777 == 0o600
    assert (agent.data_dir / "auth").stat().st_mode & 0o777 == 0o700


def test_without_users_an_initial_admin_is_created_once(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    agent.stop()
    agent.env.pop("AUTH_USERS")
    agent.start()
    try:
        served(agent, pebble)
        password_file = agent.data_dir / "auth" / "initial-admin-password"
        password = password_file.read_text().strip()
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert registry_get(agent, pebble, tmp_path, ("admin", password)).ok
    finally:
        agent.stop()
    assert password not in agent.log()
    assert str(password_file) in agent.log()
    agent.start()
    try:
        served(agent, pebble)
        assert password_file.read_text().strip() == password
    finally:
        agent.stop()


def test_auth_mode_none_warns_and_lets_anyone_in(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary, AUTH_MODE="none")
    agent.env.pop("AUTH_USERS")
    agent.stop()
    agent.start()
    try:
        served(agent, pebble)
        assert registry_get(agent, pebble, tmp_path).status_code == 200
    finally:
        agent.stop()
    assert "AUTH_MODE=none: anyone who reaches the registry can push and pull" in agent.log()


def test_admin_endpoint_health_readiness_and_metrics(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        leaf = served(agent, pebble)
        agent.wait_ready()
        assert requests.get(f"{agent.admin_url}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{agent.admin_url}/readyz", timeout=5).status_code == 200
        text = requests.get(f"{agent.admin_url}/metrics", timeout=5).text
        samples = {
            (s.name, s.labels.get("domain")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        key = ("acme_registry_certificate_not_after_timestamp_seconds", NAME)
        assert samples[key] == leaf.not_valid_after_utc.timestamp()
        assert samples[("acme_registry_renewal_attempts_total", None)] == 1
        latency = {
            s.labels.get("step"): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "acme_registry_acme_request_duration_seconds_count"
        }
        assert latency.get("new_order", 0) >= 1 and latency.get("finalize", 0) >= 1
        assert samples[("acme_registry_registry_generation_starts_total", None)] >= 1
    finally:
        agent.stop()


def test_registry_headers_and_no_debug_listener(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
        response = registry_get(agent, pebble, tmp_path)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "max-age=" in response.headers["Strict-Transport-Security"]
        config = (agent.data_dir / "registry" / "registry-0.yml").read_text()
        assert '"debug"' not in config
        assert (agent.data_dir / "registry" / "registry-0.yml").stat().st_mode & 0o777 == 0o600
    finally:
        agent.stop()


def test_json_logs_one_event_per_line(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary, LOG_FORMAT="json")
    try:
        served(agent, pebble)
        assert registry_get(agent, pebble, tmp_path).status_code == 401
    finally:
        agent.stop()
    events = []
    for line in agent.log().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    ours = [e for e in events if e.get("logger", "").startswith("acme_registry")]
    assert any("certificate issued" in e["msg"] for e in ours)
    assert all({"time", "level", "logger", "msg"} <= e.keys() for e in ours)
    # The registry's own lines are JSON too (its log formatter).
    assert any(e.get("service") == "registry" for e in events), agent.log()[-2000:]
