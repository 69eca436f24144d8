"""DNS validation settings (dns-01, dns-persist-01) from an environment mapping.

Pure: :func:`load_dns_settings` reads a mapping, touches no network, and either returns a
frozen :class:`DnsSettings` or raises :class:`~acme_registry.config.ConfigError` naming the
variable at fault. The TSIG secret is never part of a message or a ``repr``.

:func:`check_names` holds the rules that tie ``ACME_DOMAINS`` to the challenge type
(wildcards need a DNS challenge; an IP address cannot be proven through DNS).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.tsig

from .config import ConfigError, reject_unknown_variables
from .names import DNS_LABEL, HOST_LABEL, is_dns_name, is_ip

HTTP_01 = "http-01"
DNS_01 = "dns-01"
DNS_PERSIST_01 = "dns-persist-01"
CHALLENGES = (HTTP_01, DNS_01, DNS_PERSIST_01)
DNS_CHALLENGES = (DNS_01, DNS_PERSIST_01)

RFC2136 = "rfc2136"
EXEC = "exec"
PROVIDERS = (RFC2136, EXEC)

AUTHORITATIVE = "authoritative"
RESOLVERS = "resolvers"
OFF = "off"
PROPAGATION_CHECKS = (AUTHORITATIVE, RESOLVERS, OFF)

DEFAULT_PROPAGATION_TIMEOUT = 120.0
MAX_PROPAGATION_TIMEOUT = 3600.0
DNS_PORT = 53

# dnspython's names for the TSIG algorithms it implements (dns.tsig), keyed by the spelling
# an operator writes (BIND's key files say "hmac-sha256"; hmac-md5 has a legacy long name).
TSIG_ALGORITHMS: Mapping[str, dns.name.Name] = {
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha256-128": dns.tsig.HMAC_SHA256_128,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha384-192": dns.tsig.HMAC_SHA384_192,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha512-256": dns.tsig.HMAC_SHA512_256,
    "hmac-md5": dns.tsig.HMAC_MD5,
    "hmac-md5.sig-alg.reg.int": dns.tsig.HMAC_MD5,
}
DEFAULT_TSIG_ALGORITHM = "hmac-sha256"

# Every variable this module reads. config's unknown-setting check must accept these and
# refuse any other DNS_* name (see reject_unknown_dns_variables).
KNOWN_VARIABLES = (
    "ACME_CHALLENGE",
    "ACME_DNS_PERSIST_ISSUER",
    "DNS_PROVIDER",
    "DNS_RFC2136_SERVER",
    "DNS_RFC2136_TSIG_KEY_NAME",
    "DNS_RFC2136_TSIG_SECRET",
    "DNS_RFC2136_TSIG_SECRET_FILE",
    "DNS_RFC2136_TSIG_ALGORITHM",
    "DNS_RFC2136_ZONE",
    "DNS_EXEC_COMMAND",
    "DNS_PROPAGATION_CHECK",
    "DNS_RESOLVERS",
    "DNS_PROPAGATION_TIMEOUT",
)
DNS_PREFIX = "DNS_"

_RFC2136_VARIABLES = tuple(v for v in KNOWN_VARIABLES if v.startswith("DNS_RFC2136_"))
_EXEC_VARIABLES = ("DNS_EXEC_COMMAND",)
_PROVIDER_VARIABLES = ("DNS_PROVIDER", *_RFC2136_VARIABLES, *_EXEC_VARIABLES)
_PROPAGATION_VARIABLES = ("DNS_PROPAGATION_CHECK", "DNS_RESOLVERS", "DNS_PROPAGATION_TIMEOUT")

_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m)?$")


@dataclass(frozen=True)
class HostPort:
    """A DNS server address: an IP address or host name, and a port."""

    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Rfc2136Settings:
    """Dynamic updates (RFC 2136) signed with TSIG."""

    server: HostPort
    key_name: str
    # base64 as BIND's tsig-keygen prints it; checked to decode. Never shown.
    secret: str = field(repr=False)
    algorithm: str = DEFAULT_TSIG_ALGORITHM
    # None: found from the SOA at update time.
    zone: str | None = None

    @property
    def algorithm_name(self) -> dns.name.Name:
        """The algorithm as dnspython names it, for dns.tsig / dns.update."""
        return TSIG_ALGORITHMS[self.algorithm]


@dataclass(frozen=True)
class ExecSettings:
    """An operator's program run as ``COMMAND present|cleanup <fqdn> <value>``."""

    command: Path


