"""Fault tests with real processes and real signals."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support.agent import CREDS, NAME, fingerprint, served, start_agent
from tests.support.clients import Skopeo, wait_for_tls
from tests.support.ports import free_port

KILL_ROUNDS = 150

# Saves the pairs found in DATA_DIR's generations over and over, as the issuing child
# does after an order: CertStore.save is the code under test.
WRITER = """
import sys
from pathlib import Path
from acme_registry.certstore import CertStore, parse_pair
store = CertStore(Path(sys.argv[1]))
pairs = [parse_pair(Path(p, "domain.crt").read_bytes(), Path(p, "domain.key").read_bytes())
         for p in sys.argv[2:]]
print("ready", flush=True)
while True:
    for pair in pairs:
        store.save(pair)
"""


def test_kill_9_during_certificate_writes_always_leaves_a_matching_pair(
    tmp_path, pebble_factory, registry_binary
):
    from acme_registry.certstore import CertStore, parse_pair

    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        served(agent, pebble)
        assert agent.cli("renew", timeout=120).returncode == 0
    finally:
        agent.stop()
    # Copies: saving prunes old generations, these included.
    generations = []
    for index, generation in enumerate(sorted((agent.cert_dir / ".generations").iterdir())[-2:]):
        copy = tmp_path / "pairs" / str(index)
        shutil.copytree(generation, copy)
        generations.append(copy)
    orders = pebble.orders_created()
    rng = random.Random(1)
    for _ in range(KILL_ROUNDS):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(agent.cert_dir), *map(str, generations)],
            stdout=subprocess.PIPE,
        )
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.05))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        store = CertStore(agent.cert_dir)
        pair = store.load()  # raises when the two files do not match
        assert pair is not None
        assert parse_pair(store.tls_file.read_bytes(), store.tls_file.read_bytes())
    agent.start()
    try:
        leaf = served(agent, pebble)
        agent.wait_ready()
        assert fingerprint(leaf) == CertStore(agent.cert_dir).load().fingerprint
    finally:
        agent.stop()
    assert pebble.orders_created() == orders


def registry_pid(agent) -> int:
    configs = str(agent.data_dir / "registry" / "registry-").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                if b"serve" in cmdline and any(arg.startswith(configs) for arg in cmdline):
                    return int(entry.name)
    raise AssertionError("no registry process")


def test_kill_9_of_the_registry_is_restarted_and_pushes_resume(
    tmp_path, pebble_factory, registry_binary, oci_image
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        leaf = served(agent, pebble)
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        skopeo.push(oci_image, "v1", f"{NAME}:{agent.registry_port}/demo:v1")
        os.kill(registry_pid(agent), signal.SIGKILL)
        killed = time.monotonic()
        again = wait_for_tls("127.0.0.1", agent.registry_port, NAME, pebble.root_pem(), 10)
        back = time.monotonic() - killed
        print(f"registry back {back:.2f} s after kill -9")
        assert back < 10
        assert fingerprint(again) == fingerprint(leaf)
        skopeo.push(oci_image, "v1", f"{NAME}:{agent.registry_port}/demo:v2")
        assert skopeo.list_tags(f"{NAME}:{agent.registry_port}/demo") == ["v1", "v2"]
    finally:
        agent.stop()


def metric(agent, name: str, label: str = "") -> float:
    text = requests.get(f"{agent.admin_url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_an_unreachable_ca_keeps_the_old_certificate_serving(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        leaf = served(agent, pebble)
        root = pebble.root_pem()
        pebble.stop()
        result = agent.cli("renew", timeout=120)
        assert result.returncode == 1
        assert "renewal failed" in result.stderr
        again = wait_for_tls("127.0.0.1", agent.registry_port, NAME, root, 10)
        assert fingerprint(again) == fingerprint(leaf)
        assert requests.get(f"{agent.admin_url}/readyz", timeout=5).status_code == 200
        assert agent.cli("health", "--ready").returncode == 0
        assert metric(agent, "acme_registry_renewal_failures_total", 'reason="network"') >= 1
        status = json.loads(agent.cli("status", "--json").stdout)
        assert status["backoff"]["failures"] == 1
    finally:
        agent.stop()


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def test_read_only_cert_dir_during_renewal(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary)
    try:
        leaf = served(agent, pebble)
        before = {p.name: p.read_bytes() for p in (agent.cert_dir / "live").iterdir()}
        # Tests run as root, so only a read-only mount stops writes.
        mount("--bind", str(agent.cert_dir), str(agent.cert_dir))
        try:
            mount("-o", "remount,bind,ro", str(agent.cert_dir))
            result = agent.cli("renew", timeout=120)
            assert result.returncode == 1
            assert "Read-only file system" in result.stderr
            assert str(agent.cert_dir) in result.stderr
            after = {p.name: p.read_bytes() for p in (agent.cert_dir / "live").iterdir()}
            assert after == before
            assert fingerprint(served(agent, pebble)) == fingerprint(leaf)
        finally:
            subprocess.run(["umount", str(agent.cert_dir)], check=True)
    finally:
        agent.stop()


def test_full_cert_dir_during_renewal(tmp_path, pebble_factory, registry_binary):
    pebble = pebble_factory(free_port())
    cert_dir = tmp_path / "small-certs"
    cert_dir.mkdir()
    mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(cert_dir))
    try:
        agent = start_agent(tmp_path, pebble, registry_binary, CERT_DIR=str(cert_dir))
        try:
            leaf = served(agent, pebble)
            before = (cert_dir / "domain.crt").read_bytes(), (cert_dir / "domain.key").read_bytes()
            with contextlib.suppress(OSError), (cert_dir / "filler").open("wb") as filler:
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
            result = agent.cli("renew", timeout=120)
            assert result.returncode == 1
            assert "No space left on device" in result.stderr
            after = (cert_dir / "domain.crt").read_bytes(), (cert_dir / "domain.key").read_bytes()
            assert after == before
            assert not list((cert_dir / ".generations").glob(".*partial"))
            assert fingerprint(served(agent, pebble)) == fingerprint(leaf)
        finally:
            agent.stop()
    finally:
        subprocess.run(["umount", str(cert_dir)], check=True)


class DirectoryFront:
    """An HTTPS front for Pebble's directory that can be told to answer 500.

    Clients fetch the directory here, then follow its URLs to Pebble itself: a failing
    front is a CA whose first request answers 500.
    """

    def __init__(self, pebble, workdir: Path) -> None:
        import http.server
        import ssl
        import threading

        front = self
        self.failing = False
        self.upstream = pebble.directory_url
        self.upstream_ca = str(pebble.ca_bundle)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if front.failing:
                    body = b'{"type": "urn:ietf:params:acme:error:serverInternal", "status": 500}'
                    self.send_response(500)
                    self.send_header("Content-Type", "application/problem+json")
                else:
                    upstream = requests.get(front.upstream, verify=front.upstream_ca, timeout=5)
                    body = upstream.content
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        # Pebble's listener certificate is for 127.0.0.1 too: reuse it, so one bundle
        # (Pebble's CA) is trusted for both.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls = Path(pebble.ca_bundle).parent
        context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/dir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def test_a_ca_answering_500_keeps_the_old_certificate_serving(
    tmp_path, pebble_factory, registry_binary
):
    pebble = pebble_factory(free_port())
    front = DirectoryFront(pebble, tmp_path)
    agent = start_agent(tmp_path, pebble, registry_binary, ACME_DIRECTORY=front.url)
    try:
        leaf = served(agent, pebble)
        front.failing = True
        result = agent.cli("renew", timeout=120)
        assert result.returncode == 1
        assert "500" in result.stderr or "serverInternal" in result.stderr, result.stderr
        again = wait_for_tls("127.0.0.1", agent.registry_port, NAME, pebble.root_pem(), 10)
        assert fingerprint(again) == fingerprint(leaf)
        assert requests.get(f"{agent.admin_url}/readyz", timeout=5).status_code == 200
        assert metric(agent, "acme_registry_renewal_failures_total", 'reason="ca_error"') >= 1
    finally:
        agent.stop()
        front.stop()
