"""open_storage in both modes: file mode never loads boto3; s3 mode encrypts and probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from acme_registry import statekeys
from acme_registry.config import load_settings
from acme_registry.s3storage import S3Storage
from acme_registry.statecrypt import EncryptedStorage
from acme_registry.statestore import open_storage
from acme_registry.storage import FileStorage, StoreUnsafe
from tests.support.careless_s3 import CarelessS3
from tests.support.ports import free_port

BASE = {"ACME_DOMAINS": "registry.example.com", "REGISTRY_BINARY": "/bin/sh"}
ACCOUNT_KEY = statekeys.account_key("0123456789abcdef")
PEM = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIExample\n-----END EC PRIVATE KEY-----\n"
USERS = b'{"users": {"alice": "$2b$04$abcdefghijklmnopqrstuu7jYy6CqVJb0s8TJE9KcNBJd5vI0X3nu"}}'

# Loads what `acme-registry run` loads in file mode, opens the store, reports boto modules.
_IMPORTS = textwrap.dedent(
    """
    import json, sys
    import acme_registry.cli, acme_registry.launcher, acme_registry.agent
    import acme_registry.issuer, acme_registry.statestore
    from acme_registry.config import load_settings
    from acme_registry.statestore import open_storage
    env = json.loads(sys.argv[1])
    storage = open_storage(load_settings(env))
    print(json.dumps({
        "storage": type(storage).__name__,
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore")),
    }))
    """
)


def _imports(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS, json.dumps(env)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_file_mode_does_not_import_boto3(tmp_path):
    found = _imports({**BASE, "DATA_DIR": str(tmp_path / "data")})
    assert found == {"storage": "FileStorage", "loaded": []}


def test_s3_mode_imports_boto3(seaweed, s3_bucket, state_key_file, tmp_path):
    env = {
        **BASE,
        "DATA_DIR": str(tmp_path / "data"),
        **seaweed.state_env(s3_bucket, state_key_file),
    }
    found = _imports(env)
    assert found["storage"] == "EncryptedStorage"
    assert "boto3" in found["loaded"]  # type: ignore[operator]


def test_file_mode_is_data_dir(tmp_path):
    storage = open_storage(load_settings({**BASE, "DATA_DIR": str(tmp_path)}))
    assert isinstance(storage, FileStorage) and storage.root == tmp_path


def test_bucket_read_without_the_key_reveals_no_secret(seaweed, s3_bucket, state_key_file):
    env = {**BASE, **seaweed.state_env(s3_bucket, state_key_file)}
    storage = open_storage(load_settings(env))
    assert isinstance(storage, EncryptedStorage) and isinstance(storage.inner, S3Storage)
    certificate = {"chain": "-----BEGIN CERTIFICATE-----...", "key": PEM.decode()}
    storage.store(ACCOUNT_KEY, PEM, if_absent=True)
    storage.store(statekeys.USERS, USERS)
    storage.store_json(statekeys.CERTIFICATE, certificate)
    storage.store(statekeys.PENDING_ORDER, json.dumps({"key": PEM.decode()}).encode())
    storage.store(statekeys.HTTP_SECRET, b"0123456789abcdef0123456789abcdef")
    storage.store(statekeys.INITIAL_ADMIN_PASSWORD, b"correct horse battery staple\n")
    storage.store(statekeys.TOKEN_KEYRING, json.dumps({"signing": PEM.decode()}).encode())
    storage.store_json(statekeys.BACKOFF, {"failures": 0})

    client = seaweed.client()  # the bucket's credentials, not the encryption key
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert len(keys) == 8 and all(k.startswith("acme-registry/") for k in keys)
    for key in keys:
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        name = key.removeprefix("acme-registry/")
        if statekeys.is_secret(name):
            assert b"BEGIN" not in body and b"$2" not in body, key
            assert b"0123456789abcdef" not in body and b"horse" not in body, key
        else:
            assert json.loads(body) == {"failures": 0}
    # ... and with the key, everything reads back.
    assert storage.load_bytes(ACCOUNT_KEY) == PEM
    assert storage.load_json(statekeys.CERTIFICATE) == certificate
    assert storage.load_bytes(statekeys.USERS) == USERS


def test_two_replicas_share_sealed_state(seaweed, s3_bucket, state_key_file):
    env = {**BASE, **seaweed.state_env(s3_bucket, state_key_file)}
    one, two = open_storage(load_settings(env)), open_storage(load_settings(env))
    version = one.store(statekeys.HTTP_SECRET, b"shared", if_absent=True)
    loaded = two.load(statekeys.HTTP_SECRET)
    assert loaded is not None and (loaded.data, loaded.version) == (b"shared", version)


def test_a_store_that_ignores_conditions_is_refused(state_key_file):
    with CarelessS3() as careless:
        env = {
            **BASE,
            "STATE_STORE": "s3",
            "STATE_S3_ENDPOINT": careless.endpoint,
            "STATE_S3_BUCKET": "state",
            "STATE_S3_ACCESS_KEY": "any",
            "STATE_S3_SECRET_KEY": "any",
            "STATE_ENCRYPTION_KEY_FILE": str(state_key_file),
        }
        with pytest.raises(StoreUnsafe, match="ignores If-None-Match: refusing to run"):
            open_storage(load_settings(env))


def test_a_store_down_at_start_is_probed_at_the_first_conditional_write(
    seaweed_factory, state_key_file
):
    server = seaweed_factory()
    bucket = server.new_bucket("late")
    env = {**BASE, **server.state_env(bucket, state_key_file)}
    server.stop()
    storage = open_storage(load_settings(env))  # no exception: replicas serve from cache
    assert isinstance(storage, EncryptedStorage) and isinstance(storage.inner, S3Storage)
    assert storage.inner.probed is False
    server.start()
    storage.store(statekeys.HTTP_SECRET, b"s", if_absent=True)
    assert storage.inner.probed is True


def test_run_refuses_a_store_that_ignores_conditions(tmp_path, state_key_file, registry_binary):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ACME_DOMAINS": "registry.test",
        "ACME_DIRECTORY": f"https://127.0.0.1:{free_port()}/dir",
        "ACME_HTTP_PORT": str(free_port()),
        "ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "CERT_DIR": str(tmp_path / "certs"),
        "DATA_DIR": str(tmp_path / "data"),
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "REGISTRY_BINARY": str(registry_binary),
        "AUTH_MODE": "none",
    }
    with CarelessS3() as careless:
        env.update(
            STATE_STORE="s3",
            STATE_S3_ENDPOINT=careless.endpoint,
            STATE_S3_BUCKET="state",
            STATE_S3_ACCESS_KEY="any",
            STATE_S3_SECRET_KEY="any",
            STATE_ENCRYPTION_KEY_FILE=str(state_key_file),
        )
        result = subprocess.run(
            [sys.executable, "-m", "acme_registry", "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    refusal = [line for line in result.stderr.splitlines() if "refusing to run" in line]
    assert refusal == [
        f"acme-registry: the S3 server at {careless.endpoint} ignores If-None-Match: "
        "refusing to run (STATE_STORE=s3)"
    ], result.stderr
