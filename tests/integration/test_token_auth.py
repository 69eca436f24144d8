"""Token mode end to end: the real registry binary checks tokens from our token service.

skopeo logs in through the registry's Bearer challenge (GET /token with basic credentials,
or none), pushes and pulls; forged, expired and foreign tokens are sent to the registry
directly; throttling and the PROXY protocol are driven with raw HTTPS clients.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from acme_registry import proxyproto
from acme_registry.policy import make_grants
from acme_registry.tokens import KeyReference, Keyring, SigningKey, access_claims, b64url
from acme_registry.tokenservice import PasswordChecker
from tests.support.load import image_digests
from tests.support.oci import MANIFEST_MEDIA_TYPE
from tests.support.podman_client import PodmanClient
from tests.support.tls import TestCA
from tests.support.tokenauth import ISSUER, NAME, TokenStack

POLICY = """\
users:
  ci:
    push: ["team/*", "public/*"]
    delete: ["team/tmp/*"]
  node:
    pull: ["team/*"]
"""
USERS = {"ci": "ci-Pa55word", "node": "node-Pa55word", "admin": "admin-Pa55word"}


@pytest.fixture
def stack(tmp_path: Path, registry_binary: Path) -> Iterator[TokenStack]:
    with TokenStack(
        tmp_path / "stack",
        registry_binary,
        users=USERS,
        policy_text=POLICY,
        anonymous_pull=("public/*",),
    ) as running:
        yield running


def creds(user: str) -> str:
    return f"{user}:{USERS[user]}"


def test_push_pull_and_denied_push(stack: TokenStack, oci_image: Path, tmp_path: Path) -> None:
    ci = stack.skopeo(tmp_path / "ci", creds("ci"))
    ci.push(oci_image, "v1", stack.ref("team/app"))
    ci.pull(stack.ref("team/app"), tmp_path / "ci-pulled", "v1")

    node = stack.skopeo(tmp_path / "node", creds("node"))
    node.pull(stack.ref("team/app"), tmp_path / "node-pulled", "v1")
    digest, _ = image_digests(oci_image)
    assert node.manifest_digest(stack.ref("team/app")) == digest
    with pytest.raises(AssertionError) as info:
        node.push(oci_image, "v1", stack.ref("team/other"))
    assert "denied" in str(info.value).lower()
    # Outside its pattern the pull-only user cannot even read.
    with pytest.raises(AssertionError):
        node.pull(stack.ref("public/app"), tmp_path / "node-public", "v1")
    # A user without grants anywhere may do everything (htpasswd's behaviour).
    stack.skopeo(tmp_path / "admin", creds("admin")).push(oci_image, "v1", stack.ref("misc/x"))
    assert stack.counters.issued > 0


def test_podman_login_push_pull_and_denied_push(
    stack: TokenStack, oci_image: Path, tmp_path: Path
) -> None:
    """podman, a client of its own (containers/image, stored logins): `podman login` at the
    token service, push and pull, a pull-only user denied a push, anonymous pull."""
    registry = f"{NAME}:{stack.registry_port}"
    with PodmanClient(tmp_path / "podman", stack.ca.pem, [NAME]) as client:
        wrong = client.login(registry, "ci", "not-the-password", check=False)
        assert wrong.returncode != 0
        login = client.login(registry, "ci", USERS["ci"])
        assert "Login Succeeded" in login.stdout, login.stdout + login.stderr
        team, public = f"{registry}/team/app:v1", f"{registry}/public/app:v1"
        client.load_oci(oci_image, "v1", team)
        client.run("tag", team, public)
        client.push(team)
        client.push(public)

        client.login(registry, "node", USERS["node"])
        client.remove(team)
        client.pull(team)
        denied = client.push(team, check=False)
        assert denied.returncode != 0 and "denied" in denied.stderr.lower(), denied.stderr

        client.logout(registry)
        client.remove(public)
        client.pull(public)  # anonymous, on the public pattern
        assert client.pull(team, check=False).returncode != 0


def test_anonymous_pull_only_where_public(
    stack: TokenStack, oci_image: Path, tmp_path: Path
) -> None:
    ci = stack.skopeo(tmp_path / "ci", creds("ci"))
    ci.push(oci_image, "v1", stack.ref("public/app"))
    ci.push(oci_image, "v1", stack.ref("team/app"))
    anonymous = stack.skopeo(tmp_path / "anon")
    anonymous.pull(stack.ref("public/app"), tmp_path / "anon-pulled", "v1")
    with pytest.raises(AssertionError):
        anonymous.pull(stack.ref("team/app"), tmp_path / "anon-team", "v1")
    with pytest.raises(AssertionError):
        anonymous.push(oci_image, "v2", stack.ref("public/app"))


def test_grants_change_without_restart(stack: TokenStack, oci_image: Path, tmp_path: Path) -> None:
    node = stack.skopeo(tmp_path / "node", creds("node"))
    with pytest.raises(AssertionError):
        node.push(oci_image, "v1", stack.ref("nodes/app"))
    stack.runtime["node"] = make_grants(push=["nodes/*"])
    node.push(oci_image, "v1", stack.ref("nodes/app"))


def _manifest_digest(stack: TokenStack, repository: str) -> str:
    token = stack.token(f"repository:{repository}:pull", ("ci", USERS["ci"]))
    status, headers, _ = stack.registry_request(
        "GET", f"/v2/{repository}/manifests/v1", token, {"Accept": MANIFEST_MEDIA_TYPE}
    )
    assert status == 200
    return headers["Docker-Content-Digest"]


def test_delete_only_where_granted(stack: TokenStack, oci_image: Path, tmp_path: Path) -> None:
    ci = stack.skopeo(tmp_path / "ci", creds("ci"))
    for repository in ("team/tmp/a", "team/keep"):
        ci.push(oci_image, "v1", stack.ref(repository))
    ci_creds = ("ci", USERS["ci"])

    digest = _manifest_digest(stack, "team/keep")
    token = stack.token("repository:team/keep:delete", ci_creds)
    status, _, body = stack.registry_request("DELETE", f"/v2/team/keep/manifests/{digest}", token)
    assert status == 401, body

    digest = _manifest_digest(stack, "team/tmp/a")
    token = stack.token("repository:team/tmp/a:delete", ci_creds)
    status, _, body = stack.registry_request("DELETE", f"/v2/team/tmp/a/manifests/{digest}", token)
    assert status == 202, body
    status, _, _ = stack.registry_request(
        "GET", "/v2/team/tmp/a/manifests/v1", stack.token("repository:team/tmp/a:pull", ci_creds)
    )
    assert status == 404

    # skopeo's own delete (it asks for its scope itself): refused, then allowed.
    ci.push(oci_image, "v1", stack.ref("team/tmp/b", "v2"))
    ci.push(oci_image, "v1", stack.ref("team/keep", "v2"))
    with pytest.raises(AssertionError):
        ci.run("delete", "--tls-verify=true", "--cert-dir", str(ci.cert_dir), "--creds",
               creds("ci"), f"docker://{stack.ref('team/keep', 'v2')}")  # fmt: skip
    ci.run("delete", "--tls-verify=true", "--cert-dir", str(ci.cert_dir), "--creds",
           creds("ci"), f"docker://{stack.ref('team/tmp/b', 'v2')}")  # fmt: skip


def test_catalog_needs_the_grant(stack: TokenStack, oci_image: Path, tmp_path: Path) -> None:
    stack.skopeo(tmp_path / "ci", creds("ci")).push(oci_image, "v1", stack.ref("team/app"))
    admin_token = stack.token("registry:catalog:*", ("admin", USERS["admin"]))
    status, _, body = stack.registry_request("GET", "/v2/_catalog", admin_token)
    assert status == 200 and "team/app" in json.loads(body)["repositories"]
    ci_token = stack.token("registry:catalog:*", ("ci", USERS["ci"]))
    assert stack.registry_request("GET", "/v2/_catalog", ci_token)[0] == 401


def _claims(*, audience: str = NAME, now: dt.datetime | None = None) -> dict[str, Any]:
    return access_claims(
        issuer=ISSUER,
        subject="ci",
        audience=audience,
        access=[{"type": "repository", "name": "team/app", "actions": ["pull"]}],
        now=now or dt.datetime.now(dt.UTC),
        ttl=dt.timedelta(minutes=5),
    )


def _signed(
    key: SigningKey,
    reference: KeyReference,
    *,
    audience: str = NAME,
    now: dt.datetime | None = None,
) -> str:
    return key.sign(_claims(audience=audience, now=now), reference)


def _forged_kid(kid: str, key: SigningKey) -> str:
    """A token whose header names the key ``kid`` and that ``key`` signed."""
    header = json.dumps({"typ": "JWT", "alg": "ES256", "kid": kid}, separators=(",", ":"))
    body = json.dumps(_claims(), separators=(",", ":"))
    signing_input = f"{b64url(header.encode())}.{b64url(body.encode())}"
    der = key.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_registry_refuses_bad_tokens(stack: TokenStack, oci_image: Path, tmp_path: Path) -> None:
    stack.skopeo(tmp_path / "ci", creds("ci")).push(oci_image, "v1", stack.ref("team/app"))
    path = "/v2/team/app/manifests/v1"
    accept = {"Accept": MANIFEST_MEDIA_TYPE}
    ours = stack.keyring.current
    other_key = SigningKey.generate(dt.datetime.now(dt.UTC))
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)  # past the 60 s leeway
    # Both ways of naming the key, whichever this binary's tokens use.
    for reference in KeyReference:
        good = _signed(ours, reference)
        if reference is KeyReference.X5C or stack.key_reference is KeyReference.KID:
            assert stack.registry_request("GET", path, good, accept)[0] == 200
        for bad in (
            _signed(other_key, reference),
            _signed(ours, reference, now=long_ago),
            _signed(ours, reference, audience="other.test"),
            good[:-8] + ("AAAAAAAA" if not good.endswith("AAAAAAAA") else "BBBBBBBB"),
        ):
            assert stack.registry_request("GET", path, bad, accept)[0] == 401
    # Our key's kid on a token another key signed: the registry checks the signature.
    assert ours.kid is not None
    assert stack.registry_request("GET", path, _forged_kid(ours.kid, other_key), accept)[0] == 401


def test_issued_tokens_name_the_key_as_the_binary_checks_fastest(stack: TokenStack) -> None:
    """kid for 3.x (a map lookup per request), x5c for 2.8 (which keys kids otherwise)."""
    token = stack.token("repository:team/app:pull", ("ci", USERS["ci"]))
    header = json.loads(_b64(token.split(".")[0]))
    version = subprocess.run(
        [str(stack.binary), "--version"], capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
    ).stdout  # fmt: skip
    if "distribution/v3" in version:
        assert header["kid"] == stack.keyring.current.kid and "x5c" not in header
    else:
        assert "kid" not in header and len(header["x5c"]) == 1
    status, _, _ = stack.registry_request("GET", "/v2/team/app/tags/list", token)
    assert status in (200, 404)  # accepted (404: nothing pushed yet), never 401


def test_token_endpoint_answers(stack: TokenStack) -> None:
    ci = ("ci", USERS["ci"])
    status, headers, body = stack.token_request(
        "GET", f"service={NAME}&scope=repository:team/app:pull,push,delete&account=ci", creds=ci
    )
    assert status == 200
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    assert body["issued_at"].endswith("Z") and "refresh_token" not in body
    assert headers["Cache-Control"] == "no-store"
    claims = json.loads(_b64(body["token"].split(".")[1]))
    assert claims["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}
    ]
    assert claims["sub"] == "ci" and claims["aud"] == NAME and claims["iss"] == ISSUER

    assert stack.token_request("GET", f"service={NAME}", creds=("ci", "wrong"))[0] == 401
    assert stack.token_request("GET", f"service={NAME}", creds=("nobody", "x"))[0] == 401
    assert stack.token_request("GET", f"service={NAME}&account=node", creds=ci)[0] == 400
    assert stack.token_request("GET", f"service={NAME}&scope=repository:A:pull", creds=ci)[0] == 400
    assert stack.token_request("GET", "service=other.test", creds=ci)[0] == 400
    assert stack.counters.failures["invalid_credentials"] == 2
    assert stack.counters.failures["bad_request"] == 3


def test_oauth_password_and_refresh_grants(stack: TokenStack) -> None:
    form = (
        f"grant_type=password&username=ci&password={USERS['ci']}&service={NAME}"
        "&client_id=test&access_type=offline&scope=repository:team/a:pull%20repository:x:push"
    )
    status, _, body = stack.token_request("POST", form=form)
    assert status == 200, body
    assert body["scope"] == "repository:team/a:pull"
    refresh = body["refresh_token"]

    again = (
        f"grant_type=refresh_token&refresh_token={refresh}&service={NAME}"
        "&scope=repository:team/b:push"
    )
    status, _, body = stack.token_request("POST", form=again)
    assert status == 200 and body["scope"] == "repository:team/b:push"

    # A new password invalidates the refresh token; so does removing the user.
    stack.hashes["ci"] = stack.hashes["node"]
    assert stack.token_request("POST", form=again)[0] == 401
    del stack.hashes["ci"]
    assert stack.token_request("POST", form=again)[0] == 401
    assert stack.token_request("POST", form="grant_type=implicit")[0] == 400


def test_offline_token_on_get(stack: TokenStack) -> None:
    status, _, body = stack.token_request(
        "GET", f"service={NAME}&offline_token=true", creds=("ci", USERS["ci"])
    )
    assert status == 200 and body["refresh_token"]
    status, _, body = stack.token_request("GET", f"service={NAME}&offline_token=true")
    assert status == 200 and "refresh_token" not in body  # anonymous: nothing to refresh


def test_throttling_keys_on_user_and_address(stack: TokenStack) -> None:
    query = f"service={NAME}&scope=repository:team/app:pull"
    statuses = [stack.token_request("GET", query, creds=("ci", "wrong"))[0] for _ in range(20)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    status, headers, _ = stack.token_request("GET", query, creds=("ci", USERS["ci"]))
    assert status == 429 and int(headers["Retry-After"]) >= 1
    # Another user from the same address, and the same user from another address: at once.
    assert stack.token_request("GET", query, creds=("node", USERS["node"]))[0] == 200
    assert (
        stack.token_request("GET", query, creds=("ci", USERS["ci"]), source="127.0.0.2")[0] == 200
    )
    assert stack.counters.failures["throttled"] == 16


def test_password_workers_are_bounded(tmp_path: Path, registry_binary: Path) -> None:
    checker = PasswordChecker(workers=1, wait=0.01, dummy_cost=4)
    with TokenStack(tmp_path / "s", registry_binary, users={}, checker=checker) as stack:
        # Cost 13 takes hundreds of ms here: far past the 10 ms a login may wait for a worker.
        stack.hashes["slow"] = bcrypt.hashpw(b"pw", bcrypt.gensalt(13)).decode()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(stack.token_request, "GET", f"service={NAME}", creds=("slow", "pw"))
                for _ in range(6)
            ]
            statuses = sorted(f.result()[0] for f in futures)
    assert 200 in statuses and 429 in statuses, statuses
    assert stack.counters.failures["busy"] == statuses.count(429)


def test_proxy_protocol_sets_the_client(tmp_path: Path, registry_binary: Path) -> None:
    with TokenStack(tmp_path / "s", registry_binary, users=USERS, proxy_protocol=True) as stack:
        attacker = proxyproto.build(("203.0.113.9", 4000), ("127.0.0.1", stack.token_port))
        other = proxyproto.build(("198.51.100.4", 4000), ("127.0.0.1", stack.token_port))
        wrong = ("ci", "wrong")
        for _ in range(5):
            assert (
                stack.token_request("GET", f"service={NAME}", creds=wrong, prefix=attacker)[0]
                == 401
            )
        assert stack.token_request("GET", f"service={NAME}", creds=wrong, prefix=attacker)[0] == 429
        ok = ("ci", USERS["ci"])
        assert stack.token_request("GET", f"service={NAME}", creds=ok, prefix=other)[0] == 200
        # Without the header the connection is closed: no client chooses its own address.
        with pytest.raises((OSError, ConnectionError)):
            stack.token_request("GET", f"service={NAME}", creds=ok)


def test_certificate_replaced_for_new_connections(stack: TokenStack, tmp_path: Path) -> None:
    def serial() -> int:
        context = ssl.create_default_context(cadata=(stack.ca.pem + new_ca.pem).decode())
        with (
            socket.create_connection(("127.0.0.1", stack.token_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    new_ca = TestCA("renewed CA")
    before = serial()
    renewed = tmp_path / "renewed.pem"
    renewed.write_bytes(new_ca.issue([NAME]))
    stack.certificate.load(renewed)
    after = serial()
    assert after != before
    # Logins keep working over the new certificate (curl trusting only the new CA).
    result = subprocess.run(
        [
            "curl", "-sS", "--cacert", str(_write(tmp_path / "ca.pem", new_ca.pem)),
            "--resolve", f"{NAME}:{stack.token_port}:127.0.0.1", "-u", f"ci:{USERS['ci']}",
            f"https://{NAME}:{stack.token_port}/token?service={NAME}",
        ],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token"]


def test_rollover_bundle_accepts_both_keys(
    stack: TokenStack, oci_image: Path, tmp_path: Path
) -> None:
    """A registry started with the rollover bundle accepts tokens of the old and new key."""
    stack.skopeo(tmp_path / "ci", creds("ci")).push(oci_image, "v1", stack.ref("team/app"))
    now = dt.datetime.now(dt.UTC)
    lead = stack.keyring.current.not_after - dt.timedelta(days=30)
    # The next key is made now (a fake "now" would make it valid only from then on).
    rolled: Keyring = stack.keyring.advance(lead, generate=lambda _: SigningKey.generate(now))
    assert rolled.next is not None
    stack.keyring = rolled
    stack.restart_registry(rolled.bundle_pem(now))
    path = "/v2/team/app/manifests/v1"
    accept = {"Accept": MANIFEST_MEDIA_TYPE}
    reference = stack.key_reference
    assert stack.registry_request("GET", path, _signed(rolled.current, reference), accept)[0] == 200
    assert stack.registry_request("GET", path, _signed(rolled.next, reference), accept)[0] == 200
    # A key that is not in the bundle the registry started with is refused, kid or x5c.
    outsider = SigningKey.generate(now)
    assert stack.registry_request("GET", path, _signed(outsider, reference), accept)[0] == 401


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_no_secret_in_logs(stack: TokenStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="acme_registry")
    secret = "Sup3r-secret-guess"
    assert stack.token_request("GET", f"service={NAME}", creds=("ci", secret))[0] == 401
    status, _, body = stack.token_request(
        "GET", f"service={NAME}&offline_token=true", creds=("ci", USERS["ci"])
    )
    assert status == 200
    refresh = body["refresh_token"]
    stack.hashes["ci"] = stack.hashes["node"]  # the password changes: the refresh token dies
    form = f"grant_type=refresh_token&refresh_token={refresh}&service={NAME}"
    assert stack.token_request("POST", form=form)[0] == 401
    text = caplog.text
    assert "login failed for 'ci'" in text  # the failures are logged...
    for value in (secret, USERS["ci"], refresh, body["token"]):  # ...without their secrets
        assert value not in text