@dataclass(frozen=True)
class PropagationSettings:
    """How the agent checks that a TXT record is visible before asking the CA to validate."""

    check: str = AUTHORITATIVE
    # When set, every lookup the agent makes (SOA, NS, addresses, TXT) goes to these.
    resolvers: tuple[HostPort, ...] = ()
    timeout: float = DEFAULT_PROPAGATION_TIMEOUT


@dataclass(frozen=True)
class DnsSettings:
    challenge: str = HTTP_01
    # Only with dns-01: dns-persist-01 needs no DNS credentials at all.
    provider: Rfc2136Settings | ExecSettings | None = None
    propagation: PropagationSettings = field(default_factory=PropagationSettings)
    # The issuer domain name for dns-persist-01 when the CA's directory names none.
    persist_issuer: str | None = None

    @property
    def uses_dns(self) -> bool:
        return self.challenge in DNS_CHALLENGES


def load_dns_settings(env: Mapping[str, str]) -> DnsSettings:
    """Validate the DNS settings in ``env`` (already stripped of Kubernetes Service links)."""
    challenge = _choice(env, "ACME_CHALLENGE", CHALLENGES, HTTP_01)
    if challenge == HTTP_01:
        _refuse_set(env, (*_PROVIDER_VARIABLES, *_PROPAGATION_VARIABLES), "with ACME_CHALLENGE=")
        _refuse_set(env, ("ACME_DNS_PERSIST_ISSUER",), "with ACME_CHALLENGE=")
        return DnsSettings()
    provider: Rfc2136Settings | ExecSettings | None = None
    if challenge == DNS_01:
        _refuse_set(env, ("ACME_DNS_PERSIST_ISSUER",), "with ACME_CHALLENGE=")
        provider = _provider(env)
    else:
        # The point of dns-persist-01: renewals with no DNS credentials in the container.
        for name in _PROVIDER_VARIABLES:
            if _value(env, name):
                raise ConfigError(name, "not used with ACME_CHALLENGE=dns-persist-01 (unset it)")
    return DnsSettings(
        challenge=challenge,
        provider=provider,
        propagation=_propagation(env),
        persist_issuer=_persist_issuer(env),
    )


def reject_unknown_dns_variables(env: Mapping[str, str]) -> None:
    """Refuse a DNS_* name this program does not read (a typo would otherwise be ignored).

    Kubernetes injects DNS_SERVICE_HOST, DNS_PORT=tcp://... for a Service named "dns":
    those shapes are let through, as config does for ACME_*.
    """
    reject_unknown_variables(env, DNS_PREFIX, KNOWN_VARIABLES)


def check_names(names: Sequence[str], challenge: str) -> None:
    """The ACME_DOMAINS rules that depend on the challenge type.

    ``names`` are already lower-cased and stripped of a trailing dot. A wildcard
    (``*.example.com``: one leading ``*`` label, nothing else) can only be proven through DNS;
    an IP address never through DNS.
    """
    dns_challenge = challenge in DNS_CHALLENGES
    for name in names:
        if is_ip(name):
            if dns_challenge:
                raise ConfigError(
                    "ACME_DOMAINS",
                    f"{name!r} is an IP address; {challenge} cannot prove it (use http-01)",
                )
            continue
        if "*" in name:
            if not name.startswith("*.") or "*" in name[2:]:
                raise ConfigError(
                    "ACME_DOMAINS", f"{name!r}: a wildcard is one leading '*.' label only"
                )
            if not dns_challenge:
                raise ConfigError(
                    "ACME_DOMAINS",
                    f"{name!r} is a wildcard; {challenge} cannot prove it "
                    "(set ACME_CHALLENGE=dns-01 or dns-persist-01)",
                )
            base = name[2:]
            labels = base.split(".")
            if len(labels) < 2 or not all(HOST_LABEL.fullmatch(x) for x in labels):
                raise ConfigError("ACME_DOMAINS", f"{name!r} is not a valid wildcard name")


# -- parts ---------------------------------------------------------------------------------


