"""Token mode as the agent runs it: the policy file re-read, the keyring's rollover steps."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from acme_registry.admin import Metrics
from acme_registry.config import ListenAddress
from acme_registry.names import is_user_name
from acme_registry.policy import EVERYTHING, Grants
from acme_registry.tokenconfig import TokenSettings
from acme_registry.tokenmode import INTERNAL_SUBJECT, INTERNAL_TOKEN_TTL, PolicyFile, TokenMode
from acme_registry.tokens import NEXT_KEY_LEAD, Keyring, b64url_decode
from tests.support.users import user_store

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def settings(policy_file: Path | None = None) -> TokenSettings:
    return TokenSettings(
        addr=ListenAddress("127.0.0.1", 5001),
        realm="https://registry.test:5001/token",
        service="registry.test",
        issuer="acme-registry@registry.test",
        ttl=300,
        proxy_protocol=False,
        policy_file=policy_file,
        anonymous_pull=("public/*",),
    )


def touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_policy_file_is_read_again_and_a_broken_one_keeps_the_last(tmp_path):
    path = tmp_path / "policy.yml"
    path.write_text("users:\n  ci:\n    push: ['team/*']\n")
    policy = PolicyFile(path)
    assert policy.policy().users["ci"] == Grants(push=("team/*",))
    path.write_text("users:\n  ci:\n    pull: ['team/*']\n")
    touch_later(path)
    assert policy.policy().users["ci"] == Grants(pull=("team/*",))
    # Broken: an empty policy would give ci everything, so the last valid one stays.
    path.write_text("users:\n  ci:\n    pull: ['Team/*']\n")
    touch_later(path)
    assert policy.policy().users["ci"] == Grants(pull=("team/*",))


def make_mode(tmp_path: Path, policy_file: Path | None = None) -> TokenMode:
    data = tmp_path / "data"
    users = user_store(data, cost=4)
    users.add("ci", "ci-password")
    return TokenMode(settings(policy_file), data, users, Metrics(), NOW)


def test_grants_from_file_run_time_and_anonymous(tmp_path):
    path = tmp_path / "policy.yml"
    path.write_text("users:\n  ci:\n    push: ['team/*']\n")
    mode = make_mode(tmp_path, path)
    assert mode.grants("ci") == Grants(push=("team/*",))
    assert mode.grants("someone") == EVERYTHING  # no grant anywhere: htpasswd's behaviour
    assert mode.grants(None) == Grants(pull=("public/*",))
    mode.users.set_grants("ci", {"pull": ["*"], "push": [], "delete": [], "catalog": True})
    assert mode.grants("ci") == Grants(pull=("*",), push=("team/*",), catalog=True)
    assert mode.describe_grants("ci") == "pull *; push team/*; catalog"


def test_keyring_rollover_waits_for_a_registry_that_trusts_the_new_key(tmp_path):
    mode = make_mode(tmp_path)
    config = mode.registry_config(NOW)
    bundle = Path(config["auth"]["token"]["rootcertbundle"])
    assert bundle.read_bytes() == mode.keyring.bundle_pem(NOW)
    rotations: list[bytes] = []

    def rotate() -> bool:
        rotations.append(bundle.read_bytes())
        return True

    # Before any registry runs, nothing to rotate; the first generation marks the bundle.
    mode.maintain(NOW, lambda: False)
    mode._generation_started()
    mode.maintain(NOW, rotate)
    assert rotations == []

    first = mode.keyring.current
    soon = first.not_after - NEXT_KEY_LEAD + dt.timedelta(hours=1)
    mode.maintain(soon, rotate)
    # A next key exists, in the bundle a new generation was started with; the old one signs.
    assert mode.keyring.next is not None and mode.keyring.current == first
    assert len(rotations) == 1 and mode.keyring.next.cert_pem in rotations[0]
    mode.maintain(soon, rotate)
    # Only now the new key signs; the old certificate stays trusted.
    assert mode.keyring.current != first
    assert first.cert_pem in bundle.read_bytes()
    stored = Keyring.from_bytes((tmp_path / "data" / "token" / "keyring.json").read_bytes())
    assert stored.current.cert == mode.keyring.current.cert


def test_retentions_internal_token_grants_one_repository_pull_and_delete_only(tmp_path):
    mode = make_mode(tmp_path)
    token = mode.internal_token("team/app", NOW)
    header, body, signature = (b64url_decode(part) for part in token.split("."))
    claims = json.loads(body)
    assert claims["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "delete"]}
    ]
    assert (claims["iss"], claims["aud"]) == ("acme-registry@registry.test", "registry.test")
    assert claims["exp"] - claims["iat"] == INTERNAL_TOKEN_TTL.total_seconds() == 60
    # No login can be this subject: it is not a user name.
    assert claims["sub"] == INTERNAL_SUBJECT and not is_user_name(claims["sub"])
    assert json.loads(header)["x5c"]  # the key reference the service uses (x5c here)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    mode.keyring.current.key.public_key().verify(
        encode_dss_signature(r, s),
        token.rpartition(".")[0].encode(),
        ec.ECDSA(hashes.SHA256()),
    )
    assert mode.internal_token("team/app", NOW) != token  # a new token (jti) each call
