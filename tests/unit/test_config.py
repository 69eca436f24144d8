from pathlib import Path

import pytest

from acme_registry.config import LETSENCRYPT, LETSENCRYPT_STAGING, ConfigError, load_settings

BASE = {"ACME_DOMAINS": "Registry.Example.com, mirror.example.com.", "REGISTRY_BINARY": "/bin/sh"}


def test_defaults():
    s = load_settings(BASE)
    assert s.domains == ("registry.example.com", "mirror.example.com")
    assert s.directory == LETSENCRYPT
    assert s.key_type == "ec256"
    assert s.http_port == 80
    assert (s.registry_addr.host, s.registry_addr.port) == ("", 443)
    assert s.cert_dir == Path("/certs") and s.data_dir == Path("/data")
    assert s.drain_seconds == 30
    assert s.email is None and s.eab_kid is None


def test_staging_alias_and_ipv6_address():
    s = load_settings(
        {**BASE, "ACME_DIRECTORY": "letsencrypt-staging", "REGISTRY_HTTP_ADDR": "[::1]:8443"}
    )
    assert s.directory == LETSENCRYPT_STAGING
    assert (s.registry_addr.host, s.registry_addr.port) == ("::1", 8443)


def test_registry_variables_pass_through_except_ours():
    env = {**BASE, "REGISTRY_STORAGE_S3_BUCKET": "b", "REGISTRY_LOG_LEVEL": "debug"}
    s = load_settings({**env, "STATE_STORE": "file"})
    assert s.registry_env == {"REGISTRY_STORAGE_S3_BUCKET": "b", "REGISTRY_LOG_LEVEL": "debug"}


def test_owned_setting_is_rejected_case_insensitively():
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "registry_http_secret": "x"})
    assert error.value.variable == "registry_http_secret"


def test_drain_duration_in_minutes():
    assert load_settings({**BASE, "REGISTRY_HTTP_DRAINTIMEOUT": "2m"}).drain_seconds == 120


def test_eab_key_from_file(tmp_path):
    key_file = tmp_path / "hmac"
    key_file.write_text("zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W\n")
    s = load_settings({**BASE, "ACME_EAB_KID": "kid-1", "ACME_EAB_HMAC_KEY_FILE": str(key_file)})
    assert s.eab_kid == "kid-1"
    assert s.eab_hmac_key and s.eab_hmac_key.startswith("zWND")
    assert "zWND" not in repr(s)


# What Kubernetes injects for Services named "acme", "auth", "acme-http" and "registry-http".
SERVICE_LINKS = {
    "ACME_SERVICE_HOST": "10.96.0.12",
    "ACME_SERVICE_PORT": "80",
    "ACME_SERVICE_PORT_HTTP": "80",
    "ACME_PORT": "tcp://10.96.0.12:80",
    "ACME_PORT_80_TCP": "tcp://10.96.0.12:80",
    "ACME_PORT_80_TCP_PROTO": "tcp",
    "ACME_PORT_80_TCP_PORT": "80",
    "ACME_PORT_80_TCP_ADDR": "10.96.0.12",
    "AUTH_SERVICE_HOST": "fd00::1:2",
    "AUTH_PORT": "tcp://[fd00::1:2]:5001",
    "AUTH_PORT_5001_UDP_ADDR": "fd00::1:2",
    "ACME_HTTP_SERVICE_HOST": "10.96.0.13",
    "ACME_HTTP_PORT": "tcp://10.96.0.13:8080",
    "REGISTRY_HTTP_PORT": "tcp://10.96.0.14:443",
    "REGISTRY_HTTP_SERVICE_HOST": "10.96.0.14",
}


def test_kubernetes_service_links_are_ignored():
    s = load_settings({**BASE, **SERVICE_LINKS})
    assert s.http_port == 80  # ACME_HTTP_PORT=tcp://... is a Service link, not a port
    assert not any(name.startswith("REGISTRY_HTTP") for name in s.registry_env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ACME_PORT", "80"),  # a typo for ACME_HTTP_PORT, not a Service link
        ("ACME_SERVICE_HOST", "registry.example.com"),
        ("ACME_PORT_80_TCP_PROTO", "http"),
        ("AUTH_SERVICE_PORTS", "80"),
    ],
)
def test_lookalikes_of_service_links_are_still_refused(name, value):
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, name: value})
    assert error.value.variable == name


def test_a_port_that_is_not_a_link_is_still_checked():
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "ACME_HTTP_PORT": "tcp://x"})
    assert error.value.variable == "ACME_HTTP_PORT"


DNS01 = {
    "ACME_CHALLENGE": "dns-01",
    "DNS_PROVIDER": "exec",
    "DNS_EXEC_COMMAND": "/bin/true",
}


