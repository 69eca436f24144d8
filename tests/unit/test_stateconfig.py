from pathlib import Path

import pytest

from acme_registry.config import ConfigError, load_settings
from acme_registry.stateconfig import (
    DEFAULT_LOCK_LEASE,
    DEFAULT_POLL_INTERVAL,
    KNOWN_VARIABLES,
    load_state_settings,
)

BASE = {"ACME_DOMAINS": "registry.example.com", "REGISTRY_BINARY": "/bin/sh"}
KEY_HEX = "00112233445566778899aabbccddeeff" * 2


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "state-key"
    path.write_text(KEY_HEX + "\n")
    return path


@pytest.fixture
def s3_env(key_file: Path) -> dict[str, str]:
    return {
        "STATE_STORE": "s3",
        "STATE_S3_ENDPOINT": "http://127.0.0.1:8333",
        "STATE_S3_BUCKET": "state",
        "STATE_ENCRYPTION_KEY_FILE": str(key_file),
    }


def _error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_state_settings(env)
    error = caught.value
    assert "\n" not in str(error), "one line"
    assert str(error).startswith(f"{error.variable}: ")
    return error


def test_default_is_the_file_store():
    state = load_settings(BASE).state
    assert state.store == "file" and state.s3 is None and not state.shared
    assert state.encryption_key is None


def test_s3_with_its_own_settings(s3_env):
    state = load_state_settings({**s3_env, "STATE_S3_PREFIX": "/ops/state"})
    assert state.shared and state.s3 is not None
    assert state.s3.endpoint == "http://127.0.0.1:8333"
    assert (state.s3.bucket, state.s3.prefix, state.s3.region) == (
        "state",
        "ops/state/",
        "us-east-1",
    )
    assert state.encryption_key == bytes.fromhex(KEY_HEX)
    assert state.lock_lease == DEFAULT_LOCK_LEASE and state.poll_interval == DEFAULT_POLL_INTERVAL
    assert state.stateless_challenges is False
    assert state.s3.url() == "http://127.0.0.1:8333/state/ops/state/"


def test_s3_defaults_to_the_registry_settings(key_file):
    env = {
        "STATE_STORE": "S3",
        "STATE_ENCRYPTION_KEY_FILE": str(key_file),
        "REGISTRY_STORAGE": "s3",
        "REGISTRY_STORAGE_S3_BUCKET": "images",
        "REGISTRY_STORAGE_S3_REGION": "eu-west-1",
        "registry_storage_s3_regionendpoint": "minio.internal:9000",
        "REGISTRY_STORAGE_S3_SECURE": "false",
        "REGISTRY_STORAGE_S3_ACCESSKEY": "AKIDREGISTRY",
        "REGISTRY_STORAGE_S3_SECRETKEY": "registry-secret",
    }
    s3 = load_state_settings(env).s3
    assert s3 is not None
    assert (s3.endpoint, s3.bucket, s3.prefix) == (
        "http://minio.internal:9000",
        "images",
        "acme-registry/",
    )
    assert (s3.region, s3.access_key, s3.secret_key) == (
        "eu-west-1",
        "AKIDREGISTRY",
        "registry-secret",
    )
    assert s3.credentials_source == "REGISTRY_STORAGE_S3_ACCESSKEY"
    assert "registry-secret" not in repr(s3)


def test_state_settings_override_the_registry(s3_env, tmp_path):
    secret = tmp_path / "s3-secret"
    secret.write_text("own-secret\n")
    env = {
        **s3_env,
        "STATE_S3_REGION": "ap-south-1",
        "STATE_S3_ACCESS_KEY": "AKIDOWN",
        "STATE_S3_SECRET_KEY_FILE": str(secret),
        "REGISTRY_STORAGE_S3_BUCKET": "images",
        "REGISTRY_STORAGE_S3_REGION": "eu-west-1",
        "REGISTRY_STORAGE_S3_REGIONENDPOINT": "https://elsewhere.internal",
        "REGISTRY_STORAGE_S3_ACCESSKEY": "AKIDREGISTRY",
        "REGISTRY_STORAGE_S3_SECRETKEY": "registry-secret",
    }
    s3 = load_state_settings(env).s3
    assert s3 is not None
    assert (s3.endpoint, s3.bucket, s3.region) == ("http://127.0.0.1:8333", "state", "ap-south-1")
    assert (s3.access_key, s3.secret_key) == ("AKIDOWN", "own-secret")
    assert "own-secret" not in repr(load_state_settings(env))


