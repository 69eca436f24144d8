import base64
from pathlib import Path

import dns.tsig
import pytest

from acme_registry.config import ConfigError
from acme_registry.dnsconfig import (
    DEFAULT_PROPAGATION_TIMEOUT,
    KNOWN_VARIABLES,
    DnsSettings,
    ExecSettings,
    HostPort,
    Rfc2136Settings,
    check_names,
    load_dns_settings,
    reject_unknown_dns_variables,
)

SECRET = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
RFC2136 = {
    "ACME_CHALLENGE": "dns-01",
    "DNS_PROVIDER": "rfc2136",
    "DNS_RFC2136_SERVER": "127.0.0.1",
    "DNS_RFC2136_TSIG_KEY_NAME": "acme-key.",
    "DNS_RFC2136_TSIG_SECRET": SECRET,
}


def refused(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        load_dns_settings(env)
    message = str(error.value)
    assert "\n" not in message
    assert SECRET not in message
    return error.value


def test_http01_is_the_default_and_needs_nothing():
    assert load_dns_settings({}) == DnsSettings()
    assert not DnsSettings().uses_dns


def test_rfc2136_defaults():
    s = load_dns_settings(RFC2136)
    assert s.challenge == "dns-01" and s.uses_dns
    assert s.provider == Rfc2136Settings(
        server=HostPort("127.0.0.1", 53), key_name="acme-key", secret=SECRET
    )
    assert isinstance(s.provider, Rfc2136Settings)
    assert s.provider.algorithm_name == dns.tsig.HMAC_SHA256
    assert s.provider.zone is None
    assert s.propagation.check == "authoritative"
    assert s.propagation.resolvers == ()
    assert s.propagation.timeout == DEFAULT_PROPAGATION_TIMEOUT
    assert SECRET not in repr(s)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ns1.example.com", HostPort("ns1.example.com", 53)),
        ("ns1.example.com:5353", HostPort("ns1.example.com", 5353)),
        ("192.0.2.1:53", HostPort("192.0.2.1", 53)),
        ("[2001:db8::1]:5353", HostPort("2001:db8::1", 5353)),
        ("[2001:db8::1]", HostPort("2001:db8::1", 53)),
        ("2001:db8::1", HostPort("2001:db8::1", 53)),
    ],
)
def test_rfc2136_server_forms(raw, expected):
    s = load_dns_settings({**RFC2136, "DNS_RFC2136_SERVER": raw})
    assert isinstance(s.provider, Rfc2136Settings)
    assert s.provider.server == expected


def test_host_port_prints_ipv6_in_brackets():
    assert str(HostPort("2001:db8::1", 53)) == "[2001:db8::1]:53"
    assert str(HostPort("127.0.0.1", 5353)) == "127.0.0.1:5353"


@pytest.mark.parametrize(
    "raw", ["[2001:db8::1", "[2001:db8::1]x", "[192.0.2.1]:53", "host:0", "host:99999", "a..b"]
)
def test_rfc2136_server_refused(raw):
    assert refused({**RFC2136, "DNS_RFC2136_SERVER": raw}).variable == "DNS_RFC2136_SERVER"


def test_rfc2136_algorithm_and_zone():
    env = {**RFC2136, "DNS_RFC2136_TSIG_ALGORITHM": "HMAC-SHA512", "DNS_RFC2136_ZONE": "Ex.Test."}
    s = load_dns_settings(env)
    assert isinstance(s.provider, Rfc2136Settings)
    assert s.provider.algorithm == "hmac-sha512"
    assert s.provider.algorithm_name == dns.tsig.HMAC_SHA512
    assert s.provider.zone == "ex.test"
    md5 = load_dns_settings({**RFC2136, "DNS_RFC2136_TSIG_ALGORITHM": "hmac-md5.sig-alg.reg.int"})
    assert isinstance(md5.provider, Rfc2136Settings)
    assert md5.provider.algorithm_name == dns.tsig.HMAC_MD5


def test_unknown_algorithm():
    error = refused({**RFC2136, "DNS_RFC2136_TSIG_ALGORITHM": "hmac-sha3"})
    assert error.variable == "DNS_RFC2136_TSIG_ALGORITHM"
    assert "hmac-sha256" in error.problem


def test_bad_zone():
    assert refused({**RFC2136, "DNS_RFC2136_ZONE": "bad zone"}).variable == "DNS_RFC2136_ZONE"


@pytest.mark.parametrize(
    "missing", ["DNS_RFC2136_SERVER", "DNS_RFC2136_TSIG_KEY_NAME", "DNS_RFC2136_TSIG_SECRET"]
)
def test_rfc2136_required_settings(missing):
    env = dict(RFC2136)
    del env[missing]
    error = refused(env)
    assert error.variable == missing
    assert "required" in error.problem


def test_bad_key_name():
    error = refused({**RFC2136, "DNS_RFC2136_TSIG_KEY_NAME": "a key"})
    assert error.variable == "DNS_RFC2136_TSIG_KEY_NAME"