def _value(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _refuse_set(env: Mapping[str, str], names: Sequence[str], context: str) -> None:
    challenge = _value(env, "ACME_CHALLENGE") or HTTP_01
    for name in names:
        if _value(env, name):
            raise ConfigError(name, f"not used {context}{challenge} (unset it)")


def _choice(env: Mapping[str, str], variable: str, choices: Sequence[str], default: str) -> str:
    value = _value(env, variable).lower() or default
    if value not in choices:
        raise ConfigError(variable, f"{value!r} is not one of: {', '.join(choices)}")
    return value


def _provider(env: Mapping[str, str]) -> Rfc2136Settings | ExecSettings:
    if not _value(env, "DNS_PROVIDER"):
        raise ConfigError(
            "DNS_PROVIDER", f"required with ACME_CHALLENGE=dns-01: one of {', '.join(PROVIDERS)}"
        )
    provider = _choice(env, "DNS_PROVIDER", PROVIDERS, RFC2136)
    other = _EXEC_VARIABLES if provider == RFC2136 else _RFC2136_VARIABLES
    for name in other:
        if _value(env, name):
            raise ConfigError(name, f"not used with DNS_PROVIDER={provider} (unset it)")
    if provider == RFC2136:
        return _rfc2136(env)
    return ExecSettings(command=_exec_command(env))


def _rfc2136(env: Mapping[str, str]) -> Rfc2136Settings:
    raw_server = _value(env, "DNS_RFC2136_SERVER")
    if not raw_server:
        raise ConfigError("DNS_RFC2136_SERVER", "required with DNS_PROVIDER=rfc2136")
    server = _host_port("DNS_RFC2136_SERVER", raw_server, allow_names=True)
    key_name = _value(env, "DNS_RFC2136_TSIG_KEY_NAME").lower().rstrip(".")
    if not key_name:
        raise ConfigError("DNS_RFC2136_TSIG_KEY_NAME", "required with DNS_PROVIDER=rfc2136")
    if not is_dns_name(key_name, labels=DNS_LABEL):
        raise ConfigError("DNS_RFC2136_TSIG_KEY_NAME", f"{key_name!r} is not a valid key name")
    algorithm = _value(env, "DNS_RFC2136_TSIG_ALGORITHM").lower().rstrip(".")
    algorithm = algorithm or DEFAULT_TSIG_ALGORITHM
    if algorithm not in TSIG_ALGORITHMS:
        known = ", ".join(a for a in TSIG_ALGORITHMS if "." not in a)
        raise ConfigError("DNS_RFC2136_TSIG_ALGORITHM", f"{algorithm!r} is not one of: {known}")
    if algorithm == "hmac-md5.sig-alg.reg.int":
        algorithm = "hmac-md5"
    zone = _value(env, "DNS_RFC2136_ZONE").lower().rstrip(".") or None
    if zone is not None and not is_dns_name(zone, labels=DNS_LABEL):
        raise ConfigError("DNS_RFC2136_ZONE", f"{zone!r} is not a valid DNS name")
    return Rfc2136Settings(
        server=server,
        key_name=key_name,
        secret=_tsig_secret(env),
        algorithm=algorithm,
        zone=zone,
    )


def _tsig_secret(env: Mapping[str, str]) -> str:
    secret = _value(env, "DNS_RFC2136_TSIG_SECRET")
    secret_file = _value(env, "DNS_RFC2136_TSIG_SECRET_FILE")
    if secret and secret_file:
        raise ConfigError(
            "DNS_RFC2136_TSIG_SECRET_FILE", "set either it or DNS_RFC2136_TSIG_SECRET, not both"
        )
    source = "DNS_RFC2136_TSIG_SECRET"
    if secret_file:
        source = "DNS_RFC2136_TSIG_SECRET_FILE"
        path = Path(secret_file)
        if not path.is_file():
            raise ConfigError(source, f"{secret_file} is not a file")
        try:
            secret = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not text"
            raise ConfigError(source, f"{secret_file} cannot be read ({reason})") from None
        if not secret:
            raise ConfigError(source, f"{secret_file} is empty")
    if not secret:
        raise ConfigError(
            "DNS_RFC2136_TSIG_SECRET",
            "required with DNS_PROVIDER=rfc2136 (or DNS_RFC2136_TSIG_SECRET_FILE)",
        )
    # Never echo the secret: say only what is wrong with it.
    try:
        decoded = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(source, "is not base64 (as tsig-keygen prints it)") from None
    if not decoded:
        raise ConfigError(source, "is empty once decoded")
    return secret


def _exec_command(env: Mapping[str, str]) -> Path:
    raw = _value(env, "DNS_EXEC_COMMAND")
    if not raw:
        raise ConfigError("DNS_EXEC_COMMAND", "required with DNS_PROVIDER=exec")
    found = raw if "/" in raw else shutil.which(raw, path=env.get("PATH", os.defpath))
    if found is None:
        raise ConfigError("DNS_EXEC_COMMAND", f"{raw} is not found on PATH")
    path = Path(found)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ConfigError("DNS_EXEC_COMMAND", f"{raw} is not an executable file")
    return path.absolute()


def _propagation(env: Mapping[str, str]) -> PropagationSettings:
    check = _choice(env, "DNS_PROPAGATION_CHECK", PROPAGATION_CHECKS, AUTHORITATIVE)
    resolvers = _resolvers(_value(env, "DNS_RESOLVERS"))
    if check == RESOLVERS and not resolvers:
        raise ConfigError("DNS_RESOLVERS", "required with DNS_PROPAGATION_CHECK=resolvers")
    return PropagationSettings(
        check=check,
        resolvers=resolvers,
        timeout=_timeout(_value(env, "DNS_PROPAGATION_TIMEOUT")),
    )


def _resolvers(raw: str) -> tuple[HostPort, ...]:
    if not raw:
        return ()
    servers: list[HostPort] = []
    for part in raw.split(","):
        text = part.strip()
        if not text:
            raise ConfigError("DNS_RESOLVERS", "empty entry in the list")
        # Resolvers are how names get resolved: they must be addresses themselves.
        server = _host_port("DNS_RESOLVERS", text, allow_names=False)
        if server in servers:
            raise ConfigError("DNS_RESOLVERS", f"{text!r} is listed twice")
        servers.append(server)
    return tuple(servers)


def _timeout(raw: str) -> float:
    if not raw:
        return DEFAULT_PROPAGATION_TIMEOUT
    match = _SECONDS.match(raw.lower())
    if not match:
        raise ConfigError("DNS_PROPAGATION_TIMEOUT", f"{raw!r} is not seconds such as 120 or 2m")
    seconds = float(match[1]) * (60 if match[2] == "m" else 1)
    if not 0 < seconds <= MAX_PROPAGATION_TIMEOUT:
        raise ConfigError(
            "DNS_PROPAGATION_TIMEOUT",
            f"{raw!r} is outside 1 s .. {int(MAX_PROPAGATION_TIMEOUT)} s",
        )
    return seconds


def _persist_issuer(env: Mapping[str, str]) -> str | None:
    issuer = _value(env, "ACME_DNS_PERSIST_ISSUER").lower().rstrip(".")
    if not issuer:
        return None
    if not is_dns_name(issuer, min_labels=2):
        raise ConfigError("ACME_DNS_PERSIST_ISSUER", f"{issuer!r} is not a domain name")
    return issuer


def _host_port(variable: str, raw: str, *, allow_names: bool) -> HostPort:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``; a bare IPv6 address has no port."""
    text = raw.strip()
    port = DNS_PORT
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(variable, f"{raw!r} has an unclosed '['")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(variable, f"{raw!r} is not [address]:port")
            port = _port(variable, raw, rest[1:])
        if not is_ip(host) or ":" not in host:
            raise ConfigError(variable, f"{host!r} in brackets is not an IPv6 address")
        return HostPort(str(ipaddress.ip_address(host)), port)
    if text.count(":") > 1:
        if not is_ip(text):
            raise ConfigError(variable, f"{raw!r} is not an address (IPv6 and a port: [addr]:port)")
        return HostPort(str(ipaddress.ip_address(text)), port)
    host, colon, port_text = text.partition(":")
    if colon:
        port = _port(variable, raw, port_text)
    if is_ip(host):
        return HostPort(host, port)
    if not allow_names:
        raise ConfigError(variable, f"{host!r} is not an IP address")
    name = host.lower().rstrip(".")
    if not is_dns_name(name):
        raise ConfigError(variable, f"{host!r} is neither an IP address nor a host name")
    return HostPort(name, port)


def _port(variable: str, raw: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(variable, f"{raw!r} has no valid port (1-65535)")
    return int(text)
