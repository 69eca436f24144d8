"""The htpasswd file we write, read by the real registry binary over TLS.

Each test runs its own registry with a fresh self-signed CA, checks `/v2/` with requests
and pushes and pulls with skopeo. Users changed while the registry runs must take effect
without a restart: the registry re-reads the file when its mtime changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from acme_registry.auth import UserStore, load_env_users, registry_auth_config
from tests.support.clients import Skopeo
from tests.support.ports import free_port
from tests.support.tls import TestCA
from tests.support.users import auth_dir, user_store

NAME = "registry.test"
REALM = "acme-registry-test"
COST = 4  # the registry checks every request; the lowest cost keeps the tests quick
ALICE_PW = "alice-Pa55-word"


@dataclass
class TLSFiles:
    ca_pem: bytes
    ca_file: Path
    pem_file: Path  # leaf, then key: both http.tls.certificate and http.tls.key


def make_tls(directory: Path) -> TLSFiles:
    ca = TestCA("acme-registry test CA")
    leaf_pem, key_pem = ca.issue_pair([NAME])
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.pem)
    pem_file = directory / "tls.pem"
    pem_file.write_bytes(leaf_pem + key_pem)
    pem_file.chmod(0o600)
    return TLSFiles(ca.pem, ca_file, pem_file)


class Registry:
    """The real registry binary with our auth section and our htpasswd file."""

    def __init__(self, binary: Path, workdir: Path, htpasswd: Path, tls: TLSFiles) -> None:
        self.port = free_port()
        self.tls = tls
        self.log_path = workdir / "registry.log"
        config = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                "secret": "test-http-secret",
                "tls": {"certificate": str(tls.pem_file), "key": str(tls.pem_file)},
            },
            "auth": registry_auth_config(htpasswd, REALM),
        }
        self.config_path = workdir / "config.yml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(workdir),
            "OTEL_TRACES_EXPORTER": "none",
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "serve", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies from the environment for 127.0.0.1
        self.session.verify = str(tls.ca_file)
        self._wait_up(timeout=15)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v2/"

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the registry exited at start:\n{self.log()}")
            try:
                self.session.get(self.url, timeout=2)
                return
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the registry did not answer:\n{self.log()}") from None
                time.sleep(0.02)

    def status(self, user: str | None = None, password: str | None = None) -> int:
        auth = (user, password or "") if user is not None else None
        return self.session.get(self.url, auth=auth, timeout=10).status_code

    def wait_status(
        self, expected: int, user: str, password: str, timeout: float = 5.0
    ) -> tuple[int, float]:
        """Poll until ``/v2/`` answers ``expected`` for these credentials; (status, seconds)."""
        started = time.monotonic()
        while True:
            status = self.status(user, password)
            elapsed = time.monotonic() - started
            if status == expected or elapsed > timeout:
                return status, elapsed
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.session.close()


StartRegistry = Callable[[UserStore], Registry]


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return make_tls(tmp_path / "tls")


@pytest.fixture
def start_registry(tmp_path: Path, registry_binary: Path, tls: TLSFiles) -> Iterator[StartRegistry]:
    started: list[Registry] = []

    def start(store: UserStore) -> Registry:
        # Always before the registry starts: without the file it invents a user of its own.
        assert store.htpasswd_path.exists()
        registry = Registry(registry_binary, tmp_path, store.htpasswd_path, tls)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()
        assert "Traceback" not in registry.log()


def env_store(tmp_path: Path, users: str | None = None, file_text: str | None = None) -> UserStore:
    return user_store(tmp_path / "data", load_env_users(users, file_text), cost=COST)


def test_no_wrong_and_right_credentials(tmp_path, start_registry):
    store = env_store(tmp_path, f"alice:{ALICE_PW}")
    store.sync_htpasswd()
    registry = start_registry(store)

    anonymous = registry.session.get(registry.url, timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == f'Basic realm="{REALM}"'
    assert registry.status("alice", "wrong") == 401
    assert registry.status("nobody", ALICE_PW) == 401
    assert registry.status("alice", "") == 401
    assert registry.status("alice", ALICE_PW) == 200

    log = registry.log()
    assert ALICE_PW not in log
    # Logged (with a password) only when the registry had to invent a user of its own.
    assert "htpasswd is missing" not in log


def test_users_added_and_removed_while_the_registry_runs(tmp_path, start_registry):
    store = env_store(tmp_path, f"alice:{ALICE_PW}")
    store.sync_htpasswd()
    registry = start_registry(store)
    pid = registry.proc.pid
    assert registry.status("alice", ALICE_PW) == 200
    assert registry.status("bob", "bob-pw") == 401

    store.add("bob", "bob-pw")
    status, waited = registry.wait_status(200, "bob", "bob-pw")
    print(f"added user accepted after {waited:.3f} s")
    assert status == 200

    store.add("bob", "bob-new-pw")
    assert registry.wait_status(200, "bob", "bob-new-pw")[0] == 200
    assert registry.status("bob", "bob-pw") == 401

    store.remove("bob")
    status, waited = registry.wait_status(401, "bob", "bob-new-pw")
    print(f"removed user refused after {waited:.3f} s")
    assert status == 401
    assert registry.status("alice", ALICE_PW) == 200
    assert registry.proc.pid == pid and registry.proc.poll() is None  # never restarted


def test_bcrypt_hashes_from_a_users_file_and_the_default_cost(tmp_path, start_registry):
    import bcrypt

    # htpasswd -B writes $2y$; Python's bcrypt writes $2b$: the registry must take both.
    h2y = "$2y$" + bcrypt.hashpw(b"carol-pw", bcrypt.gensalt(COST)).decode()[4:]
    text = f"# from htpasswd -B\ncarol:{h2y}\ndave:dave-pw\n"
    store = user_store(tmp_path / "data", load_env_users(None, text))  # default cost 10
    store.sync_htpasswd()
    registry = start_registry(store)
    assert registry.status("carol", "carol-pw") == 200
    assert registry.status("dave", "dave-pw") == 200
    assert registry.status("carol", "dave-pw") == 401


def test_the_initial_admin_logs_in(tmp_path, start_registry):
    store = user_store(tmp_path / "data", {}, cost=COST)
    message = store.ensure_initial_admin()
    assert message is not None
    password = (auth_dir(tmp_path / "data") / "initial-admin-password").read_text().strip()
    registry = start_registry(store)
    assert registry.status("admin", password) == 200
    assert registry.status("admin", "admin") == 401
    assert password not in message and password not in registry.log()


def test_push_and_pull_with_credentials(tmp_path, start_registry, tls, oci_image):
    from tests.support.oci import layout_manifest_digest

    store = env_store(tmp_path, f"alice:{ALICE_PW}")
    store.sync_htpasswd()
    store.add("bob", "bob-pw")
    registry = start_registry(store)
    ref = f"{NAME}:{registry.port}/demo:v1"

    alice = Skopeo(tmp_path / "skopeo-alice", tls.ca_pem, [NAME], creds=f"alice:{ALICE_PW}")
    alice.push(oci_image, "v1", ref)
    bob = Skopeo(tmp_path / "skopeo-bob", tls.ca_pem, [NAME], creds="bob:bob-pw")
    bob.pull(ref, tmp_path / "pulled", "v1")
    assert layout_manifest_digest(tmp_path / "pulled", "v1") == layout_manifest_digest(
        oci_image, "v1"
    )

    wrong = Skopeo(tmp_path / "skopeo-wrong", tls.ca_pem, [NAME], creds="alice:wrong")
    with pytest.raises(AssertionError, match=r"(?i)unauthorized"):
        wrong.push(oci_image, "v1", f"{NAME}:{registry.port}/demo:v2")
    anonymous = Skopeo(tmp_path / "skopeo-anonymous", tls.ca_pem, [NAME])
    with pytest.raises(AssertionError, match=r"(?i)unauthorized|authentication required"):
        anonymous.pull(ref, tmp_path / "pulled-anonymous", "v1")

    # A removed user can no longer push.
    store.remove("bob")
    assert registry.wait_status(401, "bob", "bob-pw")[0] == 401
    with pytest.raises(AssertionError, match=r"(?i)unauthorized"):
        bob.push(oci_image, "v1", f"{NAME}:{registry.port}/demo:v3")
    assert "v2" not in alice.list_tags(f"{NAME}:{registry.port}/demo")

    log = registry.log()
    for secret in (ALICE_PW, "bob-pw"):
        assert secret not in log
