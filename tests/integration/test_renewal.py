"""Renewal through the running agent, and the failure backoff, against Pebble 2.4."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.agent import (
    CREDS,
    NAME,
    fingerprint,
    served,
    served_instead_of,
    start_agent,
    status,
)
from tests.support.clients import registry_session
from tests.support.ports import free_port


def test_renew_rotates_the_registry_to_the_new_certificate(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        first = served(agent, pebble)
        agent.wait_ready()
        result = agent.cli("renew", timeout=120)
        assert result.returncode == 0, result.stderr + agent.log()
        assert "now serving serial" in result.stdout
        second = served_instead_of(agent, pebble, first, 10)
        assert f"{second.serial_number:x}" in result.stdout
        agent.wait_ready()
        assert status(agent)["certificate"]["serial"] == f"{second.serial_number:x}"
        assert pebble.orders_created() == 2
    finally:
        agent.stop_cleanly()
    assert "registry generation registry:registry-1 replaced registry:registry-0" in agent.log()


def test_two_concurrent_renewals_both_get_their_answer(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
        agent.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: agent.cli("renew", timeout=240), range(2)))
        for result in results:
            assert result.returncode == 0, result.stderr + agent.log()
            assert "now serving serial" in result.stdout
        # One attempt may answer both, or the later request gets an attempt of its own.
        assert pebble.orders_created() in (2, 3)
        agent.wait_ready()
        serial = status(agent)["certificate"]["serial"]
        assert any(f"serial {serial}," in result.stdout for result in results)
    finally:
        agent.stop_cleanly()


def test_failures_back_off_and_the_backoff_survives_restarts(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
    finally:
        agent.stop()
    # The certificate no longer covers the configured names: renew at once. The CA is
    # gone, so every attempt fails while the old certificate keeps being served.
    pebble.stop()
    agent.env["ACME_DOMAINS"] = f"{NAME},extra.test"
    backoff_file = agent.data_dir / "state" / "backoff.json"
    expected = [dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100)]
    expected += [dt.timedelta(days=1)]
    for attempt, delay in enumerate(expected, start=1):
        agent.start()
        try:
            deadline = time.monotonic() + 30
            while status_or_none(agent, attempt) is None:
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.2)
            backoff = status(agent)["backoff"]
            last = dt.datetime.fromisoformat(backoff["last_attempt"])
            nxt = dt.datetime.fromisoformat(backoff["next_attempt"])
            assert nxt - last == delay, backoff
            assert backoff["last_error"]
            assert agent.cli("health").returncode == 0
        finally:
            agent.stop()
        # Time passing, without sleeping through it: move the planned attempt into the past.
        state = json.loads(backoff_file.read_text())
        state["next_attempt"] = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
        backoff_file.write_text(json.dumps(state))

    # A restart with the next attempt still ahead does not try early.
    state = json.loads(backoff_file.read_text())
    state["next_attempt"] = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=5)).isoformat()
    backoff_file.write_text(json.dumps(state))
    agent.start()
    try:
        time.sleep(2)
        assert status(agent)["backoff"]["failures"] == len(expected)
    finally:
        agent.stop()


def status_or_none(agent, failures: int) -> dict | None:
    result = agent.cli("status", "--json")
    if result.returncode != 0:
        return None
    answer = json.loads(result.stdout)
    return answer if answer["backoff"]["failures"] >= failures else None


def test_changed_configuration_starts_the_backoff_over(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    pebble.stop()
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        deadline = time.monotonic() + 30
        while status_or_none(agent, 1) is None:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
    finally:
        agent.stop()
    backoff_file: Path = agent.data_dir / "state" / "backoff.json"
    state = json.loads(backoff_file.read_text())
    state["failures"] = 3
    backoff_file.write_text(json.dumps(state))
    agent.env["ACME_KEY_TYPE"] = "rsa2048"
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            backoff = status(agent)["backoff"] if agent.cli("health").returncode == 0 else {}
            if backoff.get("last_attempt") and backoff["last_attempt"] != state["last_attempt"]:
                break
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        assert backoff["failures"] == 1
    finally:
        agent.stop()


def test_an_upload_started_before_a_rotation_finishes_after_it(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        first = served(agent, pebble)
        session = registry_session(NAME, pebble.root_pem(), tmp_path / "session")
        session.auth = tuple(CREDS.split(":", 1))
        base = f"https://127.0.0.1:{agent.registry_port}"
        blob = os.urandom(3 * 1024 * 1024)
        started = session.post(f"{base}/v2/demo/blobs/uploads/", timeout=10)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        half = session.patch(
            location if location.startswith("http") else base + location,
            data=blob[: len(blob) // 2],
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert half.status_code == 202, half.text

        assert agent.cli("renew", timeout=120).returncode == 0
        served_instead_of(agent, pebble, first, 10)

        session = registry_session(NAME, pebble.root_pem(), tmp_path / "session2")
        session.auth = tuple(CREDS.split(":", 1))
        location = half.headers["Location"]
        rest = session.patch(
            location if location.startswith("http") else base + location,
            data=blob[len(blob) // 2 :],
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert rest.status_code == 202, rest.text
        location = rest.headers["Location"]
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        done = session.put(
            location if location.startswith("http") else base + location,
            params={"digest": digest},
            timeout=30,
        )
        assert done.status_code == 201, done.text
        fetched = session.get(f"{base}/v2/demo/blobs/{digest}", timeout=30)
        assert hashlib.sha256(fetched.content).hexdigest() == digest.split(":")[1]
    finally:
        agent.stop()


def test_dry_run_orders_from_the_dry_run_directory_and_leaves_the_live_pair(
    tmp_path, pebble_factory, registry_binary
):
    http_port = free_port()
    live_ca = pebble_factory(http_port)
    staging = pebble_factory(http_port)
    agent = start_agent(
        tmp_path, live_ca, registry_binary, ACME_DRY_RUN_DIRECTORY=staging.directory_url
    )
    # Both test CAs' listeners must be trusted: one bundle with both.
    bundle = tmp_path / "both-cas.pem"
    bundle.write_bytes(live_ca.ca_bundle.read_bytes() + staging.ca_bundle.read_bytes())
    agent.stop()
    agent.env["ACME_CA_BUNDLE"] = str(bundle)
    agent.start()
    try:
        first = served(agent, live_ca)
        before = (agent.cert_dir / "domain.crt").read_bytes()
        result = agent.cli("renew", "--dry-run", timeout=120)
        assert result.returncode == 0, result.stderr + agent.log()
        assert "dry run succeeded" in result.stdout
        assert staging.orders_created() == 1
        assert (agent.cert_dir / "domain.crt").read_bytes() == before
        assert fingerprint(served(agent, live_ca)) == fingerprint(first)
    finally:
        agent.stop()


KILLED_AFTER_RECORDING = """
import os
from acme_registry.account import Account
from acme_registry.challenges import PendingChallenges
from acme_registry.config import load_settings
from acme_registry.issuer import Issuer
from acme_registry.storage import FileStorage

class DiesBeforeFinalizing(Issuer):
    def _complete(self, *args, **kwargs):
        os._exit(9)  # as a kill -9 right after the order was recorded

settings = load_settings()
storage = FileStorage(settings.data_dir)
account, challenges = Account(settings, storage), PendingChallenges(storage)
DiesBeforeFinalizing(settings, storage, account, challenges).obtain()
"""


def test_an_order_recorded_before_a_crash_is_finished_instead_of_a_new_one(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        first = served(agent, pebble)
        # An issuing process that dies right after recording its order; the running agent
        # answers its challenge, as it would for its own child.
        crashed = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_RECORDING],
            env=agent.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert crashed.returncode == 9, crashed.stderr
        assert (agent.data_dir / "orders" / "pending.json").exists()
        orders = pebble.orders_created()
        result = agent.cli("renew", timeout=120)
        assert result.returncode == 0, result.stderr
        served_instead_of(agent, pebble, first, 10)
        assert pebble.orders_created() == orders  # finished, not ordered again
        assert not (agent.data_dir / "orders" / "pending.json").exists()
    finally:
        agent.stop()
    assert "resuming the order" in agent.log()
