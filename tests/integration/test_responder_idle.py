"""Port 80 cannot be starved: 10,000 idle half-request connections, real sockets on loopback.

The held connections come from a child process (tests/support/holders.py) with a file table of
its own; the responder runs in this process, which gets the open files it needs for its side.
Assertions are about answers arriving and connections closing, with generous timeouts; how
fast they arrive is a figure of ``python -m bench.port80``, not a test.
"""

from __future__ import annotations

import http.client
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acme_registry.challenges import PendingChallenges
from acme_registry.responder import ChallengeResponder
from acme_registry.storage import FileStorage
from tests.support.agent import AgentProcess
from tests.support.clients import wait_for_tls
from tests.support.holders import IdleClients, raise_own_file_limit
from tests.support.ports import free_port

HELD = 10_000
HALF_REQUEST = b"GET /.well-known/acme-chall"
DOMAINS = ("registry.test",)
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
ANSWER_TIMEOUT = 10.0


@pytest.fixture
def open_files() -> Iterator[None]:
    """This process holds the server side of every connection: it needs that many files."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_own_file_limit(HELD + 1024)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.fixture
def make_responder(open_files: None) -> Iterator[Callable[..., ChallengeResponder]]:
    started: list[ChallengeResponder] = []

    def make(**kwargs: float) -> ChallengeResponder:
        responder = ChallengeResponder(
            DOMAINS,
            lambda token: KEY_AUTHORIZATION if token == TOKEN else None,
            0,
            "127.0.0.1",
            **kwargs,
        )
        responder.start()
        started.append(responder)
        return responder

    yield make
    for responder in started:
        responder.stop()


def get(port: int, path: str, host: str = "registry.test") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def assert_port_80_answers(port: int) -> None:
    status, _, body = get(port, f"/.well-known/acme-challenge/{TOKEN}")
    assert (status, body) == (200, KEY_AUTHORIZATION.encode())
    status, headers, _ = get(port, "/v2/?x=1", host="evil.example")
    assert (status, headers["Location"]) == (301, "https://registry.test/v2/?x=1")


def test_ten_thousand_idle_connections_do_not_starve_the_responder(make_responder):
    responder = make_responder(read_timeout=300.0)
    with IdleClients("127.0.0.1", responder.port, HELD, HALF_REQUEST) as clients:
        started = clients.started
        assert started is not None
        assert (started.connected, started.failed) == (HELD, 0)
        for _ in range(3):
            assert_port_80_answers(responder.port)
        # They were all still held while those answers came: none was closed to make room.
        status = clients.status()
        assert (status.open, status.closed) == (HELD, 0), status.first_lines


def test_idle_connections_are_answered_408_and_closed_at_the_deadline(make_responder):
    read_timeout = 3.0
    responder = make_responder(read_timeout=read_timeout)
    with IdleClients("127.0.0.1", responder.port, HELD, HALF_REQUEST) as clients:
        status = clients.wait_closed(timeout=read_timeout + 60)
    assert (status.connected, status.open, status.closed) == (HELD, 0, HELD)
    # They sent part of a request line, so each is told why before it is closed.
    assert status.first_lines == {"HTTP/1.1 408 Request Timeout": HELD}
    # Never before the deadline (a busy machine only makes the close later).
    assert min(status.lifetimes) >= read_timeout - 0.25


def test_the_running_agent_holds_ten_thousand_idle_connections_and_renews(
    tmp_path: Path, pebble_factory, registry_binary, open_files
):
    pebble = pebble_factory(free_port())
    env = AgentProcess.environment(
        tmp_path / "agent",
        domains="registry.test",
        directory=pebble.directory_url,
        ca_bundle=pebble.ca_bundle,
        http_port=pebble.http_port,
        registry_binary=registry_binary,
    )
    agent = AgentProcess(tmp_path / "agent", env)
    # Start it with the soft limit a container often has: `run` must raise it itself.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        agent.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        agent.wait_ready(timeout=60)
        assert agent.proc is not None
        assert open_file_soft_limit(agent.proc.pid) == hard
        first = wait_for_tls(
            "127.0.0.1", agent.registry_port, "registry.test", pebble.root_pem(), 30
        )
        PendingChallenges(FileStorage(agent.data_dir)).add(TOKEN, KEY_AUTHORIZATION)
        with IdleClients("127.0.0.1", pebble.http_port, HELD, HALF_REQUEST) as clients:
            assert clients.started is not None and clients.started.connected == HELD
            assert_port_80_answers(pebble.http_port)
            assert clients.status().open == HELD
            # A real validation through the held port: Pebble's HTTP-01 request must get in.
            renewal = agent.cli("renew", timeout=60)
            assert renewal.returncode == 0, renewal.stdout + renewal.stderr + agent.log()[-3000:]
        renewed = wait_for_tls(
            "127.0.0.1",
            agent.registry_port,
            "registry.test",
            pebble.root_pem(),
            30,
            accept=lambda cert: cert.serial_number != first.serial_number,
        )
        assert renewed.serial_number != first.serial_number
    finally:
        agent.stop()


def open_file_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")
