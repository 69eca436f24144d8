"""Settings from the environment: the only module that reads ``os.environ``.

Everything here is pure: :func:`load_settings` takes a mapping and either returns
typed :class:`Settings` or raises :class:`ConfigError` naming the variable at fault.
Nothing is written and no network request is made before it has succeeded.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import difflib
import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .auth import Credential, UsersFormatError, load_env_users
from .names import is_dns_name, is_ip

if TYPE_CHECKING:
    from .dnsconfig import DnsSettings
    from .gcconfig import GcSettings
    from .stateconfig import StateSettings
    from .tokenconfig import TokenSettings

log = logging.getLogger(__name__)

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
DIRECTORY_ALIASES = {"letsencrypt": LETSENCRYPT, "letsencrypt-staging": LETSENCRYPT_STAGING}

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
AUTH_MODES = ("htpasswd", "none", "token")
# Modes in which the agent writes the registry's auth section (REGISTRY_AUTH* refused).
AGENT_AUTH_MODES = ("htpasswd", "token")
SOCKET_ACTIVATION_MODES = ("auto", "on", "off")

# The variables this program reads. Unknown ACME_* names are rejected so that a typo
# (ACME_DOMAIN) is an error at start instead of a silently ignored setting.
KNOWN_VARIABLES = (
    "ACME_DOMAINS",
    "ACME_EMAIL",
    "ACME_DIRECTORY",
    "ACME_CA_BUNDLE",
    "ACME_EAB_KID",
    "ACME_EAB_HMAC_KEY",
    "ACME_EAB_HMAC_KEY_FILE",
    "ACME_KEY_TYPE",
    "ACME_PROFILE",
    "ACME_DRY_RUN_DIRECTORY",
    "ACME_ENABLED",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "ACME_HTTP_PORT",
    "CERT_DIR",
    "DATA_DIR",
    "REGISTRY_HTTP_ADDR",
    "REGISTRY_BINARY",
    "REGISTRY_SOCKET_ACTIVATION",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "AUTH_MODE",
    "AUTH_USERS",
    "AUTH_USERS_FILE",
    "ADMIN_ADDR",
    # Token mode's (tokenconfig.KNOWN_VARIABLES): listed here because tokenconfig imports us.
    "TOKEN_ADDR",
    "TOKEN_REALM",
    "TOKEN_TTL",
    "TOKEN_PROXY_PROTOCOL",
    "AUTH_POLICY_FILE",
    "AUTH_ANONYMOUS_PULL",
)

# Registry settings the agent owns, as the registry's environment names them (it splits
# names on "_" and matches case-insensitively). The registry lets its environment win
# over its config file, so an operator value here would silently replace ours.
OWNED_REGISTRY_PREFIXES = (
    "REGISTRY_HTTP_TLS",
    "REGISTRY_HTTP_SECRET",
    "REGISTRY_HTTP_DEBUG",
    # The read-only switch of a garbage collection lives in this section.
    "REGISTRY_STORAGE_MAINTENANCE",
)
# Whole-section overrides that would replace the owned settings along with everything else.
OWNED_REGISTRY_SECTIONS = ("REGISTRY_HTTP",)
# Variables of ours that share the registry's prefix and are not passed to it.
OWN_REGISTRY_VARIABLES = ("REGISTRY_BINARY", "REGISTRY_SOCKET_ACTIVATION")

DEFAULT_DRAIN_SECONDS = 30
_GO_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)$")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


class ConfigError(ValueError):
    """A setting is missing or wrong. ``str()`` is the one line shown to the operator."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True)
class ListenAddress:
    """Where a server listens. ``host`` "" means every address, IPv6 and IPv4."""

    host: str
    port: int

    def connect_host(self) -> str:
        """The address a local client uses to reach this listener."""
        if self.host in ("", "::", "0.0.0.0"):
            return "127.0.0.1"
        return self.host