def test_credentials_fall_back_to_the_aws_chain(s3_env):
    s3 = load_state_settings(s3_env).s3
    assert s3 is not None and s3.access_key is None and s3.secret_key is None
    with_aws = {**s3_env, "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "x"}
    s3 = load_state_settings(with_aws).s3
    assert s3 is not None and s3.access_key is None and s3.credentials_source == "AWS_ACCESS_KEY_ID"


def test_aws_region_variables_are_a_fallback(s3_env):
    s3 = load_state_settings({**s3_env, "AWS_DEFAULT_REGION": "ca-central-1"}).s3
    assert s3 is not None and s3.region == "ca-central-1"


def test_no_endpoint_means_aws_itself(key_file):
    env = {
        "STATE_STORE": "s3",
        "STATE_S3_BUCKET": "state",
        "STATE_ENCRYPTION_KEY_FILE": str(key_file),
    }
    s3 = load_state_settings(env).s3
    assert s3 is not None and s3.endpoint is None and s3.url() == "s3://state/acme-registry/"


def test_durations_and_the_stateless_switch(s3_env):
    state = load_state_settings(
        {
            **s3_env,
            "STATE_LOCK_LEASE": "2m",
            "STATE_POLL_INTERVAL": "10s",
            "STATE_STATELESS_CHALLENGES": "true",
        }
    )
    assert state.lock_lease == 120 and state.poll_interval == 10 and state.stateless_challenges


def test_key_file_with_crlf_is_accepted(s3_env, key_file):
    key_file.write_text(KEY_HEX.upper() + "\r\n")
    assert load_state_settings(s3_env).encryption_key == bytes.fromhex(KEY_HEX)


# -- errors: one line naming the variable -------------------------------------------------


def test_misspelt_store_is_refused():
    error = _error({"STATE_STORE": "s4"})
    assert error.variable == "STATE_STORE" and "file, s3" in error.problem


def test_unknown_state_variable_is_refused_with_a_hint():
    error = _error({"STATE_S3_BUCKETS": "x"})
    assert error.variable == "STATE_S3_BUCKETS" and "STATE_S3_BUCKET" in error.problem


def test_unknown_state_variable_is_refused_through_load_settings():
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "STATE_STOR": "file"})
    assert caught.value.variable == "STATE_STOR" and "STATE_STORE" in caught.value.problem


def test_a_kubernetes_service_named_state_is_not_a_setting():
    links = {"STATE_SERVICE_HOST": "10.96.0.9", "STATE_PORT": "tcp://10.96.0.9:80"}
    assert load_settings({**BASE, **links}).state.store == "file"
    assert load_state_settings(links).store == "file"


@pytest.mark.parametrize(
    "registry",
    [
        {"REGISTRY_STORAGE": "s3"},
        {"REGISTRY_STORAGE_S3_BUCKET": "images"},
        {"REGISTRY_STORAGE": "azure"},
        {"registry_storage_gcs_bucket": "images"},
    ],
)
def test_shared_image_storage_needs_an_explicit_store(registry):
    error = _error(registry)
    assert error.variable == "STATE_STORE" and "several replicas" in error.problem


def test_shared_image_storage_with_an_explicit_file_store_runs():
    env = {"REGISTRY_STORAGE": "s3", "REGISTRY_STORAGE_S3_BUCKET": "images", "STATE_STORE": "file"}
    assert load_state_settings(env).store == "file"