@pytest.mark.parametrize("secret", ["not base64!", "abc", "YWJj=x"])
def test_secret_not_base64_is_refused_without_echo(secret):
    with pytest.raises(ConfigError) as error:
        load_dns_settings({**RFC2136, "DNS_RFC2136_TSIG_SECRET": secret})
    assert error.value.variable == "DNS_RFC2136_TSIG_SECRET"
    assert "base64" in error.value.problem
    assert secret not in str(error.value)


def test_secret_file(tmp_path: Path):
    secret_file = tmp_path / "tsig"
    secret_file.write_text(SECRET + "\n")
    env = {k: v for k, v in RFC2136.items() if k != "DNS_RFC2136_TSIG_SECRET"}
    s = load_dns_settings({**env, "DNS_RFC2136_TSIG_SECRET_FILE": str(secret_file)})
    assert isinstance(s.provider, Rfc2136Settings)
    assert s.provider.secret == SECRET


def test_secret_file_problems(tmp_path: Path):
    env = {k: v for k, v in RFC2136.items() if k != "DNS_RFC2136_TSIG_SECRET"}
    variable = "DNS_RFC2136_TSIG_SECRET_FILE"
    assert refused({**env, variable: str(tmp_path / "absent")}).variable == variable
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "empty" in refused({**env, variable: str(empty)}).problem
    bad = tmp_path / "bad"
    bad.write_text("secret with spaces")
    assert "base64" in refused({**env, variable: str(bad)}).problem
    both = refused({**RFC2136, variable: str(bad)})
    assert both.variable == variable and "not both" in both.problem


def test_exec_provider(tmp_path: Path):
    script = tmp_path / "hook"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    s = load_dns_settings(
        {"ACME_CHALLENGE": "dns-01", "DNS_PROVIDER": "exec", "DNS_EXEC_COMMAND": str(script)}
    )
    assert s.provider == ExecSettings(command=script)


def test_exec_command_found_on_path(tmp_path: Path):
    script = tmp_path / "dns-hook"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    env = {"ACME_CHALLENGE": "dns-01", "DNS_PROVIDER": "exec", "DNS_EXEC_COMMAND": "dns-hook"}
    s = load_dns_settings({**env, "PATH": str(tmp_path)})
    assert s.provider == ExecSettings(command=script)


def test_exec_command_problems(tmp_path: Path):
    env = {"ACME_CHALLENGE": "dns-01", "DNS_PROVIDER": "exec"}
    assert refused(env).variable == "DNS_EXEC_COMMAND"
    not_executable = tmp_path / "hook"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    error = refused({**env, "DNS_EXEC_COMMAND": str(not_executable)})
    assert error.variable == "DNS_EXEC_COMMAND" and "executable" in error.problem
    error = refused({**env, "DNS_EXEC_COMMAND": "no-such-hook", "PATH": str(tmp_path)})
    assert error.variable == "DNS_EXEC_COMMAND"
    assert refused({**env, "DNS_EXEC_COMMAND": str(tmp_path)}).variable == "DNS_EXEC_COMMAND"


def test_settings_of_the_other_provider_are_refused(tmp_path: Path):
    error = refused({**RFC2136, "DNS_EXEC_COMMAND": "/bin/true"})
    assert error.variable == "DNS_EXEC_COMMAND"
    env = {"ACME_CHALLENGE": "dns-01", "DNS_PROVIDER": "exec", "DNS_EXEC_COMMAND": "/bin/true"}
    error = refused({**env, "DNS_RFC2136_TSIG_SECRET": SECRET})
    assert error.variable == "DNS_RFC2136_TSIG_SECRET"


def test_unknown_challenge_and_provider():
    assert refused({"ACME_CHALLENGE": "tls-alpn-01"}).variable == "ACME_CHALLENGE"
    assert refused({**RFC2136, "DNS_PROVIDER": "route53"}).variable == "DNS_PROVIDER"
    error = refused({"ACME_CHALLENGE": "dns-01"})
    assert error.variable == "DNS_PROVIDER" and "required" in error.problem


def test_dns_settings_with_http01_are_refused():
    for variable in ("DNS_PROVIDER", "DNS_RESOLVERS", "ACME_DNS_PERSIST_ISSUER"):
        error = refused({variable: "x"})
        assert error.variable == variable and "http-01" in error.problem


def test_dns_persist_needs_no_credentials_and_refuses_them():
    s = load_dns_settings(
        {"ACME_CHALLENGE": "dns-persist-01", "ACME_DNS_PERSIST_ISSUER": "CA.Example."}
    )
    assert s.provider is None and s.persist_issuer == "ca.example" and s.uses_dns
    error = refused({**RFC2136, "ACME_CHALLENGE": "dns-persist-01"})
    assert error.variable == "DNS_PROVIDER"
    assert "dns-persist-01" in error.problem


