"""End-to-end check of tests/support alone (no acme_registry): Pebble issues a certificate
through the `acme` library, a real registry serves it, skopeo pushes and pulls through it."""

from __future__ import annotations

import datetime
import http.server
import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import josepy as jose
import pytest
from acme import challenges, client, crypto_util, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from tests.support.clients import Skopeo, wait_for_tls
from tests.support.oci import layout_manifest_digest, read_payload
from tests.support.pebble import Pebble, PebbleFactory
from tests.support.ports import free_port

DOMAIN = "support.test"
ISSUANCE_ATTEMPTS = 3


class _ChallengeHandler(http.server.BaseHTTPRequestHandler):
    tokens: dict[str, str]

    def do_GET(self) -> None:
        prefix = "/.well-known/acme-challenge/"
        answer = self.tokens.get(self.path.removeprefix(prefix))
        if not self.path.startswith(prefix) or answer is None:
            self.send_error(404)
            return
        body = answer.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output to failures


@pytest.fixture
def http01_server() -> Iterator[tuple[int, dict[str, str]]]:
    """An HTTP-01 responder on 127.0.0.1: (port, token -> key authorization)."""
    tokens: dict[str, str] = {}
    handler = type("Handler", (_ChallengeHandler,), {"tokens": tokens})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], tokens
    server.shutdown()
    server.server_close()
    thread.join()


def _issue_once(pebble: Pebble, tokens: dict[str, str], orders: list[str]) -> tuple[str, bytes]:
    account_key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(
        account_key,
        alg=jose.ES256,
        verify_ssl=str(pebble.ca_bundle),
        user_agent="acme-registry-tests",
    )
    acme = client.ClientV2(client.ClientV2.get_directory(pebble.directory_url, net), net)
    net.account = acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))

    cert_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = cert_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    order = acme.new_order(crypto_util.make_csr(key_pem, [DOMAIN]))
    orders.append(order.uri)
    for authz in order.authorizations:
        if authz.body.status == messages.STATUS_VALID:
            continue  # Pebble reuses valid authorizations at random
        challb = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
        response, validation = challb.response_and_validation(account_key)
        tokens[challb.chall.encode("token")] = validation
        acme.answer_challenge(challb, response)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=30)
    order = acme.poll_and_finalize(order, deadline=deadline)
    return order.fullchain_pem, key_pem


def _issue(pebble: Pebble, tokens: dict[str, str], orders: list[str]) -> tuple[str, bytes]:
    # Pebble rejects 5 % of good nonces by default and the library retries badNonce only
    # once, so a whole flow fails now and then; a real client retries, so does this test.
    for attempt in range(1, ISSUANCE_ATTEMPTS + 1):
        try:
            return _issue_once(pebble, tokens, orders)
        except messages.Error as exc:
            if exc.code != "badNonce" or attempt == ISSUANCE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def test_pebble_issues_certificate_that_a_registry_serves_to_skopeo(
    pebble_factory: PebbleFactory,
    http01_server: tuple[int, dict[str, str]],
    registry_binary: Path,
    oci_image: Path,
    tmp_path: Path,
) -> None:
    http_port, tokens = http01_server
    pebble = pebble_factory(http_port)

    orders: list[str] = []
    fullchain_pem, key_pem = _issue(pebble, tokens, orders)
    # Each attempt that got past new-order created exactly one order; a new-order rejected
    # with badNonce (retried by the library) is a request but not an order.
    assert pebble.orders_created() == len(orders) >= 1
    assert pebble.order_count() >= pebble.orders_created()

    root_pem = pebble.root_pem()
    root = x509.load_pem_x509_certificate(root_pem)
    leaf, *intermediates = x509.load_pem_x509_certificates(fullchain_pem.encode())
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(DOMAIN))
    verifier.verify(leaf, intermediates)

    reg_dir = tmp_path / "registry"
    reg_dir.mkdir()
    tls_pem = reg_dir / "tls.pem"
    # Go's X509KeyPair takes the CERTIFICATE blocks and the key block from one file.
    tls_pem.write_bytes(fullchain_pem.encode() + key_pem)
    tls_pem.chmod(0o600)
    reg_port = free_port()
    config = reg_dir / "config.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "info"},
                "storage": {"filesystem": {"rootdirectory": str(reg_dir / "data")}},
                "http": {
                    "addr": f"127.0.0.1:{reg_port}",
                    "tls": {"certificate": str(tls_pem), "key": str(tls_pem)},
                },
            }
        )
    )
    reg_log = reg_dir / "registry.log"
    with reg_log.open("wb") as log:
        registry = subprocess.Popen(
            [str(registry_binary), "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
        )
    try:
        served = wait_for_tls("127.0.0.1", reg_port, DOMAIN, root_pem, timeout=10)
        assert served.serial_number == leaf.serial_number

        ref = f"{DOMAIN}:{reg_port}/demo:v1"
        # Verification is really on: trusting another CA (Pebble's listener CA) must fail.
        untrusting = Skopeo(tmp_path / "skopeo-wrong-ca", pebble.ca_bundle.read_bytes(), [DOMAIN])
        with pytest.raises(AssertionError, match=r"x509|certificate"):
            untrusting.push(oci_image, "v1", ref)

        skopeo = Skopeo(tmp_path / "skopeo", root_pem, [DOMAIN])
        skopeo.push(oci_image, "v1", ref)
        pulled = tmp_path / "pulled"
        skopeo.pull(ref, pulled, "v1")
        assert skopeo.manifest_digest(ref) == layout_manifest_digest(oci_image, "v1")
        assert layout_manifest_digest(pulled, "v1") == layout_manifest_digest(oci_image, "v1")
        assert read_payload(pulled, "v1") == read_payload(oci_image, "v1")
        assert skopeo.list_tags(f"{DOMAIN}:{reg_port}/demo") == ["v1"]
    except BaseException:
        print(reg_log.read_text(errors="replace")[-4000:])
        raise
    finally:
        registry.send_signal(signal.SIGTERM)
        try:
            registry.wait(timeout=5)
        except subprocess.TimeoutExpired:
            registry.kill()
            registry.wait()