def test_filesystem_image_storage_needs_no_choice():
    assert load_state_settings({"REGISTRY_STORAGE": "filesystem"}).store == "file"
    # REGISTRY_STORAGE names the driver: leftovers of another one do not count.
    assert (
        load_state_settings(
            {"REGISTRY_STORAGE": "filesystem", "REGISTRY_STORAGE_S3_BUCKET": "old"}
        ).store
        == "file"
    )


@pytest.mark.parametrize("name", [n for n in KNOWN_VARIABLES if n != "STATE_STORE"])
def test_s3_settings_with_the_file_store_are_refused(name):
    error = _error({"STATE_STORE": "file", name: "x"})
    assert error.variable == name and "STATE_STORE=s3" in error.problem


def test_bucket_is_required(s3_env):
    del s3_env["STATE_S3_BUCKET"]
    error = _error(s3_env)
    assert error.variable == "STATE_S3_BUCKET" and "required" in error.problem


@pytest.mark.parametrize("bucket", ["ab", "Upper", "has_underscore", "-start", "a..b", "x" * 64])
def test_bad_bucket_is_refused(s3_env, bucket):
    assert _error({**s3_env, "STATE_S3_BUCKET": bucket}).variable == "STATE_S3_BUCKET"


def test_bad_registry_bucket_is_named(s3_env):
    del s3_env["STATE_S3_BUCKET"]
    error = _error({**s3_env, "REGISTRY_STORAGE_S3_BUCKET": "Bad_Bucket"})
    assert error.variable == "REGISTRY_STORAGE_S3_BUCKET"


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:8333", "ftp://host", "http://", "http://host/path", "http://host:99999"]
)
def test_bad_endpoint_is_refused(s3_env, endpoint):
    assert _error({**s3_env, "STATE_S3_ENDPOINT": endpoint}).variable == "STATE_S3_ENDPOINT"


def test_bad_registry_endpoint_is_named(s3_env):
    del s3_env["STATE_S3_ENDPOINT"]
    error = _error({**s3_env, "REGISTRY_STORAGE_S3_REGIONENDPOINT": "http://host/some/path"})
    assert error.variable == "REGISTRY_STORAGE_S3_REGIONENDPOINT"


@pytest.mark.parametrize("prefix", ["a//b", "a/../b", "with space", "ünïcode"])
def test_bad_prefix_is_refused(s3_env, prefix):
    assert _error({**s3_env, "STATE_S3_PREFIX": prefix}).variable == "STATE_S3_PREFIX"


@pytest.mark.parametrize(
    ("root", "prefix"), [("", "docker/state"), ("/reg", "reg/docker/x"), ("/reg/sub", "reg")]
)
def test_prefix_inside_the_registry_tree_is_refused(s3_env, root, prefix):
    env = {
        **s3_env,
        "STATE_S3_PREFIX": prefix,
        "REGISTRY_STORAGE_S3_BUCKET": "state",
        "REGISTRY_STORAGE_S3_ROOTDIRECTORY": root,
    }
    error = _error(env)
    assert error.variable == "STATE_S3_PREFIX" and "registry" in error.problem


def test_prefix_beside_the_registry_tree_is_fine(s3_env):
    env = {
        **s3_env,
        "REGISTRY_STORAGE_S3_BUCKET": "state",
        "REGISTRY_STORAGE_S3_ROOTDIRECTORY": "/reg",
    }
    s3 = load_state_settings(env).s3
    assert s3 is not None and s3.prefix == "acme-registry/"


def test_bad_region_is_refused(s3_env):
    assert _error({**s3_env, "STATE_S3_REGION": "EU West"}).variable == "STATE_S3_REGION"
    error = _error({**s3_env, "REGISTRY_STORAGE_S3_REGION": "bad region"})
    assert error.variable == "REGISTRY_STORAGE_S3_REGION"


