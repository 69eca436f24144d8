"""Socket activation: every registry generation serves on the agent's one listening socket.

The machine has only registry 2.8.2, which has no activation; tests/support/standin_registry.py
stands in for 3.x (serves on the inherited fd 3 when LISTEN_FDS/LISTEN_PID say so, drains on
SIGTERM). Set ACME_REGISTRY_TEST_ACTIVATION_BINARY to run these against a real 3.x binary.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.support.agent import start_agent
from tests.support.clients import Skopeo, wait_for_tls
from tests.support.load import LoadClient, image_digests
from tests.support.oci import make_oci_image
from tests.support.ports import free_port

NAME = "registry.test"
ROTATIONS = 10
STANDIN = Path(__file__).resolve().parents[1] / "support" / "standin_registry.py"


@pytest.fixture(scope="session")
def activation_binary() -> Path:
    """A registry binary with socket activation: the stand-in unless told otherwise."""
    path = Path(os.environ.get("ACME_REGISTRY_TEST_ACTIVATION_BINARY", STANDIN))
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not an executable file")
    return path


def connect_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_rotations_on_the_shared_socket_refuse_nothing(tmp_path, pebble_factory, activation_binary):
    pebble = pebble_factory(free_port(), nonce_reject=0)
    # No auth: a bcrypt check per request (cost 10: ~30/s on a 3.x) would thin the load.
    agent = start_agent(tmp_path, pebble, activation_binary, auth=False)
    root = pebble.root_pem()
    manifest = None
    windows: list[tuple[float, float]] = []
    try:
        serials = {wait_for_tls("127.0.0.1", agent.registry_port, NAME, root, 30).serial_number}
        if activation_binary != STANDIN:  # a real registry: give the load an image to get
            layout = tmp_path / "image"
            make_oci_image(layout, tag="v1", size=64 * 1024)
            manifest, _ = image_digests(layout, "v1")
            Skopeo(tmp_path / "skopeo", root, [NAME]).push(
                layout, "v1", f"{NAME}:{agent.registry_port}/load:v1"
            )
        # New connection per request, several loops, no pause, and no retry: a single
        # refused or unanswered connect fails the test.
        load = LoadClient(
            NAME,
            agent.registry_port,
            root,
            "load",
            "v1",
            manifest_digest=manifest,
            connect_workers=4,
            keepalive_workers=0,
            pause=0,
            retry=False,
            max_duration=600,
        ).start()
        for _ in range(ROTATIONS):
            began = load.elapsed()
            result = agent.cli("renew", timeout=120)
            assert result.returncode == 0, result.stderr
            cert = wait_for_tls(
                "127.0.0.1",
                agent.registry_port,
                NAME,
                root,
                timeout=10,
                accept=lambda c: c.serial_number not in serials,
            )
            serials.add(cert.serial_number)
            windows.append((began, load.elapsed()))
        time.sleep(0.5)  # the last old generation drains under load too
        report = load.stop()
    finally:
        agent.stop()
    log = agent.log()
    print(f"\n{ROTATIONS} rotations on one shared socket: {report.summary()}")
    assert "share the agent's listening socket" in log
    assert log.count("on the shared socket: new process serving") == ROTATIONS
    if activation_binary == STANDIN:
        # Every generation (the first and one per rotation) got the agent's socket.
        assert log.count("serving on the inherited socket") == ROTATIONS + 1, log[-4000:]
    # The load ran through every rotation (an order and a handover: seconds each).
    for began, ended in windows:
        assert any(began <= sample.at <= ended for sample in report.samples), (began, ended)
    assert report.refused_connects == 0, report.failures[:5]
    if activation_binary == STANDIN:
        # It answers every connection it accepted, as a drain should.
        assert report.failed == 0, report.failures[:5]
    else:
        # Go's server drops a request it reads after Shutdown began (~1 a rotation): those
        # connections were accepted, never refused; only they may fail.
        assert report.failed == report.unanswered, report.failures[:5]
    assert len(serials) == ROTATIONS + 1


@pytest.mark.parametrize("which", ["activation", "fifo"])
def test_nothing_listens_before_the_first_generation(
    tmp_path, pebble_factory, activation_binary, registry_2x_binary, which
):
    """While the first order fails (the CA's port is closed), the registry's port is bound
    by the agent (nobody else can take it) but refuses connections: no listener accepts
    and hangs them, and a load balancer's TCP check sees the replica down."""
    pebble = pebble_factory(free_port())
    binary = activation_binary if which == "activation" else registry_2x_binary
    unreachable = f"https://127.0.0.1:{free_port()}/dir"
    agent = start_agent(tmp_path, pebble, binary, ACME_DIRECTORY=unreachable)
    try:
        deadline = time.monotonic() + 60
        while "could not obtain a certificate" not in agent.log():
            assert agent.proc is not None and agent.proc.poll() is None, agent.log()
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        for _ in range(5):
            assert agent.cli("health").returncode == 0
            assert connect_refused(agent.registry_port), "something accepts on the port"
            time.sleep(0.2)
        with socket.socket() as other, pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", agent.registry_port))
        assert taken.value.errno == 98  # EADDRINUSE: the agent holds the address
    finally:
        agent.stop()
    expected = "share the agent's listening socket" if which == "activation" else "config FIFO"
    assert expected in agent.log()


def test_activation_on_with_a_2x_binary_is_one_clear_line(
    tmp_path, pebble_factory, registry_2x_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_2x_binary, REGISTRY_SOCKET_ACTIVATION="on")
    assert agent.proc is not None
    assert agent.proc.wait(timeout=30) == 2
    lines = [line for line in agent.log().splitlines() if line.startswith("acme-registry:")]
    assert lines == [
        "acme-registry: configuration error: REGISTRY_SOCKET_ACTIVATION: on, but the registry "
        "binary is github.com/docker/distribution 2.8.2+ds1: only 3.x serves on an inherited "
        "socket (use auto or off)"
    ]
    assert not (agent.data_dir / "registry").exists()
    assert pebble.orders_created() == 0
