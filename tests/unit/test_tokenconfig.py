"""Token mode's settings and the registry's auth.token section."""

from __future__ import annotations

from pathlib import Path

import pytest

from acme_registry.config import ConfigError, ListenAddress
from acme_registry.tokenconfig import (
    KNOWN_VARIABLES,
    load_token_settings,
    registry_token_config,
    reject_unknown_token_variables,
)
from acme_registry.tokenrollover import KeyringTimes

DOMAINS = ("registry.example.com", "other.example.com")


def test_defaults() -> None:
    settings = load_token_settings({}, DOMAINS)
    assert settings.addr == ListenAddress("", 5001)
    assert settings.realm == "https://registry.example.com:5001/token"
    assert settings.service == "registry.example.com"
    assert settings.ttl == 300
    assert settings.proxy_protocol is False
    assert settings.policy_file is None
    assert settings.anonymous_pull == ()


def test_everything_set() -> None:
    settings = load_token_settings(
        {
            "TOKEN_ADDR": "[::1]:8443",
            "TOKEN_TTL": "10m",
            "TOKEN_PROXY_PROTOCOL": "true",
            "AUTH_POLICY_FILE": "/run/secrets/policy.yml",
            "AUTH_ANONYMOUS_PULL": "public/*,docs",
        },
        ("*.wild.example.com", "registry.example.com"),
    )
    assert settings.addr == ListenAddress("::1", 8443)
    # The first name that is not a wildcard.
    assert settings.realm == "https://registry.example.com:8443/token"
    assert settings.ttl == 600
    assert settings.proxy_protocol
    assert settings.policy_file == Path("/run/secrets/policy.yml")
    assert settings.anonymous_pull == ("public/*", "docs")


def test_ipv6_name_in_brackets_and_explicit_realm() -> None:
    assert load_token_settings({}, ("2001:db8::1",)).realm == "https://[2001:db8::1]:5001/token"
    explicit = load_token_settings({"TOKEN_REALM": "https://login.example.com/token"}, DOMAINS)
    assert explicit.realm == "https://login.example.com/token"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TOKEN_ADDR": "5001"}, "TOKEN_ADDR"),
        ({"TOKEN_ADDR": ":0"}, "TOKEN_ADDR"),
        ({"TOKEN_ADDR": "example.com:5001"}, "TOKEN_ADDR"),
        ({"TOKEN_ADDR": "[::1:5001"}, "TOKEN_ADDR"),
        ({"TOKEN_ADDR": ":443"}, "TOKEN_ADDR"),  # taken by the registry below
        ({"TOKEN_REALM": "http://x/token"}, "TOKEN_REALM"),
        ({"TOKEN_REALM": "https:///token"}, "TOKEN_REALM"),
        ({"TOKEN_REALM": 'https://x/"token'}, "TOKEN_REALM"),
        ({"TOKEN_REALM": "https://x:99999/token"}, "TOKEN_REALM"),
        ({"TOKEN_TTL": "5 minutes"}, "TOKEN_TTL"),
        ({"TOKEN_TTL": "10"}, "TOKEN_TTL"),
        ({"TOKEN_TTL": "2d"}, "TOKEN_TTL"),
        ({"TOKEN_TTL": "25h"}, "TOKEN_TTL"),
        ({"TOKEN_PROXY_PROTOCOL": "maybe"}, "TOKEN_PROXY_PROTOCOL"),
        ({"AUTH_POLICY_FILE": "policy.yml"}, "AUTH_POLICY_FILE"),
        ({"AUTH_ANONYMOUS_PULL": "Public/*"}, "AUTH_ANONYMOUS_PULL"),
        ({"AUTH_ANONYMOUS_PULL": ","}, "AUTH_ANONYMOUS_PULL"),
        ({"TOKEN_TLL": "5m"}, "TOKEN_TLL"),
        ({"ACME_REGISTRY_TOKEN_KEYRING_TIMES": "90,60"}, "ACME_REGISTRY_TOKEN_KEYRING_TIMES"),
        ({"ACME_REGISTRY_TOKEN_KEYRING_TIMES": "60,90,1"}, "ACME_REGISTRY_TOKEN_KEYRING_TIMES"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_token_settings(env, DOMAINS, {443: "the registry"})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert "\n" not in str(info.value)


def test_unknown_names_get_a_suggestion_and_service_links_pass() -> None:
    with pytest.raises(ConfigError, match=r"^TOKEN_TLL: unknown setting \(did you mean TOKEN_TTL"):
        reject_unknown_token_variables({"TOKEN_TLL": "5m"})
    # A Kubernetes Service named "token" injects these.
    reject_unknown_token_variables(
        {"TOKEN_SERVICE_HOST": "10.0.0.7", "TOKEN_PORT": "tcp://10.0.0.7:5001"}
    )
    assert "AUTH_POLICY_FILE" in KNOWN_VARIABLES and "TOKEN_ADDR" in KNOWN_VARIABLES


def test_only_wildcards_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^ACME_DOMAINS: "):
        load_token_settings({}, ("*.example.com",))


def test_registry_section() -> None:
    settings = load_token_settings({}, DOMAINS)
    assert registry_token_config(settings, Path("/data/token/roots.pem")) == {
        "auth": {
            "token": {
                "realm": "https://registry.example.com:5001/token",
                "service": "registry.example.com",
                "issuer": "acme-registry@registry.example.com",
                "rootcertbundle": "/data/token/roots.pem",
                "autoredirect": False,
            }
        },
        "storage": {"delete": {"enabled": True}},
    }


def test_keyring_times_are_shortened_only_by_the_internal_variable() -> None:
    assert load_token_settings({}, DOMAINS).keyring_times == KeyringTimes()
    short = load_token_settings({"ACME_REGISTRY_TOKEN_KEYRING_TIMES": "90,60,15"}, DOMAINS)
    assert short.keyring_times.lifetime.total_seconds() == 90
    assert short.keyring_times.grace.total_seconds() == 15