def test_wildcard_with_a_dns_challenge_is_accepted():
    s = load_settings({**BASE, **DNS01, "ACME_DOMAINS": "example.com,*.example.com"})
    assert s.domains == ("example.com", "*.example.com")
    assert s.challenge == "dns-01"
    assert s.dns is not None and s.dns.provider is not None


def test_wildcard_with_http01_names_the_challenge():
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "ACME_DOMAINS": "*.example.com"})
    assert error.value.variable == "ACME_DOMAINS" and "ACME_CHALLENGE" in str(error.value)


def test_ip_addresses_with_http01_are_kept_in_canonical_form():
    s = load_settings({**BASE, "ACME_DOMAINS": "127.0.0.1, [::1], 2001:DB8:0:0::7"})
    assert s.domains == ("127.0.0.1", "::1", "2001:db8::7")
    assert s.ip_addresses == s.domains
    assert s.challenge == "http-01"


def test_an_ip_address_with_a_dns_challenge_is_refused():
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, **DNS01, "ACME_DOMAINS": "example.com,192.0.2.7"})
    assert error.value.variable == "ACME_DOMAINS" and "IP address" in str(error.value)


def test_an_unknown_dns_variable_is_refused_with_a_hint():
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, **DNS01, "DNS_PROPAGATION_TIMOUT": "10"})
    assert error.value.variable == "DNS_PROPAGATION_TIMOUT"
    assert "did you mean DNS_PROPAGATION_TIMEOUT" in str(error.value)


def test_acme_challenge_is_a_known_acme_variable():
    s = load_settings({**BASE, "ACME_CHALLENGE": "dns-persist-01", "ACME_DOMAINS": "*.a.example"})
    assert s.challenge == "dns-persist-01" and s.dns is not None and s.dns.provider is None


def test_http_port_off_only_with_a_dns_challenge():
    assert load_settings({**BASE, **DNS01, "ACME_HTTP_PORT": "off"}).http_port == 0
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "ACME_HTTP_PORT": "off"})
    assert error.value.variable == "ACME_HTTP_PORT"


# -- AUTH_MODE=token -------------------------------------------------------------------------

TOKEN = {**BASE, "AUTH_MODE": "token"}


def test_token_mode_settings():
    s = load_settings({**TOKEN, "AUTH_ANONYMOUS_PULL": "public/*", "TOKEN_TTL": "10m"})
    assert s.auth_mode == "token" and s.token is not None
    assert s.token.realm == "https://registry.example.com:5001/token"
    assert s.token.service == "registry.example.com"
    assert s.token.anonymous_pull == ("public/*",)
    assert s.token.ttl == 600
    assert load_settings(BASE).token is None


def test_token_variables_are_known_to_config():
    from acme_registry import config, tokenconfig

    assert set(tokenconfig.KNOWN_VARIABLES) <= set(config.KNOWN_VARIABLES)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({**TOKEN, "TOKEN_ADRR": ":5001"}, "TOKEN_ADRR"),
        ({**TOKEN, "REGISTRY_AUTH_TOKEN_REALM": "https://x/token"}, "REGISTRY_AUTH_TOKEN_REALM"),
        ({**TOKEN, "TOKEN_ADDR": ":443"}, "TOKEN_ADDR"),
        ({**TOKEN, "AUTH_ANONYMOUS_PULL": "Public/*"}, "AUTH_ANONYMOUS_PULL"),
        ({**TOKEN, "AUTH_POLICY_FILE": "relative.yml"}, "AUTH_POLICY_FILE"),
        ({**TOKEN, "AUTH_POLICY_FILE": "/nonexistent/policy.yml"}, "AUTH_POLICY_FILE"),
        ({**BASE, "AUTH_ANONYMOUS_PULL": "public/*"}, "AUTH_ANONYMOUS_PULL"),
        ({**BASE, "TOKEN_TYPO": "1"}, "TOKEN_TYPO"),
    ],
)
def test_token_mode_bad_input_names_the_setting(env, variable):
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert error.value.variable == variable
    assert "\n" not in str(error.value)


def test_a_bad_policy_file_is_named_with_its_line(tmp_path):
    policy = tmp_path / "policy.yml"
    policy.write_text("users:\n  ci:\n    pull: ['Team/*']\n")
    with pytest.raises(ConfigError) as error:
        load_settings({**TOKEN, "AUTH_POLICY_FILE": str(policy)})
    assert error.value.variable == "AUTH_POLICY_FILE"
    assert f"{policy}:3" in str(error.value)
    policy.write_text("users:\n  ci:\n    push: ['team/*']\n")
    assert load_settings({**TOKEN, "AUTH_POLICY_FILE": str(policy)}).token is not None


def test_token_variables_of_kubernetes_service_links_are_ignored():
    # A Service named "token" injects TOKEN_PORT=tcp://...: not a setting of ours.
    s = load_settings({**TOKEN, "TOKEN_PORT": "tcp://10.96.0.9:5001"})
    assert s.token is not None and s.token.addr.port == 5001