@dataclass(frozen=True)
class Settings:
    domains: tuple[str, ...]
    directory: str
    cert_dir: Path
    data_dir: Path
    # 0: no port-80 listener (ACME_HTTP_PORT=off, only with a DNS challenge).
    http_port: int
    registry_addr: ListenAddress
    registry_binary: Path
    key_type: str = "ec256"
    # auto, on or off: whether registry generations share the agent's listening socket.
    socket_activation: str = "auto"
    profile: str | None = None
    dry_run_directory: str = LETSENCRYPT_STAGING
    email: str | None = None
    ca_bundle: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    log_level: str = "info"
    log_format: str = "text"
    auth_mode: str = "htpasswd"
    auth_users: Mapping[str, Credential] = field(default_factory=dict, repr=False)
    admin_addr: ListenAddress = field(default_factory=lambda: ListenAddress("127.0.0.1", 9180))
    registry_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Bring-your-own certificate: with ACME off, the agent serves and watches these.
    acme_enabled: bool = True
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The longest wait between two ARI fetches (Let's Encrypt: at least twice a day).
    # Internal: tests shorten it with ACME_REGISTRY_ARI_MAX_RECHECK (seconds).
    ari_max_recheck: dt.timedelta = dt.timedelta(hours=12)
    # ACME_CHALLENGE and the DNS_* settings (dnsconfig.DnsSettings; None only when built
    # by hand, which means http-01).
    dns: DnsSettings | None = field(default=None, repr=False)

    @property
    def challenge(self) -> str:
        return self.dns.challenge if self.dns is not None else "http-01"

    @property
    def ip_addresses(self) -> tuple[str, ...]:
        """The IP addresses among the names (they are IP identifiers in the order)."""
        return tuple(name for name in self.domains if is_ip(name))

    # AUTH_MODE=token only: the token service and the registry's auth.token.
    token: TokenSettings | None = None
    # Retention, the collection schedule and its timeout (RETENTION_*, GC_*).
    gc: GcSettings = field(default_factory=lambda: _default_gc_settings())
    # Where the state replicas share lives (STATE_*): DATA_DIR, or a prefix of a bucket.
    state: StateSettings = field(default_factory=lambda: _default_state_settings())

    @property
    def directory_id(self) -> str:
        """A short stable name for the directory, for per-CA state on disk."""
        return hashlib.sha256(self.directory.encode()).hexdigest()[:16]

    @property
    def run_dir(self) -> Path:
        """Sockets and pid files of the running processes."""
        return self.data_dir / "run"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def registry_config_dir(self) -> Path:
        """registry-N.yml for registry generation N (0600: they hold http.secret)."""
        return self.data_dir / "registry"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Validate the environment into :class:`Settings`, or raise :class:`ConfigError`."""
    env = _without_service_links(os.environ if environ is None else environ)
    _reject_unknown_acme_variables(env)
    dns = _dns_settings(env)

    domains = _domains(env.get("ACME_DOMAINS", ""), dns.challenge)
    cert_dir = _absolute_dir(env, "CERT_DIR", "/certs")
    data_dir = _absolute_dir(env, "DATA_DIR", "/data")
    # A unix socket path must fit in sun_path (108 bytes on Linux).
    if len(str(data_dir / "run" / "supervisor.sock").encode()) > 100:
        raise ConfigError("DATA_DIR", f"{data_dir} is too long for a unix socket path inside it")
    eab_kid, eab_key = _eab(env)
    acme_enabled = _boolean(env, "ACME_ENABLED", True)
    tls_cert_file = _tls_file(env, "TLS_CERT_FILE", cert_dir / "domain.crt", acme_enabled)
    tls_key_file = _tls_file(env, "TLS_KEY_FILE", cert_dir / "domain.key", acme_enabled)
    auth_mode = _choice(env, "AUTH_MODE", AUTH_MODES, "htpasswd")
    auth_users = _auth_users(env, auth_mode)
    registry_env = _registry_env(env, cert_dir, owns_auth=auth_mode in AGENT_AUTH_MODES)
    registry_addr = _listen_address("REGISTRY_HTTP_ADDR", env.get("REGISTRY_HTTP_ADDR", ":443"))
    http_port = _http_port(env.get("ACME_HTTP_PORT", "80"), dns.challenge)
    admin_addr = _listen_address("ADMIN_ADDR", env.get("ADMIN_ADDR", "127.0.0.1:9180"))
    if admin_addr.port in (registry_addr.port, http_port):
        raise ConfigError("ADMIN_ADDR", f"port {admin_addr.port} is already used by the registry")
    token = _token_settings(env, auth_mode, domains, registry_addr, http_port, admin_addr)
    gc_settings = _gc_settings(env, registry_env)
    state = _state_settings(env)
    return Settings(
        domains=domains,
        email=_email(env.get("ACME_EMAIL", "").strip() or None),
        directory=_directory(env.get("ACME_DIRECTORY", "").strip() or "letsencrypt"),
        ca_bundle=_ca_bundle(env.get("ACME_CA_BUNDLE", "").strip() or None),
        eab_kid=eab_kid,
        eab_hmac_key=eab_key,
        key_type=_choice(env, "ACME_KEY_TYPE", KEY_TYPES, "ec256"),
        profile=_profile(env.get("ACME_PROFILE", "").strip() or None),
        dry_run_directory=_directory(
            env.get("ACME_DRY_RUN_DIRECTORY", "").strip() or "letsencrypt-staging",
            "ACME_DRY_RUN_DIRECTORY",
        ),
        http_port=http_port,
        cert_dir=cert_dir,
        data_dir=data_dir,
        registry_addr=registry_addr,
        registry_binary=_executable("REGISTRY_BINARY", _registry_binary(env)),
        socket_activation=_choice(
            env, "REGISTRY_SOCKET_ACTIVATION", SOCKET_ACTIVATION_MODES, "auto"
        ),
        drain_seconds=_duration(
            "REGISTRY_HTTP_DRAINTIMEOUT",
            env.get("REGISTRY_HTTP_DRAINTIMEOUT", f"{DEFAULT_DRAIN_SECONDS}s"),
        ),
        log_level=_choice(env, "LOG_LEVEL", LOG_LEVELS, "info"),
        log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS, "text"),
        auth_mode=auth_mode,
        auth_users=auth_users,
        admin_addr=admin_addr,
        registry_env=registry_env,
        acme_enabled=acme_enabled,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        ari_max_recheck=dt.timedelta(
            seconds=float(env.get("ACME_REGISTRY_ARI_MAX_RECHECK", "") or 12 * 3600)
        ),
        dns=dns,
        token=token,
        gc=gc_settings,
        state=state,
    )


def _token_settings(
    env: Mapping[str, str],
    auth_mode: str,
    domains: tuple[str, ...],
    registry_addr: ListenAddress,
    http_port: int,
    admin_addr: ListenAddress,
) -> TokenSettings | None:
    """Token mode's settings, its policy file parsed once so that a bad one stops the start.

    Outside token mode its variables are refused rather than ignored: an operator who set
    AUTH_ANONYMOUS_PULL expects anonymous pulls, not a registry refusing them.
    """
    from . import tokenconfig
    from .policy import PolicyError, parse_policy

    tokenconfig.reject_unknown_token_variables(env)
    if auth_mode != "token":
        for name in tokenconfig.KNOWN_VARIABLES:
            if env.get(name, "").strip():
                raise ConfigError(name, "set, but only used with AUTH_MODE=token")
        return None
    taken = {
        registry_addr.port: "the registry (REGISTRY_HTTP_ADDR)",
        http_port: "ACME_HTTP_PORT",
        admin_addr.port: "ADMIN_ADDR",
    }
    settings = tokenconfig.load_token_settings(env, domains, taken)
    if settings.policy_file is not None:
        path = settings.policy_file
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise ConfigError("AUTH_POLICY_FILE", f"cannot read {path} ({reason})") from None
        try:
            parse_policy(text, str(path))
        except PolicyError as error:
            # Already "FILE:LINE: problem", the file named as the setting is.
            raise ConfigError("AUTH_POLICY_FILE", str(error)) from None
    return settings


def _dns_settings(env: Mapping[str, str]) -> DnsSettings:
    # Imported here: dnsconfig imports ConfigError from this module.
    from . import dnsconfig

    dnsconfig.reject_unknown_dns_variables(env)
    return dnsconfig.load_dns_settings(env)


def known_variables() -> tuple[str, ...]:
    """Every variable this program reads, the DNS and state ones included."""
    from . import dnsconfig, stateconfig

    return KNOWN_VARIABLES + dnsconfig.KNOWN_VARIABLES + stateconfig.KNOWN_VARIABLES


def _state_settings(env: Mapping[str, str]) -> StateSettings:
    # Imported here: stateconfig imports ConfigError from this module.
    from .stateconfig import load_state_settings

    return load_state_settings(env)


def _default_state_settings() -> StateSettings:
    from .stateconfig import StateSettings

    return StateSettings()


# Kubernetes injects these for every Service in the namespace (a Service "acme" gives
# ACME_SERVICE_HOST, ACME_PORT=tcp://10.0.0.7:80, ...). They are matched by name *and* value,
# so that a typo such as ACME_PORT=80 is still refused as an unknown setting.
_LINK_ADDRESS = r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[?[0-9A-Fa-f:.]+\]?)"
_LINK_NUMBER = r"\d{1,5}"
_LINK_PROTO = r"(?:tcp|udp|sctp)"
_LINK_URL = rf"{_LINK_PROTO}://{_LINK_ADDRESS}:{_LINK_NUMBER}"
_SERVICE_LINK_SHAPES = tuple(
    (re.compile(name), re.compile(value))
    for name, value in (
        (r"[A-Z0-9_]+_SERVICE_HOST", _LINK_ADDRESS),
        (r"[A-Z0-9_]+_SERVICE_PORT(?:_[A-Z0-9_]+)?", _LINK_NUMBER),
        (r"[A-Z0-9_]+_PORT", _LINK_URL),
        (r"[A-Z0-9_]+_PORT_\d{1,5}_(?:TCP|UDP|SCTP)", _LINK_URL),
        (r"[A-Z0-9_]+_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_PROTO", _LINK_PROTO),
        (r"[A-Z0-9_]+_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_PORT", _LINK_NUMBER),
        (r"[A-Z0-9_]+_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_ADDR", _LINK_ADDRESS),
    )
)


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` has the shape of a variable Kubernetes injects for a Service."""
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SERVICE_LINK_SHAPES)