def test_persist_issuer_problems():
    env = {"ACME_CHALLENGE": "dns-persist-01", "ACME_DNS_PERSIST_ISSUER": "not a name"}
    assert refused(env).variable == "ACME_DNS_PERSIST_ISSUER"
    error = refused({**RFC2136, "ACME_DNS_PERSIST_ISSUER": "ca.example"})
    assert error.variable == "ACME_DNS_PERSIST_ISSUER" and "dns-01" in error.problem


def test_propagation_settings():
    s = load_dns_settings(
        {
            **RFC2136,
            "DNS_PROPAGATION_CHECK": "Resolvers",
            "DNS_RESOLVERS": "192.0.2.53, 192.0.2.54:5353,[2001:db8::53]:53, 2001:db8::54",
            "DNS_PROPAGATION_TIMEOUT": "2m",
        }
    )
    assert s.propagation.check == "resolvers"
    assert s.propagation.resolvers == (
        HostPort("192.0.2.53", 53),
        HostPort("192.0.2.54", 5353),
        HostPort("2001:db8::53", 53),
        HostPort("2001:db8::54", 53),
    )
    assert s.propagation.timeout == 120
    off = load_dns_settings({**RFC2136, "DNS_PROPAGATION_CHECK": "off"})
    assert off.propagation.check == "off"
    assert load_dns_settings({**RFC2136, "DNS_PROPAGATION_TIMEOUT": "45"}).propagation.timeout == 45


def test_resolvers_mode_needs_resolvers():
    error = refused({**RFC2136, "DNS_PROPAGATION_CHECK": "resolvers"})
    assert error.variable == "DNS_RESOLVERS" and "required" in error.problem


@pytest.mark.parametrize(
    "raw", ["ns.example.com", "192.0.2.1,,192.0.2.2", "192.0.2.1:0", "[::1", "1.1.1.1,1.1.1.1"]
)
def test_resolvers_refused(raw):
    assert refused({**RFC2136, "DNS_RESOLVERS": raw}).variable == "DNS_RESOLVERS"


@pytest.mark.parametrize("raw", ["0", "soon", "-5", "3601", "2h"])
def test_propagation_timeout_refused(raw):
    assert refused({**RFC2136, "DNS_PROPAGATION_TIMEOUT": raw}).variable == (
        "DNS_PROPAGATION_TIMEOUT"
    )


def test_unknown_propagation_check():
    assert refused({**RFC2136, "DNS_PROPAGATION_CHECK": "dig"}).variable == (
        "DNS_PROPAGATION_CHECK"
    )


def test_unknown_dns_variables_are_refused_with_a_hint():
    reject_unknown_dns_variables({**RFC2136, "PATH": "/bin", "DNSMASQ_OPTS": "x"})
    with pytest.raises(ConfigError) as error:
        reject_unknown_dns_variables({"DNS_RFC2136_TSIG_SECRT": "x"})
    assert error.value.variable == "DNS_RFC2136_TSIG_SECRT"
    assert "did you mean DNS_RFC2136_TSIG_SECRET?" in error.value.problem


def test_kubernetes_service_links_for_a_service_named_dns_pass():
    reject_unknown_dns_variables(
        {
            "DNS_SERVICE_HOST": "10.0.0.10",
            "DNS_SERVICE_PORT": "53",
            "DNS_PORT": "udp://10.0.0.10:53",
            "DNS_PORT_53_UDP_ADDR": "10.0.0.10",
        }
    )
    with pytest.raises(ConfigError):
        reject_unknown_dns_variables({"DNS_PORT": "53"})


def test_known_variables_are_the_issue_names():
    assert "ACME_CHALLENGE" in KNOWN_VARIABLES and "DNS_RESOLVERS" in KNOWN_VARIABLES
    assert all(v.startswith(("ACME_", "DNS_")) for v in KNOWN_VARIABLES)


def test_names_wildcards_need_a_dns_challenge():
    check_names(["example.com", "*.example.com"], "dns-01")
    check_names(["*.example.com"], "dns-persist-01")
    with pytest.raises(ConfigError) as error:
        check_names(["example.com", "*.example.com"], "http-01")
    assert error.value.variable == "ACME_DOMAINS" and "ACME_CHALLENGE" in error.value.problem


@pytest.mark.parametrize("name", ["*.*.example.com", "a.*.example.com", "*example.com", "*.com"])
def test_names_malformed_wildcards(name):
    with pytest.raises(ConfigError) as error:
        check_names([name], "dns-01")
    assert error.value.variable == "ACME_DOMAINS"


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "2001:db8::1"])
def test_names_ip_only_with_http01(ip):
    check_names([ip, "example.com"], "http-01")
    for challenge in ("dns-01", "dns-persist-01"):
        with pytest.raises(ConfigError) as error:
            check_names([ip], challenge)
        assert error.value.variable == "ACME_DOMAINS" and "IP address" in error.value.problem
