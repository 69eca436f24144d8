"""Invalid configurations: `acme-registry run` exits 2 with one line naming the variable,
before it writes anything or makes any network request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ports import free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ACME_DOMAINS": "registry.test",
        # A closed port: a request made before validation would fail differently.
        "ACME_DIRECTORY": f"https://127.0.0.1:{free_port()}/dir",
        "ACME_HTTP_PORT": str(free_port()),
        "CERT_DIR": str(tmp_path / "certs"),
        "DATA_DIR": str(tmp_path / "data"),
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "REGISTRY_BINARY": REGISTRY_BINARY,
    }


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    seen = {}
    for root in roots:
        if not root.exists():
            seen[str(root)] = (-1, -1)
            continue
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            seen[str(path)] = (stat.st_mtime_ns, stat.st_size)
    return seen


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "acme_registry", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


EXEC_HOOK = {"ACME_CHALLENGE": "dns-01", "DNS_PROVIDER": "exec", "DNS_EXEC_COMMAND": "/bin/true"}
RFC2136 = {
    "ACME_CHALLENGE": "dns-01",
    "DNS_PROVIDER": "rfc2136",
    "DNS_RFC2136_SERVER": "127.0.0.1",
    "DNS_RFC2136_TSIG_KEY_NAME": "acme-key",
    "DNS_RFC2136_TSIG_SECRET": "c2VjcmV0c2VjcmV0c2VjcmV0",
}

# (name, changes to the valid base environment, variable named, fragment of the message)
INVALID = [
    ("domains missing", {"ACME_DOMAINS": None}, "ACME_DOMAINS", "required"),
    ("domains blank", {"ACME_DOMAINS": "  "}, "ACME_DOMAINS", "required"),
    ("underscore", {"ACME_DOMAINS": "bad_name.test"}, "ACME_DOMAINS", "not a valid DNS name"),
    ("wildcard", {"ACME_DOMAINS": "*.example.com"}, "ACME_DOMAINS", "wildcard"),
    ("duplicate", {"ACME_DOMAINS": "a.test,A.test"}, "ACME_DOMAINS", "listed twice"),
    ("empty item", {"ACME_DOMAINS": "a.test,,b.test"}, "ACME_DOMAINS", "empty name"),
    ("single label", {"ACME_DOMAINS": "localhost"}, "ACME_DOMAINS", "not a valid DNS name"),
    ("label too long", {"ACME_DOMAINS": "a" * 64 + ".test"}, "ACME_DOMAINS", "not a valid"),
    ("email", {"ACME_EMAIL": "not-an-email"}, "ACME_EMAIL", "not an email address"),
    ("http directory", {"ACME_DIRECTORY": "http://ca.test/dir"}, "ACME_DIRECTORY", "https://"),
    ("unknown alias", {"ACME_DIRECTORY": "letsencrypt-prod"}, "ACME_DIRECTORY", "letsencrypt"),
    ("ca bundle missing", {"ACME_CA_BUNDLE": "/nonexistent.pem"}, "ACME_CA_BUNDLE", "not a file"),
    ("ca bundle not pem", {"ACME_CA_BUNDLE": "@notpem"}, "ACME_CA_BUNDLE", "no PEM"),
    ("eab kid alone", {"ACME_EAB_KID": "kid-1"}, "ACME_EAB_HMAC_KEY", "required"),
    ("eab key alone", {"ACME_EAB_HMAC_KEY": "zWNDZM6eQGHWpSRTPal5eIUYFTu7"}, "ACME_EAB_KID", ""),
    (
        "eab key and file",
        {"ACME_EAB_KID": "k", "ACME_EAB_HMAC_KEY": "abcd", "ACME_EAB_HMAC_KEY_FILE": "@notpem"},
        "ACME_EAB_HMAC_KEY_FILE",
        "not both",
    ),
    (
        "eab key not base64url",
        {"ACME_EAB_KID": "k", "ACME_EAB_HMAC_KEY": "not/base64+at all!"},
        "ACME_EAB_HMAC_KEY",
        "base64url",
    ),
    (
        "eab key file missing",
        {"ACME_EAB_KID": "k", "ACME_EAB_HMAC_KEY_FILE": "/nonexistent"},
        "ACME_EAB_HMAC_KEY_FILE",
        "not a file",
    ),
    ("key type", {"ACME_KEY_TYPE": "dsa1024"}, "ACME_KEY_TYPE", "ec256"),
    ("http port zero", {"ACME_HTTP_PORT": "0"}, "ACME_HTTP_PORT", "not a port"),
    ("http port text", {"ACME_HTTP_PORT": "eighty"}, "ACME_HTTP_PORT", "not a port"),
    ("http port big", {"ACME_HTTP_PORT": "70000"}, "ACME_HTTP_PORT", "not a port"),
    ("cert dir relative", {"CERT_DIR": "certs"}, "CERT_DIR", "absolute"),
    ("data dir is a file", {"DATA_DIR": "@notpem"}, "DATA_DIR", "not a directory"),
    ("data dir too long", {"DATA_DIR": "/" + "d" * 120}, "DATA_DIR", "too long"),
    ("addr without port", {"REGISTRY_HTTP_ADDR": "443"}, "REGISTRY_HTTP_ADDR", "host:port"),
    ("addr host name", {"REGISTRY_HTTP_ADDR": "example.com:443"}, "REGISTRY_HTTP_ADDR", "IP"),
    ("registry binary", {"REGISTRY_BINARY": "/nonexistent"}, "REGISTRY_BINARY", "executable"),
    (
        "foreign tls certificate",
        {"REGISTRY_HTTP_TLS_CERTIFICATE": "/etc/ssl/other.crt"},
        "REGISTRY_HTTP_TLS_CERTIFICATE",
        "owns http.tls",
    ),
    ("http secret", {"REGISTRY_HTTP_SECRET": "s3cret"}, "REGISTRY_HTTP_SECRET", "owns"),
    ("debug addr", {"REGISTRY_HTTP_DEBUG_ADDR": ":5001"}, "REGISTRY_HTTP_DEBUG_ADDR", "owns"),
    ("whole http section", {"REGISTRY_HTTP": "{}"}, "REGISTRY_HTTP", "owns"),
    ("typo", {"ACME_DOMAIN": "registry.test"}, "ACME_DOMAIN", "did you mean ACME_DOMAINS"),
    ("log level", {"LOG_LEVEL": "verbose"}, "LOG_LEVEL", "info"),
    ("drain", {"REGISTRY_HTTP_DRAINTIMEOUT": "soon"}, "REGISTRY_HTTP_DRAINTIMEOUT", "duration"),
    ("profile", {"ACME_PROFILE": "short lived"}, "ACME_PROFILE", "not a profile name"),
    ("dry run directory", {"ACME_DRY_RUN_DIRECTORY": "ftp://x"}, "ACME_DRY_RUN_DIRECTORY", "URL"),
    ("acme enabled", {"ACME_ENABLED": "maybe"}, "ACME_ENABLED", "true or false"),
    ("tls file with acme on", {"TLS_CERT_FILE": "/etc/hostname"}, "TLS_CERT_FILE", "only used"),
    (
        "own certificate missing",
        {"ACME_ENABLED": "false", "TLS_CERT_FILE": "/nonexistent.crt"},
        "TLS_CERT_FILE",
        "not a file",
    ),
    ("own key missing", {"ACME_ENABLED": "false"}, "TLS_CERT_FILE", "not a file"),
    ("auth mode", {"AUTH_MODE": "ldap"}, "AUTH_MODE", "htpasswd"),
    ("auth typo", {"AUTH_USER": "a:b"}, "AUTH_USER", "did you mean AUTH_USERS"),
    ("users without password", {"AUTH_USERS": "alice"}, "AUTH_USERS", "entry 1"),
    ("users file missing", {"AUTH_USERS_FILE": "/nonexistent"}, "AUTH_USERS_FILE", "not a file"),
    ("users with auth off", {"AUTH_MODE": "none", "AUTH_USERS": "a:b"}, "AUTH_USERS", "none"),
    (
        "registry auth while ours",
        {"REGISTRY_AUTH_HTPASSWD_PATH": "/x"},
        "REGISTRY_AUTH_HTPASSWD_PATH",
        "owns auth",
    ),
    ("admin on registry port", {"ADMIN_ADDR": "@registryaddr"}, "ADMIN_ADDR", "already used"),
    ("admin addr", {"ADMIN_ADDR": "9180"}, "ADMIN_ADDR", "host:port"),
    ("log format", {"LOG_FORMAT": "xml"}, "LOG_FORMAT", "json"),
    ("challenge", {"ACME_CHALLENGE": "tls-alpn-01"}, "ACME_CHALLENGE", "dns-01"),
    ("dns-01 without provider", {"ACME_CHALLENGE": "dns-01"}, "DNS_PROVIDER", "required"),
    ("provider with http-01", {"DNS_PROVIDER": "exec"}, "DNS_PROVIDER", "not used"),
    ("dns typo", {"DNS_SERVR": "x"}, "DNS_SERVR", "did you mean DNS_RFC2136_SERVER"),
    ("ip with dns-01", {**EXEC_HOOK, "ACME_DOMAINS": "192.0.2.7"}, "ACME_DOMAINS", "IP address"),
    (
        "wildcard with dns-persist-01 and an ip",
        {"ACME_CHALLENGE": "dns-persist-01", "ACME_DOMAINS": "*.registry.test,::1"},
        "ACME_DOMAINS",
        "IP address",
    ),
    (
        "tsig secret not base64",
        {**RFC2136, "DNS_RFC2136_TSIG_SECRET": "not base64!!"},
        "DNS_RFC2136_TSIG_SECRET",
        "base64",
    ),
    (
        "tsig algorithm",
        {**RFC2136, "DNS_RFC2136_TSIG_ALGORITHM": "hmac-sha3"},
        "DNS_RFC2136_TSIG_ALGORITHM",
        "hmac-sha256",
    ),
    (
        "exec not executable",
        {**EXEC_HOOK, "DNS_EXEC_COMMAND": "/nonexistent/hook"},
        "DNS_EXEC_COMMAND",
        "executable",
    ),
    ("http port off with http-01", {"ACME_HTTP_PORT": "off"}, "ACME_HTTP_PORT", "DNS challenge"),
    ("rfc2136 server missing", {**RFC2136, "DNS_RFC2136_SERVER": None}, "DNS_RFC2136_SERVER", ""),
    ("token typo", {"AUTH_MODE": "token", "TOKEN_TTLL": "5m"}, "TOKEN_TTLL", "TOKEN_TTL?"),
    ("token ttl", {"AUTH_MODE": "token", "TOKEN_TTL": "1s"}, "TOKEN_TTL", "outside"),
    ("token addr", {"AUTH_MODE": "token", "TOKEN_ADDR": "5001"}, "TOKEN_ADDR", "host:port"),
    (
        "registry auth in token mode",
        {"AUTH_MODE": "token", "REGISTRY_AUTH_TOKEN_REALM": "https://x.test/token"},
        "REGISTRY_AUTH_TOKEN_REALM",
        "owns auth",
    ),
    (
        "policy file missing",
        {"AUTH_MODE": "token", "AUTH_POLICY_FILE": "/nonexistent/policy.yml"},
        "AUTH_POLICY_FILE",
        "cannot read",
    ),
    (
        "policy file bad pattern",
        {"AUTH_MODE": "token", "AUTH_POLICY_FILE": "@badpolicy"},
        "AUTH_POLICY_FILE",
        "policy.yml:3:",
    ),
    (
        "anonymous pattern",
        {"AUTH_MODE": "token", "AUTH_ANONYMOUS_PULL": "Public/*"},
        "AUTH_ANONYMOUS_PULL",
        "lower case",
    ),
    ("token setting outside token mode", {"TOKEN_TTL": "5m"}, "TOKEN_TTL", "AUTH_MODE=token"),
    ("state store misspelt", {"STATE_STORE": "s4"}, "STATE_STORE", "file, s3"),
    ("unknown state setting", {"STATE_S3_BUCKETS": "x"}, "STATE_S3_BUCKETS", "STATE_S3_BUCKET"),
    (
        "images in S3, state store not chosen",
        {"REGISTRY_STORAGE": "s3", "REGISTRY_STORAGE_S3_BUCKET": "images"},
        "STATE_STORE",
        "several replicas",
    ),
    (
        "s3 state without a key file",
        {
            "STATE_STORE": "s3",
            "STATE_S3_ENDPOINT": "http://127.0.0.1:9",
            "STATE_S3_BUCKET": "state",
        },
        "STATE_ENCRYPTION_KEY_FILE",
        "required",
    ),
    (
        "s3 state with a key file that is no key",
        {
            **{
                "STATE_STORE": "s3",
                "STATE_S3_ENDPOINT": "http://127.0.0.1:9",
                "STATE_S3_BUCKET": "state",
            },
            "STATE_ENCRYPTION_KEY_FILE": "@notpem",
        },
        "STATE_ENCRYPTION_KEY_FILE",
        "64 hexadecimal",
    ),
    ("s3 setting with the file store", {"STATE_POLL_INTERVAL": "5"}, "STATE_POLL_INTERVAL", "s3"),
]


@pytest.mark.parametrize(
    ("changes", "variable", "fragment"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_configuration_exits_2_and_touches_nothing(tmp_path, changes, variable, fragment):
    env = base_env(tmp_path)
    not_pem = tmp_path / "not-pem.txt"
    not_pem.write_text("hello\n")
    bad_policy = tmp_path / "policy.yml"
    bad_policy.write_text("users:\n  ci:\n    pull: ['Team/*']\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep").write_text("operator file\n")
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = (
                value.replace("@notpem", str(not_pem))
                .replace("@badpolicy", str(bad_policy))
                .replace("@registryaddr", env["REGISTRY_HTTP_ADDR"])
            )
    before = snapshot(tmp_path / "certs", tmp_path / "data")

    result = run_cli(env, "run")

    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"acme-registry: configuration error: {variable}: "), lines[0]
    assert fragment in lines[0]
    assert result.stdout == ""
    assert snapshot(tmp_path / "certs", tmp_path / "data") == before


def test_secret_is_not_echoed_in_the_error(tmp_path):
    env = base_env(tmp_path)
    env.update(ACME_EAB_KID="kid-1", ACME_EAB_HMAC_KEY="short")
    result = run_cli(env, "run")
    assert result.returncode == 2
    assert "short" not in result.stderr.replace("shorter", "")


def test_a_bad_users_entry_does_not_echo_the_password(tmp_path):
    env = base_env(tmp_path)
    env["AUTH_USERS"] = "alice:s3cret-value,bad name:other-s3cret"
    result = run_cli(env, "run")
    assert result.returncode == 2
    assert "s3cret" not in result.stderr


def test_tls_settings_naming_our_own_files_are_accepted(tmp_path):
    env = base_env(tmp_path)
    env["REGISTRY_HTTP_TLS_CERTIFICATE"] = env["CERT_DIR"] + "/domain.crt"
    env["REGISTRY_HTTP_TLS_KEY"] = env["CERT_DIR"] + "/domain.key"
    result = run_cli(env, "check")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "certs").exists()
