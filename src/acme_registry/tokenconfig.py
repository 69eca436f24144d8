"""Settings of ``AUTH_MODE=token`` and the registry's ``auth.token`` section. Pure.

:func:`load_token_settings` turns the environment into :class:`TokenSettings` or raises
:class:`~acme_registry.config.ConfigError` naming the variable; :func:`registry_token_config`
renders what the registry's config needs in token mode.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import ConfigError, ListenAddress, reject_unknown_variables
from .policy import PolicyError, parse_anonymous_pull
from .tokenrollover import KeyringTimes, parse_keyring_times

TOKEN_VARIABLES = ("TOKEN_ADDR", "TOKEN_REALM", "TOKEN_TTL", "TOKEN_PROXY_PROTOCOL")
# AUTH_* names of token mode: config's unknown-setting check must know them too.
AUTH_TOKEN_VARIABLES = ("AUTH_POLICY_FILE", "AUTH_ANONYMOUS_PULL")
KNOWN_VARIABLES = TOKEN_VARIABLES + AUTH_TOKEN_VARIABLES
# Internal (ACME_REGISTRY_* names are never documented): tests shorten the keyring's
# lifetimes with it, "LIFETIME,LEAD,GRACE" in seconds (tokenrollover.KeyringTimes).
KEYRING_TIMES_VARIABLE = "ACME_REGISTRY_TOKEN_KEYRING_TIMES"

DEFAULT_ADDR = ":5001"
DEFAULT_TTL = 300
MIN_TTL = 30
MAX_TTL = 24 * 3600
_TTL = re.compile(r"(\d{1,6})(s|m|h)?")
_TTL_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class TokenSettings:
    """Everything token mode reads from the environment."""

    addr: ListenAddress
    realm: str
    service: str  # the registry's auth.token.service and the tokens' aud
    issuer: str  # auth.token.issuer and the tokens' iss
    ttl: int  # seconds an access token lives
    proxy_protocol: bool
    policy_file: Path | None
    anonymous_pull: tuple[str, ...]
    keyring_times: KeyringTimes = field(default_factory=KeyringTimes)


def reject_unknown_token_variables(env: Mapping[str, str]) -> None:
    """TOKEN_* names we do not read are errors (Kubernetes' Service links aside)."""
    reject_unknown_variables(env, "TOKEN_", TOKEN_VARIABLES)


def load_token_settings(
    env: Mapping[str, str],
    domains: Sequence[str],
    taken_ports: Mapping[int, str] | None = None,
) -> TokenSettings:
    """Token mode's settings; ``domains`` is ACME_DOMAINS (or the served names).

    ``taken_ports`` maps ports of other listeners to what uses them (e.g. ``{443: "the
    registry"}``) when TOKEN_ADDR has no host, so a clash is a configuration error.
    """
    reject_unknown_token_variables(env)
    addr = _listen_address("TOKEN_ADDR", env.get("TOKEN_ADDR", "").strip() or DEFAULT_ADDR)
    for port, user in (taken_ports or {}).items():
        if port == addr.port:
            raise ConfigError("TOKEN_ADDR", f"port {port} is already used by {user}")
    name = first_name(domains)
    realm_text = env.get("TOKEN_REALM", "").strip()
    realm = _realm(realm_text) if realm_text else default_realm(name, addr.port)
    policy_text = env.get("AUTH_POLICY_FILE", "").strip()
    if policy_text and not Path(policy_text).is_absolute():
        raise ConfigError("AUTH_POLICY_FILE", f"{policy_text!r} is not an absolute path")
    anonymous_text = env.get("AUTH_ANONYMOUS_PULL", "").strip()
    try:
        anonymous = parse_anonymous_pull(anonymous_text) if anonymous_text else ()
    except PolicyError as exc:
        raise ConfigError("AUTH_ANONYMOUS_PULL", str(exc).partition(": ")[2]) from None
    times_text = env.get(KEYRING_TIMES_VARIABLE, "").strip()
    try:
        times = parse_keyring_times(times_text) if times_text else KeyringTimes()
    except ValueError as exc:
        raise ConfigError(KEYRING_TIMES_VARIABLE, str(exc)) from None
    return TokenSettings(
        addr=addr,
        realm=realm,
        service=name,
        issuer=f"acme-registry@{name}",
        ttl=_ttl(env.get("TOKEN_TTL", "").strip()),
        proxy_protocol=_boolean("TOKEN_PROXY_PROTOCOL", env.get("TOKEN_PROXY_PROTOCOL", "")),
        policy_file=Path(policy_text) if policy_text else None,
        anonymous_pull=anonymous,
        keyring_times=times,
    )


def first_name(domains: Sequence[str]) -> str:
    """The first name that is not a wildcard: the service and the default realm's host."""
    for domain in domains:
        if not domain.startswith("*."):
            return domain
    raise ConfigError("ACME_DOMAINS", "token mode needs one name that is not a wildcard")


def default_realm(name: str, port: int) -> str:
    host = f"[{name}]" if _is_ipv6(name) else name
    return f"https://{host}:{port}/token"


def registry_token_config(settings: TokenSettings, root_bundle: Path) -> dict[str, Any]:
    """The registry config keys of token mode, to merge (deeply) into its config.

    ``storage.delete.enabled`` is on because deleting is then a granted action; with
    htpasswd it would let every user delete.
    """
    return {
        "auth": {
            "token": {
                "realm": settings.realm,
                "service": settings.service,
                "issuer": settings.issuer,
                "rootcertbundle": str(root_bundle),
                "autoredirect": False,
            }
        },
        "storage": {"delete": {"enabled": True}},
    }


# -- parsing -----------------------------------------------------------------------------


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _listen_address(variable: str, raw: str) -> ListenAddress:
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        raise ConfigError(variable, f"{raw!r} is not host:port or :port")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise ConfigError(variable, f"{raw!r} has an unbalanced '['")
        host = host[1:-1]
        if not _is_ipv6(host):
            raise ConfigError(variable, f"{host!r} is not an IPv6 address")
    elif host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ConfigError(
                    variable, f"{host!r} is not an IP address (use :port for every address)"
                ) from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(variable, f"{port_text!r} is not a port number (1-65535)")
    return ListenAddress(host, int(port_text))


def _realm(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError("TOKEN_REALM", f"{text!r} is not an https:// URL")
    if any(c in text for c in ' "\\'):
        raise ConfigError("TOKEN_REALM", "a space, quote or backslash cannot be in the realm")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when asked)
    except ValueError:
        raise ConfigError("TOKEN_REALM", f"{text!r} has an invalid port") from None
    return text


def _ttl(text: str) -> int:
    if not text:
        return DEFAULT_TTL
    match = _TTL.fullmatch(text)
    if match is None:
        raise ConfigError("TOKEN_TTL", f"{text!r} is not a duration such as 300, 300s or 5m")
    seconds = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise ConfigError("TOKEN_TTL", f"{text!r} is outside {MIN_TTL} s to {MAX_TTL // 3600} h")
    return seconds


def _boolean(variable: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(variable, f"{text!r} is not true or false")
