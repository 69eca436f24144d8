"""Time from `acme-registry run` to the first verified TLS handshake, against Pebble.

Each round starts from empty CERT_DIR and DATA_DIR and a fresh Pebble (validation sleep
off, default 5 % nonce rejection), so every round is a full cold start: account, order,
HTTP-01, finalize, registry start. Run: .venv/bin/python -m bench.cold_start [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.support.agent import AgentProcess
from tests.support.clients import wait_for_tls
from tests.support.pebble import Pebble
from tests.support.ports import free_port

NAME = "registry.test"
REGISTRY_BINARY = Path("/usr/bin/docker-registry")


def one_round(workdir: Path) -> tuple[float, float]:
    """(seconds to the first verified handshake, seconds to a stored-certificate restart)."""
    pebble = Pebble(workdir / "pebble", free_port()).start()
    try:
        env = AgentProcess.environment(
            workdir / "agent",
            domains=NAME,
            directory=pebble.directory_url,
            ca_bundle=pebble.ca_bundle,
            http_port=pebble.http_port,
            registry_binary=REGISTRY_BINARY,
        )
        agent = AgentProcess(workdir / "agent", env)
        root = pebble.root_pem()
        started = time.monotonic()
        agent.start()
        try:
            wait_for_tls("127.0.0.1", agent.registry_port, NAME, root, timeout=30)
            cold = time.monotonic() - started
        finally:
            agent.stop()
        started = time.monotonic()
        agent.start()
        try:
            wait_for_tls("127.0.0.1", agent.registry_port, NAME, root, timeout=30)
            warm = time.monotonic() - started
        finally:
            agent.stop()
        return cold, warm
    finally:
        pebble.stop()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    colds, warms = [], []
    for index in range(rounds):
        with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
            cold, warm = one_round(Path(tmp))
        colds.append(cold)
        warms.append(warm)
        print(f"round {index + 1}: cold start {cold:.3f} s, restart with stored cert {warm:.3f} s")
    print(
        f"median of {rounds}: cold start {statistics.median(colds):.3f} s "
        f"(min {min(colds):.3f}, max {max(colds):.3f}); "
        f"restart with stored cert {statistics.median(warms):.3f} s"
    )


if __name__ == "__main__":
    main()
