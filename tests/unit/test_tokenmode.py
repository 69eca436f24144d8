"""Token mode as the agent runs it: the policy file re-read, the keyring's rollover steps."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from acme_registry import statekeys
from acme_registry.admin import Metrics
from acme_registry.auth import Credential
from acme_registry.config import ListenAddress
from acme_registry.names import is_user_name
from acme_registry.policy import EVERYTHING, Grants
from acme_registry.storage import FileStorage
from acme_registry.tokenconfig import TokenSettings
from acme_registry.tokenmode import INTERNAL_SUBJECT, INTERNAL_TOKEN_TTL, PolicyFile, TokenMode
from acme_registry.tokenrollover import KeyringTimes
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


def replica(tmp_path: Path, name: str, shared: FileStorage, times: KeyringTimes) -> TokenMode:
    """One replica's token mode: its own DATA_DIR, the keyring in ``shared``."""
    data = tmp_path / name
    users = user_store(data, cost=4)
    return TokenMode(
        replace(settings(), keyring_times=times), data, users, Metrics(), NOW, shared=shared
    )


def test_replicas_share_one_keyring_and_roll_over_together(tmp_path):
    shared = FileStorage(tmp_path / "store")  # conditional writes, as S3's
    times = KeyringTimes(grace=dt.timedelta(days=7))
    one, two = (replica(tmp_path, name, shared, times) for name in ("r1", "r2"))
    assert one.keyring.current.cert == two.keyring.current.cert
    assert one.keyring.refresh_secret == two.keyring.refresh_secret
    bundles = {
        m: Path(m.registry_config(NOW)["auth"]["token"]["rootcertbundle"]) for m in (one, two)
    }
    rotations: dict[TokenMode, list[bytes]] = {one: [], two: []}

    def rotate(mode: TokenMode):
        return lambda: rotations[mode].append(bundles[mode].read_bytes()) is None

    for mode in (one, two):
        mode._generation_started()  # each replica's first generation
        mode.maintain(NOW, rotate(mode))
    assert rotations == {one: [], two: []}

    first = one.keyring.current
    soon = first.not_after - times.lead + dt.timedelta(hours=1)
    one.maintain(soon, rotate(one))
    published = one.keyring.next
    assert published is not None and one.keyring.current == first
    # The other replica follows the stored keyring and starts a generation with the bundle.
    two.maintain(soon, rotate(two))
    assert two.keyring.next == published and two.keyring.current == first
    for mode in (one, two):
        assert len(rotations[mode]) == 1 and published.cert_pem in rotations[mode][0]
    # Both trust the next key now, yet the old one signs until the grace has passed.
    for mode in (one, two):
        mode.maintain(soon + dt.timedelta(days=6), rotate(mode))
        assert mode.keyring.current == first
    later = soon + dt.timedelta(days=7)
    two.maintain(later, rotate(two))
    one.maintain(later, rotate(one))
    for mode in (one, two):
        assert mode.keyring.current == published and mode.keyring.next is None
        assert first.cert_pem in bundles[mode].read_bytes()  # still trusted
        assert len(rotations[mode]) == 1  # the switch left the bundle as it was
    # The replicas' local "served" marks never went into the shared keyring.
    stored = Keyring.from_bytes(shared.load_bytes(statekeys.TOKEN_KEYRING) or b"")
    assert stored.current == published and stored.served_bundle == ""
    # A copy in each DATA_DIR, for a start while the store is down.
    copy = Keyring.from_bytes((tmp_path / "r1" / "token" / "keyring.json").read_bytes())
    assert copy.current == published


def test_replica_starts_from_its_copy_while_the_store_is_down(tmp_path):
    shared = FileStorage(tmp_path / "store")
    times = KeyringTimes()
    first = replica(tmp_path, "r1", shared, times)

    class Down(FileStorage):
        def load(self, key):
            raise OSError("the store is down")

    again = replica(tmp_path, "r1", Down(tmp_path / "store"), times)
    assert again.keyring.current == first.keyring.current
    with pytest.raises(OSError):
        replica(tmp_path, "r2", Down(tmp_path / "store"), times)  # no copy: unready


def test_refresh_binding_of_an_environment_password_is_the_same_on_every_replica(tmp_path):
    shared = FileStorage(tmp_path / "store")

    def with_env(name: str, password: str) -> TokenMode:
        data = tmp_path / name
        users = user_store(data, {"ci": Credential(password, hashed=False, source="AUTH_USERS")})
        users.sync_htpasswd()  # each replica hashes the password with its own salt
        return TokenMode(settings(), data, users, Metrics(), NOW, shared=shared)

    one, two = with_env("r1", "ci-Pa55word-long"), with_env("r2", "ci-Pa55word-long")
    assert one.users.password_hash("ci") != two.users.password_hash("ci")
    assert one.refresh_binding("ci") == two.refresh_binding("ci")
    assert "ci-Pa55word" not in (one.refresh_binding("ci") or "")
    assert with_env("r3", "another-Pa55word").refresh_binding("ci") != one.refresh_binding("ci")
    # A run-time user: its hash (in the shared store, the same for every replica).
    one.users.add("alice", "alice-Pa55word")
    assert one.refresh_binding("alice") == one.users.password_hash("alice")


def test_a_single_instance_becoming_replicas_keeps_its_key(tmp_path):
    single = make_mode(tmp_path)  # STATE_STORE=file: the keyring in DATA_DIR
    shared = FileStorage(tmp_path / "store")
    mode = TokenMode(settings(), tmp_path / "data", single.users, Metrics(), NOW, shared=shared)
    assert mode.keyring.current == single.keyring.current
    assert mode.keyring.refresh_secret == single.keyring.refresh_secret
    stored = Keyring.from_bytes(shared.load_bytes(statekeys.TOKEN_KEYRING) or b"")
    assert stored.current == single.keyring.current
    # A damaged copy is not used: a new keyring, in the store.
    (tmp_path / "r2" / "token").mkdir(parents=True)
    (tmp_path / "r2" / "token" / "keyring.json").write_bytes(b"{")
    other = TokenMode(
        settings(),
        tmp_path / "r2",
        single.users,
        Metrics(),
        NOW,
        shared=FileStorage(tmp_path / "s2"),
    )
    assert other.keyring.current != single.keyring.current