def _without_service_links(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less Kubernetes' Service variables, including one that shadows ours.

    A Service named ``acme-http`` injects ``ACME_HTTP_PORT=tcp://10.0.0.7:80``: that value is
    never a port number an operator wrote, so it is dropped rather than refused, and the
    setting keeps its default.
    """
    kept = {}
    for name, value in env.items():
        if is_service_link(name, value):
            if name in known_variables():
                log.warning("%s=%s looks like a Kubernetes Service link; ignored", name, value)
            continue
        kept[name] = value
    return kept


def unknown_setting(name: str, known: Collection[str]) -> ConfigError:
    """The error for a name of ours that this program does not read, with the closest known
    name as a hint (a typo is the usual cause)."""
    hint = difflib.get_close_matches(name, sorted(known), n=1)
    suggestion = f" (did you mean {hint[0]}?)" if hint else ""
    return ConfigError(name, f"unknown setting{suggestion}")


def reject_unknown_variables(env: Mapping[str, str], prefix: str, known: Collection[str]) -> None:
    """A ``prefix`` name that is not in ``known`` is an error; the shapes of Kubernetes'
    Service links are let through (a Service named "dns" injects DNS_PORT=tcp://...)."""
    for name in sorted(env):
        if name.startswith(prefix) and name not in known and not is_service_link(name, env[name]):
            raise unknown_setting(name, known)


def _reject_unknown_acme_variables(env: Mapping[str, str]) -> None:
    for name in sorted(env):
        internal = name.startswith("ACME_REGISTRY_")  # set by `acme-registry run`
        ours = name.startswith(("ACME_", "AUTH_"))
        if ours and name not in known_variables() and not internal:
            raise unknown_setting(name, known_variables())


def _domains(raw: str, challenge: str = "http-01") -> tuple[str, ...]:
    """The names: DNS names, wildcards (DNS challenges only) and IP addresses (http-01 only)."""
    from . import dnsconfig

    if not raw.strip():
        raise ConfigError("ACME_DOMAINS", "required: the names to obtain a certificate for")
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip().lower()
        # An IP in its canonical text form: the one a certificate's SAN and the order show.
        name = _canonical_ip(name) if is_ip(name) else name.rstrip(".")
        if not name:
            raise ConfigError("ACME_DOMAINS", "empty name in the list")
        plain = not is_ip(name) and "*" not in name
        if plain and not is_dns_name(name, min_labels=2):
            raise ConfigError("ACME_DOMAINS", f"{part.strip()!r} is not a valid DNS name")
        if name in names:
            raise ConfigError("ACME_DOMAINS", f"{name!r} is listed twice")
        names.append(name)
    if len(names) > 100:
        raise ConfigError("ACME_DOMAINS", f"{len(names)} names; a certificate holds at most 100")
    dnsconfig.check_names(names, challenge)
    return tuple(names)


def _canonical_ip(text: str) -> str:
    return str(ipaddress.ip_address(text.strip("[]")))


def _email(value: str | None) -> str | None:
    if value is None:
        return None
    local, at, domain = value.partition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in value):
        raise ConfigError("ACME_EMAIL", f"{value!r} is not an email address")
    return value


def _directory(value: str, variable: str = "ACME_DIRECTORY") -> str:
    url = DIRECTORY_ALIASES.get(value.lower(), value)
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        aliases = ", ".join(DIRECTORY_ALIASES)
        raise ConfigError(variable, f"{value!r} is neither an https:// URL nor one of: {aliases}")
    return url


def _profile(value: str | None) -> str | None:
    # Whether the CA offers it is checked against its directory before any order.
    if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ConfigError("ACME_PROFILE", f"{value!r} is not a profile name")
    return value


def _boolean(env: Mapping[str, str], variable: str, default: bool) -> bool:
    value = env.get(variable, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(variable, f"{value!r} is not true or false")


def _tls_file(
    env: Mapping[str, str], variable: str, default: Path, acme_enabled: bool
) -> Path | None:
    value = env.get(variable, "").strip()
    if acme_enabled:
        if value:
            raise ConfigError(variable, "only used with ACME_ENABLED=false")
        return None
    path = Path(value) if value else default
    if not path.is_absolute():
        raise ConfigError(variable, f"{value!r} is not an absolute path")
    return _readable_file(variable, str(path))


def _readable_file(variable: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(variable, f"{value} is not a file")
    try:
        path.read_bytes()
    except OSError as error:
        raise ConfigError(variable, f"{value} cannot be read ({error.strerror})") from None
    return path


def _ca_bundle(value: str | None) -> Path | None:
    if value is None:
        return None
    path = _readable_file("ACME_CA_BUNDLE", value)
    if b"-----BEGIN CERTIFICATE-----" not in path.read_bytes():
        raise ConfigError("ACME_CA_BUNDLE", f"{value} holds no PEM certificate")
    return path


def _eab(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    kid = env.get("ACME_EAB_KID", "").strip() or None
    key = env.get("ACME_EAB_HMAC_KEY", "").strip() or None
    key_file = env.get("ACME_EAB_HMAC_KEY_FILE", "").strip() or None
    if key and key_file:
        raise ConfigError("ACME_EAB_HMAC_KEY_FILE", "set either it or ACME_EAB_HMAC_KEY, not both")
    if key_file:
        key = _readable_file("ACME_EAB_HMAC_KEY_FILE", key_file).read_text().strip()
        if not key:
            raise ConfigError("ACME_EAB_HMAC_KEY_FILE", f"{key_file} is empty")
    source = "ACME_EAB_HMAC_KEY_FILE" if key_file else "ACME_EAB_HMAC_KEY"
    if kid and not key:
        raise ConfigError("ACME_EAB_HMAC_KEY", "required when ACME_EAB_KID is set")
    if key and not kid:
        raise ConfigError("ACME_EAB_KID", f"required when {source} is set")
    if key is not None:
        # Never echo the key itself: it is a secret.
        if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", key):
            raise ConfigError(source, "is not base64url")
        try:
            decoded = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        except (binascii.Error, ValueError):
            raise ConfigError(source, "is not base64url") from None
        if len(decoded) < 16:
            raise ConfigError(source, "is shorter than 16 bytes once decoded")
    return kid, key


def _choice(env: Mapping[str, str], variable: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(variable, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(variable, f"{value!r} is not one of: {', '.join(choices)}")
    return value


def _port(variable: str, raw: str) -> int:
    text = raw.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(variable, f"{raw!r} is not a port number (1-65535)")
    return int(text)


def _http_port(raw: str, challenge: str) -> int:
    """ACME_HTTP_PORT; ``off`` (0) only where no HTTP-01 challenge needs it."""
    if raw.strip().lower() == "off":
        if challenge == "http-01":
            raise ConfigError("ACME_HTTP_PORT", "off needs a DNS challenge (ACME_CHALLENGE)")
        return 0
    return _port("ACME_HTTP_PORT", raw)


def _listen_address(variable: str, raw: str) -> ListenAddress:
    text = raw.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(variable, f"{raw!r} is not host:port or :port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(variable, f"{raw!r} has an unclosed '['")
        host = host[1:-1]
    if host and not is_ip(host) and host != "localhost":
        raise ConfigError(variable, f"{host!r} is not an IP address (use :port for every address)")
    return ListenAddress(host, _port(variable, port))


def _executable(variable: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ConfigError(variable, f"{value} is not an executable file")
    return path


def _registry_binary(env: Mapping[str, str]) -> str:
    # `acme-registry run` moves REGISTRY_BINARY to an internal name, because the registry
    # warns about every REGISTRY_* variable it does not know.
    return (
        env.get("REGISTRY_BINARY", "").strip()
        or env.get("ACME_REGISTRY_REGISTRY_BINARY", "").strip()
        or "/bin/registry"
    )


def _absolute_dir(env: Mapping[str, str], variable: str, default: str) -> Path:
    value = env.get(variable, "").strip() or default
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(variable, f"{value!r} is not an absolute path")
    if path.exists() and not path.is_dir():
        raise ConfigError(variable, f"{value} exists and is not a directory")
    return path


def _duration(variable: str, raw: str) -> float:
    """A Go duration as the registry parses it (only the simple one-unit forms)."""
    match = _GO_DURATION.match(raw.strip())
    if not match:
        raise ConfigError(variable, f"{raw!r} is not a duration such as 30s or 2m")
    return float(match.group(1)) * _GO_UNITS[match.group(2)]


def _auth_users(env: Mapping[str, str], mode: str) -> dict[str, Credential]:
    users = env.get("AUTH_USERS", "").strip() or None
    users_file = env.get("AUTH_USERS_FILE", "").strip() or None
    if mode == "none":
        for variable, value in (("AUTH_USERS", users), ("AUTH_USERS_FILE", users_file)):
            if value:
                raise ConfigError(variable, "set, but AUTH_MODE=none turns authentication off")
        return {}
    text = None
    if users_file:
        try:
            text = _readable_file("AUTH_USERS_FILE", users_file).read_text()
        except UnicodeDecodeError:
            raise ConfigError("AUTH_USERS_FILE", f"{users_file} is not UTF-8 text") from None
    try:
        return load_env_users(users, text)
    except UsersFormatError as error:
        raise ConfigError(error.source, error.problem) from None


def _registry_env(env: Mapping[str, str], cert_dir: Path, owns_auth: bool) -> dict[str, str]:
    """Split out the REGISTRY_* variables that reach the registry untouched."""
    passed: dict[str, str] = {}
    ours = {cert_dir / "domain.crt", cert_dir / "domain.key", cert_dir / "live" / "tls.pem"}
    for name, value in env.items():
        upper = name.upper()
        if not upper.startswith("REGISTRY_") or upper in OWN_REGISTRY_VARIABLES:
            continue
        if upper in ("REGISTRY_HTTP_TLS_CERTIFICATE", "REGISTRY_HTTP_TLS_KEY"):
            if Path(value.strip()) in ours:
                passed[name] = value
                continue
            raise ConfigError(
                name,
                f"the agent owns http.tls; it writes {cert_dir}/domain.crt and domain.key "
                "(unset this variable, or point it at those files)",
            )
        if owns_auth and upper.startswith("REGISTRY_AUTH"):
            raise ConfigError(
                name,
                "the agent owns auth while AUTH_MODE=htpasswd or token; unset it, or set "
                "AUTH_MODE=none",
            )
        if upper in OWNED_REGISTRY_SECTIONS or upper.startswith(OWNED_REGISTRY_PREFIXES):
            setting = upper.removeprefix("REGISTRY_").lower().replace("_", ".")
            raise ConfigError(name, f"the agent owns {setting}; unset this variable")
        passed[name] = value
    return passed


def _default_gc_settings() -> GcSettings:
    # gcconfig imports this module (ConfigError), so it is imported when first needed.
    from .gcconfig import load_gc_settings

    return load_gc_settings({})


def _gc_settings(env: Mapping[str, str], registry_env: Mapping[str, str]) -> GcSettings:
    """RETENTION_*/GC_* (unknown names refused by gcconfig), checked against the storage."""
    from .gcconfig import load_gc_settings

    settings = load_gc_settings(env)
    if not settings.retention.enabled:
        return settings
    keep = "RETENTION_KEEP_LAST" if settings.retention.keep_last else "RETENTION_KEEP_DAYS"
    upper = {name.upper(): value.strip() for name, value in registry_env.items()}
    driver = upper.get("REGISTRY_STORAGE", "filesystem").lower() or "filesystem"
    if driver != "filesystem":
        # Retention reads the storage tree directly; only the filesystem one exists so far.
        raise ConfigError(
            keep, f"retention needs filesystem storage for now (REGISTRY_STORAGE={driver})"
        )
    if upper.get("REGISTRY_STORAGE_DELETE_ENABLED", "true").lower() in ("false", "0", "no", "off"):
        raise ConfigError(
            "REGISTRY_STORAGE_DELETE_ENABLED", f"is false, so {keep} could never delete a tag"
        )
    return settings
