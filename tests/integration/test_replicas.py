"""Three replicas on one S3 state store behind haproxy behave as one registry (issue 12).

Real components only: SeaweedFS (images and state in one bucket), Pebble 2.10 validating
through haproxy's port 80, haproxy in TCP mode round-robin over the replicas' 80 and 443,
and each replica a whole `acme-registry run` (supervisord, agent, registry binary).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from acme_registry import statekeys
from acme_registry.config import load_settings
from acme_registry.sharedchallenges import account_thumbprint
from tests.support.agent import CREDS, NAME, PASSWORD, USER, fingerprint, status
from tests.support.clients import registry_session
from tests.support.pebble import PEBBLE_PROFILES, Pebble, pebble_sid_binary
from tests.support.ports import free_port
from tests.support.replicas import HTTP, Cluster, ProxyLoad
from tests.support.seaweed import SeaweedS3

ClusterFactory = Callable[..., Cluster]


@pytest.fixture(scope="module")
def front_port() -> int:
    """haproxy's port 80 in every test of this module: Pebble validates there."""
    return free_port()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, front_port: int) -> Iterator[Pebble]:
    server = Pebble(
        tmp_path_factory.mktemp("pebble"),
        front_port,
        binary=pebble_sid_binary(install=True),
        config_overrides={"profiles": PEBBLE_PROFILES},
        # Every order validates again: the tests check who answers the CA.
        env={"PEBBLE_AUTHZREUSE": "0"},
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_cluster(
    tmp_path: Path,
    seaweed: SeaweedS3,
    pebble: Pebble,
    registry_binary: Path,
    state_key_file: Path,
    front_port: int,
) -> Iterator[ClusterFactory]:
    made: list[Cluster] = []

    def make(*, port_80_silent: bool = False, **extra: str) -> Cluster:
        cluster = Cluster(
            tmp_path / f"cluster{len(made)}",
            seaweed,
            seaweed.new_bucket("replicas"),
            pebble,
            registry_binary,
            state_key_file,
            front_port,
            **extra,
        )
        made.append(cluster)
        return cluster.start(port_80_silent=port_80_silent)

    yield make
    for cluster in made:
        cluster.stop()


def orders_during(pebble: Pebble, action: Callable[[], None]) -> int:
    before = pebble.orders_created()
    action()
    return pebble.orders_created() - before


def test_three_replicas_at_once_place_one_order_and_behave_as_one(
    make_cluster: ClusterFactory, pebble: Pebble, tmp_path: Path
) -> None:
    before = pebble.orders_created()
    started = time.monotonic()
    cluster = make_cluster()
    cluster.wait_ready()
    print(f"three replicas ready {time.monotonic() - started:.1f} s after a cold start")
    assert pebble.orders_created() - before == 1
    assert cluster.commits() == 1

    # The same serial on each replica and through haproxy.
    serials = {cluster.served(r).serial_number for r in cluster.replicas}
    assert len(serials) == 1
    assert cluster.serials_through_proxy() == serials
    shared = status(cluster.replicas[1])["state_store"]
    assert shared == {"store": "s3", "reachable": True, "error": None}

    # A user added on replica 1 logs in on replica 3 (within 10 s, no restart).
    first, third = cluster.replicas[0], cluster.replicas[2]
    added = first.cli("user", "add", "alice", timeout=30)
    assert added.returncode == 0, added.stderr
    password = added.stdout.strip().splitlines()[-1].split()[-1]
    session = registry_session(NAME, pebble.root_pem(), tmp_path / "client")
    url = f"https://127.0.0.1:{third.registry_port}/v2/"
    deadline = time.monotonic() + 10
    while session.get(url, auth=("alice", password), timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "alice cannot log in on replica 3 within 10 s"
        time.sleep(0.2)

    # A blob upload whose POST, PATCH and PUT go to three different replicas completes.
    blob = b"shared state makes uploads cross replicas" * 1000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    ports = [r.registry_port for r in cluster.replicas]
    auth = (USER, PASSWORD)
    post = session.post(f"https://127.0.0.1:{ports[0]}/v2/demo/blobs/uploads/", auth=auth)
    assert post.status_code == 202, post.text
    location = post.headers["Location"].split("/v2/", 1)[1]
    patch = session.patch(
        f"https://127.0.0.1:{ports[1]}/v2/{location}",
        data=blob,
        auth=auth,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert patch.status_code == 202, patch.text
    location = patch.headers["Location"].split("/v2/", 1)[1]
    separator = "&" if "?" in location else "?"
    put = session.put(
        f"https://127.0.0.1:{ports[2]}/v2/{location}{separator}digest={digest}", auth=auth
    )
    assert put.status_code == 201, put.text
    fetched = session.get(f"https://127.0.0.1:{ports[0]}/v2/demo/blobs/{digest}", auth=auth)
    assert fetched.content == blob

    # The bucket read without the encryption key shows no private key and no hash.
    for key in cluster.state_keys():
        data = cluster.state_object(key.removeprefix("acme-registry/")) or b""
        assert b"PRIVATE KEY" not in data, key
        assert b"$2b$" not in data and b"$2a$" not in data and b"$2y$" not in data, key
    assert CREDS  # the environment's user logged in above


def test_renewals_the_orderer_out_of_haproxy_and_a_waiting_orderer_follow(
    make_cluster: ClusterFactory, pebble: Pebble, tmp_path: Path
) -> None:
    cluster = make_cluster()
    cluster.wait_ready()
    old = fingerprint(cluster.served(cluster.replicas[0]))
    # Replica 1 orders the renewal, but the CA's port-80 requests never reach it.
    cluster.proxy.disable(HTTP, 1)
    renewed = orders_during(pebble, lambda: _renew(cluster.replicas[0]))
    assert renewed == 1
    took = cluster.wait_renewal_everywhere(old, timeout=30)
    print(f"renewal: committed to served by the last replica in {took:.2f} s")
    record = cluster.record()
    assert record is not None
    assert f"{record.pair.serial:x}" == status(cluster.replicas[0])["certificate"]["serial"]
    assert cluster.commits() == 2

    # Another orderer (this test) holds the lock and keeps it after committing: replica 2,
    # whose renewal waits for that lock, serves the committed certificate while the lock
    # is still held, and places no order of its own.
    waiter = cluster.replicas[1]
    requested = waiter.log().count("renewing: requested")
    with (
        cluster.storage().lock(statekeys.ISSUANCE_LOCK, lease=5) as held,
        ThreadPoolExecutor(1) as pool,
    ):
        renewal = pool.submit(waiter.cli, "renew", timeout=150)
        deadline = time.monotonic() + 30
        while waiter.log().count("renewing: requested") == requested:
            assert time.monotonic() < deadline, "replica 2 did not start its renewal"
            time.sleep(0.1)
        before = pebble.orders_created()
        pair = cluster.order_and_commit(tmp_path / "orderer")
        committed = time.monotonic()
        answer = renewal.result(timeout=150)
        followed = time.monotonic() - committed
        served = fingerprint(cluster.served(waiter))
        holder = cluster.lock_holder()
        assert not held.lost.is_set()
        assert holder is not None and holder["holder"] == held.holder
        assert holder["state"] == "held"
    print(f"waiting orderer: served the committed certificate {followed:.2f} s after the commit")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert served == pair.fingerprint
    assert pebble.orders_created() - before == 1  # this test's, none by replica 2
    assert status(waiter)["certificate"]["serial"] == f"{pair.serial:x}"
    cluster.wait_all_serve(pair.fingerprint, timeout=30)
    assert cluster.commits() == 2  # this test's commit is in no replica's log


def _renew(replica) -> None:  # type: ignore[no-untyped-def]
    result = replica.cli("renew", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kill_9_of_the_lock_holder_mid_order_one_certificate_committed(
    make_cluster: ClusterFactory, pebble: Pebble
) -> None:
    # The CA's validations hang at first: whoever holds the lock is caught mid-order.
    cluster = make_cluster(port_80_silent=True)
    holder = None
    deadline = time.monotonic() + 60
    while holder is None:
        assert time.monotonic() < deadline, "no order reached validation"
        marker = cluster.state_object(statekeys.ORDER_IN_FLIGHT)
        record = cluster.lock_holder()
        if marker is not None and record and record.get("state") == "held":
            holder = cluster.replica_of_pid(int(str(record["holder"]).split(":")[1]))
        time.sleep(0.05)
    cluster.kill(holder)
    killed_at = time.monotonic()
    survivors = [r for r in cluster.replicas if r is not holder]
    cluster.enable_port_80(survivors)
    for replica in survivors:
        replica.wait_ready(timeout=90)
    took = time.monotonic() - killed_at
    print(f"takeover: survivors ready {took:.1f} s after kill -9 (lease 5 s)")
    # Taken over once stale (lease minus one renewal interval at the least), not before.
    assert took >= 3
    assert "committed" not in holder.log()
    assert cluster.commits() == 1
    serials = {cluster.served(r).serial_number for r in survivors}
    assert len(serials) == 1
    assert cluster.serials_through_proxy() == serials


def test_store_down_cache_served_new_replica_unready_stateless_then_back(
    make_cluster: ClusterFactory, pebble: Pebble, seaweed: SeaweedS3
) -> None:
    cluster = make_cluster(STATE_STATELESS_CHALLENGES="true")
    cluster.wait_ready()
    serial = cluster.served(cluster.replicas[0]).serial_number
    # What a replica must answer: computed here from the account key as the orderer has it.
    settings = load_settings(cluster.replicas[0].env)
    pem = cluster.storage().load_bytes(statekeys.account_key(settings.directory_id))
    assert pem is not None
    thumbprint = account_thumbprint(pem)

    seaweed.stop()
    try:
        assert cluster.serials_through_proxy() == {serial}
        late = cluster.add_replica(STATE_STATELESS_CHALLENGES="true")
        late.start()
        time.sleep(5)
        assert late.cli("health", "--ready").returncode != 0
        ready = requests.get(f"{late.admin_url}/readyz", timeout=5)
        assert ready.status_code == 503
        metrics = requests.get(f"{cluster.replicas[0].admin_url}/metrics", timeout=5).text
        assert "acme_registry_state_store_up 0.0" in metrics
        assert status(cluster.replicas[0])["state_store"]["reachable"] is False
        refused = cluster.replicas[1].cli("user", "add", "bob", timeout=30)
        assert refused.returncode != 0 and "state store" in refused.stderr + refused.stdout
        # No order while the store is down: the loop's step answers the renewal.
        orders = pebble.orders_created()
        no_order = cluster.replicas[0].cli("renew", timeout=60)
        assert no_order.returncode != 0
        assert "no order is placed until it answers" in no_order.stderr + no_order.stdout
        assert pebble.orders_created() == orders
        token = "t" * 43
        answer = requests.get(
            f"http://127.0.0.1:{cluster.replicas[1].env['ACME_HTTP_PORT']}"
            f"/.well-known/acme-challenge/{token}",
            headers={"Host": NAME},
            timeout=5,
        )
        assert answer.status_code == 200 and answer.text == f"{token}.{thumbprint}"
        other = requests.get(
            f"http://127.0.0.1:{cluster.replicas[1].env['ACME_HTTP_PORT']}"
            f"/.well-known/acme-challenge/{token}",
            headers={"Host": "elsewhere.test"},
            timeout=5,
        )
        assert other.status_code == 404
        assert cluster.served(cluster.replicas[2]).serial_number == serial
        # A replica restarted with its cache serves it, the store still down.
        restarted = cluster.replicas[2]
        restarted.stop_cleanly()
        restarted.start()
        restarted.wait_ready(timeout=60)
        assert cluster.served(restarted).serial_number == serial
    finally:
        seaweed.start()
    # Back: the late replica gets the certificate, and renewal works again.
    late.wait_ready(timeout=60)
    assert cluster.served(late).serial_number == serial
    _renew(cluster.replicas[1])
    renewed = status(cluster.replicas[1])["certificate"]["serial"]
    assert renewed != f"{serial:x}"
    cluster.wait_all_serve(fingerprint(cluster.served(cluster.replicas[1])), timeout=30)


def test_short_lived_renewals_reach_every_replica_with_no_failed_request(
    make_cluster: ClusterFactory, pebble: Pebble, tmp_path: Path
) -> None:
    cluster = make_cluster(ACME_PROFILE="shortlived")
    cluster.wait_ready()
    first = fingerprint(cluster.served(cluster.replicas[0]))
    load = ProxyLoad(cluster.https_port, pebble.root_pem(), tmp_path / "load")
    load.start()
    try:
        # The first certificate lives a minute: its renewal comes within it.
        followed = cluster.wait_renewal_everywhere(first, timeout=75)
    finally:
        load.stop()
    print(
        f"renewal: committed to served by the last replica in {followed:.2f} s; "
        f"{load.requests} requests through haproxy, {len(load.failures)} failed "
        f"({load.unanswered} closed unanswered and retried once)"
    )
    assert load.requests > 20
    assert load.failures == []