def test_encryption_key_is_required_with_s3(s3_env):
    del s3_env["STATE_ENCRYPTION_KEY_FILE"]
    error = _error(s3_env)
    assert error.variable == "STATE_ENCRYPTION_KEY_FILE" and "required" in error.problem


@pytest.mark.parametrize(
    "content",
    [
        "",
        KEY_HEX[:-2],
        KEY_HEX + "00",
        KEY_HEX[:-1] + "g",
        KEY_HEX + "\n\n",
        " " + KEY_HEX,
        "\x00" * 32,
    ],
)
def test_bad_encryption_key_is_refused_without_echoing_it(s3_env, key_file, content):
    key_file.write_text(content)
    error = _error(s3_env)
    assert error.variable == "STATE_ENCRYPTION_KEY_FILE" and "64 hexadecimal" in error.problem
    if content.strip():
        assert content.strip() not in str(error)


def test_binary_encryption_key_file_is_refused(s3_env, key_file):
    key_file.write_bytes(b"\xff\xfe" * 16)
    assert _error(s3_env).variable == "STATE_ENCRYPTION_KEY_FILE"


@pytest.mark.parametrize("path", ["relative/key", "/nonexistent/key", "/"])
def test_missing_encryption_key_file_is_refused(s3_env, path):
    error = _error({**s3_env, "STATE_ENCRYPTION_KEY_FILE": path})
    assert error.variable == "STATE_ENCRYPTION_KEY_FILE"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STATE_LOCK_LEASE", "1s"),
        ("STATE_LOCK_LEASE", "2h"),
        ("STATE_LOCK_LEASE", "soon"),
        ("STATE_LOCK_LEASE", "-5"),
        ("STATE_POLL_INTERVAL", "0"),
        ("STATE_POLL_INTERVAL", "61"),
        ("STATE_POLL_INTERVAL", "5 s"),
        ("STATE_STATELESS_CHALLENGES", "maybe"),
    ],
)
def test_bad_numbers_and_switches_are_refused(s3_env, name, value):
    assert _error({**s3_env, name: value}).variable == name


def test_half_a_key_pair_is_refused(s3_env):
    assert _error({**s3_env, "STATE_S3_ACCESS_KEY": "AKID"}).variable == "STATE_S3_SECRET_KEY"
    assert _error({**s3_env, "STATE_S3_SECRET_KEY": "x"}).variable == "STATE_S3_ACCESS_KEY"
    error = _error({**s3_env, "REGISTRY_STORAGE_S3_ACCESSKEY": "AKID"})
    assert error.variable == "REGISTRY_STORAGE_S3_SECRETKEY"
    error = _error({**s3_env, "AWS_ACCESS_KEY_ID": "AKID"})
    assert error.variable == "AWS_SECRET_ACCESS_KEY"


def test_secret_key_and_its_file_together_are_refused(s3_env, tmp_path):
    secret = tmp_path / "s"
    secret.write_text("x")
    env = {**s3_env, "STATE_S3_ACCESS_KEY": "AKID", "STATE_S3_SECRET_KEY": "x"}
    error = _error({**env, "STATE_S3_SECRET_KEY_FILE": str(secret)})
    assert error.variable == "STATE_S3_SECRET_KEY_FILE"


def test_empty_secret_key_file_is_refused(s3_env, tmp_path):
    secret = tmp_path / "s"
    secret.write_text("\n")
    env = {**s3_env, "STATE_S3_ACCESS_KEY": "AKID", "STATE_S3_SECRET_KEY_FILE": str(secret)}
    error = _error(env)
    assert error.variable == "STATE_S3_SECRET_KEY_FILE" and "empty" in error.problem


def test_missing_aws_credentials_file_is_refused(s3_env):
    error = _error({**s3_env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials"})
    assert error.variable == "AWS_SHARED_CREDENTIALS_FILE"


def test_errors_through_load_settings_name_the_variable():
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "REGISTRY_STORAGE": "s3"})
    assert caught.value.variable == "STATE_STORE"
