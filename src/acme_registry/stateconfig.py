"""Settings of the state store (``STATE_*``): where the agent keeps what replicas share. Pure.

:func:`load_state_settings` turns the environment into :class:`StateSettings` or raises
:class:`~acme_registry.config.ConfigError` naming the variable. ``STATE_STORE=file`` (the
default) is today's ``DATA_DIR``; ``STATE_STORE=s3`` is a prefix of an S3-compatible bucket,
by default the registry's own (``REGISTRY_STORAGE_S3_*``).

Silent defaulting is the danger here: replicas that each think they are alone each order a
certificate, answer only their own challenges and keep their own users. So when the registry
stores its images in shared storage (``REGISTRY_STORAGE`` other than filesystem, or any
``REGISTRY_STORAGE_<driver>_*`` of a shared driver) a choice is required: ``STATE_STORE``
unset is then a configuration error, and ``STATE_STORE=file`` says "one instance only".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .config import ConfigError, reject_unknown_variables

FILE = "file"
S3 = "s3"
STORES = (FILE, S3)

STATE_PREFIX = "STATE_"
# Every variable this module reads that config's unknown-setting check must accept.
KNOWN_VARIABLES = (
    "STATE_STORE",
    "STATE_S3_ENDPOINT",
    "STATE_S3_BUCKET",
    "STATE_S3_PREFIX",
    "STATE_S3_REGION",
    "STATE_S3_ACCESS_KEY",
    "STATE_S3_SECRET_KEY",
    "STATE_S3_SECRET_KEY_FILE",
    "STATE_ENCRYPTION_KEY_FILE",
    "STATE_LOCK_LEASE",
    "STATE_POLL_INTERVAL",
    "STATE_STATELESS_CHALLENGES",
)
# Meaningful only with STATE_STORE=s3: set with the file store, they are refused.
S3_ONLY_VARIABLES = tuple(name for name in KNOWN_VARIABLES if name != "STATE_STORE")

DEFAULT_PREFIX = "acme-registry/"
DEFAULT_REGION = "us-east-1"
DEFAULT_LOCK_LEASE = 60.0
# The lock's staleness is judged from HTTP dates, which have one-second resolution.
MIN_LOCK_LEASE = 3.0
MAX_LOCK_LEASE = 3600.0
DEFAULT_POLL_INTERVAL = 5.0
MIN_POLL_INTERVAL = 1.0
MAX_POLL_INTERVAL = 60.0

# Registry storage drivers whose data several instances can share: images there mean
# several replicas are likely. (filesystem and inmemory are one machine's.)
SHARED_DRIVERS = ("s3", "azure", "gcs", "swift", "oss")

# AWS's credential files, read by boto3 when no key is configured: named ones must exist.
AWS_CREDENTIAL_FILES = (
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)?")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600}
# S3's bucket naming rules (the general-purpose bucket ones).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class S3Location:
    """Where the state lives in S3 and how to reach it."""

    # None: AWS itself, the endpoint boto3 derives from the region.
    endpoint: str | None
    bucket: str
    prefix: str  # never empty, ends with "/"
    region: str
    # None with secret_key None: boto3's default chain (AWS_* variables and files, roles).
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    # Which setting the credentials came from, for messages (never the values).
    credentials_source: str = "the AWS default credential chain"

    def url(self) -> str:
        """The location as an operator reads it in a message."""
        if self.endpoint is None:
            return f"s3://{self.bucket}/{self.prefix}"
        return f"{self.endpoint}/{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class StateSettings:
    store: str = FILE
    # Set exactly when store == "s3".
    s3: S3Location | None = None
    # 32 bytes from STATE_ENCRYPTION_KEY_FILE (s3 only): the AES-256-GCM key of secrets.
    encryption_key: bytes | None = field(default=None, repr=False)
    lock_lease: float = DEFAULT_LOCK_LEASE
    # How often replicas re-read the certificate and users records (s3).
    poll_interval: float = DEFAULT_POLL_INTERVAL
    # Answer HTTP-01 from the token and the account thumbprint while the store is down.
    stateless_challenges: bool = False

    @property
    def shared(self) -> bool:
        """Whether several replicas share this state (locks and records in the store)."""
        return self.store == S3


def reject_unknown_state_variables(env: Mapping[str, str]) -> None:
    """A STATE_* name this program does not read is an error (Service links aside)."""
    reject_unknown_variables(env, STATE_PREFIX, KNOWN_VARIABLES)


def load_state_settings(env: Mapping[str, str]) -> StateSettings:
    """The STATE_* settings; ``env`` is the whole environment (the registry's S3 settings
    and the AWS variables are read as defaults), already stripped of Service links."""
    reject_unknown_state_variables(env)
    registry = {name.upper(): value.strip() for name, value in env.items()}
    explicit = _value(env, "STATE_STORE").lower()
    if explicit and explicit not in STORES:
        raise ConfigError("STATE_STORE", f"{explicit!r} is not one of: {', '.join(STORES)}")
    if not explicit:
        driver = shared_registry_driver(registry)
        if driver is not None:
            raise ConfigError(
                "STATE_STORE",
                f"must be set while the registry stores images in shared storage "
                f"({driver}), where several replicas are likely: STATE_STORE=s3 shares the "
                "agent's state between them, STATE_STORE=file is for one instance only",
            )
    store = explicit or FILE
    if store == FILE:
        for name in S3_ONLY_VARIABLES:
            if _value(env, name):
                raise ConfigError(name, "set, but only used with STATE_STORE=s3")
        return StateSettings()
    return StateSettings(
        store=S3,
        s3=_s3_location(env, registry),
        encryption_key=_encryption_key(env),
        lock_lease=_seconds(
            env, "STATE_LOCK_LEASE", DEFAULT_LOCK_LEASE, MIN_LOCK_LEASE, MAX_LOCK_LEASE
        ),
        poll_interval=_seconds(
            env, "STATE_POLL_INTERVAL", DEFAULT_POLL_INTERVAL, MIN_POLL_INTERVAL, MAX_POLL_INTERVAL
        ),
        stateless_challenges=_boolean(env, "STATE_STATELESS_CHALLENGES", False),
    )


def shared_registry_driver(registry: Mapping[str, str]) -> str | None:
    """The registry's storage driver when it is a shared one, as the setting that says so.

    ``registry`` has upper-case names. REGISTRY_STORAGE names the driver; without it, a
    REGISTRY_STORAGE_<DRIVER>_* variable configures that driver alone.
    """
    driver = registry.get("REGISTRY_STORAGE", "").lower()
    if driver:
        return f"REGISTRY_STORAGE={driver}" if driver in SHARED_DRIVERS else None
    for name in sorted(registry):
        for shared in SHARED_DRIVERS:
            if name.startswith(f"REGISTRY_STORAGE_{shared.upper()}_") and registry[name]:
                return name
    return None


def _s3_location(env: Mapping[str, str], registry: Mapping[str, str]) -> S3Location:
    bucket_name, bucket = _first(env, registry, ("STATE_S3_BUCKET", "REGISTRY_STORAGE_S3_BUCKET"))
    if not bucket:
        raise ConfigError(
            "STATE_S3_BUCKET", "required with STATE_STORE=s3 (or REGISTRY_STORAGE_S3_BUCKET)"
        )
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(bucket_name, f"{bucket!r} is not an S3 bucket name")
    prefix = _prefix(env)
    if bucket_name == "REGISTRY_STORAGE_S3_BUCKET" or bucket == registry.get(
        "REGISTRY_STORAGE_S3_BUCKET"
    ):
        _check_outside_registry_tree(prefix, registry.get("REGISTRY_STORAGE_S3_ROOTDIRECTORY", ""))
    region_name, region = _first(
        env,
        registry,
        ("STATE_S3_REGION", "REGISTRY_STORAGE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    if region and not re.fullmatch(r"[a-z0-9-]{1,64}", region):
        raise ConfigError(region_name, f"{region!r} is not a region name")
    access_key, secret_key, source = _credentials(env, registry)
    return S3Location(
        endpoint=_endpoint(env, registry),
        bucket=bucket,
        prefix=prefix,
        region=region or DEFAULT_REGION,
        access_key=access_key,
        secret_key=secret_key,
        credentials_source=source,
    )


def _endpoint(env: Mapping[str, str], registry: Mapping[str, str]) -> str | None:
    own = _value(env, "STATE_S3_ENDPOINT")
    if own:
        return _url("STATE_S3_ENDPOINT", own)
    theirs = registry.get("REGISTRY_STORAGE_S3_REGIONENDPOINT", "")
    if not theirs:
        return None
    if "://" not in theirs:
        # The registry's S3 driver takes a bare host too, with "secure" choosing the scheme.
        insecure = registry.get("REGISTRY_STORAGE_S3_SECURE", "").lower() in _FALSE
        theirs = f"{'http' if insecure else 'https'}://{theirs}"
    return _url("REGISTRY_STORAGE_S3_REGIONENDPOINT", theirs)


def _url(variable: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(variable, f"{value!r} is not an http:// or https:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(variable, f"{value!r}: give the endpoint only, with no path")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ConfigError(variable, f"{value!r} has an invalid port") from None
    return value.rstrip("/")


def _prefix(env: Mapping[str, str]) -> str:
    raw = _value(env, "STATE_S3_PREFIX") or DEFAULT_PREFIX
    segments = raw.strip("/").split("/")
    for segment in segments:
        if not _PREFIX_SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ConfigError(
                "STATE_S3_PREFIX",
                f"{raw!r} is not a key prefix (letters, digits, '.', '_', '-' between '/')",
            )
    return "/".join(segments) + "/"


def _check_outside_registry_tree(prefix: str, root_directory: str) -> None:
    """The registry writes ``<rootdirectory>/docker/...`` in its bucket: stay out of it."""
    root = root_directory.strip("/")
    tree = f"{root}/docker/" if root else "docker/"
    if prefix.startswith(tree) or (root and tree.startswith(prefix)):
        raise ConfigError(
            "STATE_S3_PREFIX",
            f"{prefix!r} overlaps the registry's own tree in the bucket ({tree})",
        )


def _credentials(
    env: Mapping[str, str], registry: Mapping[str, str]
) -> tuple[str | None, str | None, str]:
    """An access key pair from STATE_S3_*, else the registry's, else boto3's chain."""
    secret_file = _value(env, "STATE_S3_SECRET_KEY_FILE")
    secret = _value(env, "STATE_S3_SECRET_KEY")
    if secret and secret_file:
        raise ConfigError("STATE_S3_SECRET_KEY_FILE", "set either it or STATE_S3_SECRET_KEY")
    if secret_file:
        secret = _read_secret("STATE_S3_SECRET_KEY_FILE", secret_file).strip()
        if not secret:
            raise ConfigError("STATE_S3_SECRET_KEY_FILE", f"{secret_file} is empty")
    secret_name = "STATE_S3_SECRET_KEY_FILE" if secret_file else "STATE_S3_SECRET_KEY"
    access = _value(env, "STATE_S3_ACCESS_KEY")
    if access or secret:
        if not access:
            raise ConfigError("STATE_S3_ACCESS_KEY", f"required when {secret_name} is set")
        if not secret:
            raise ConfigError("STATE_S3_SECRET_KEY", "required when STATE_S3_ACCESS_KEY is set")
        return access, secret, "STATE_S3_ACCESS_KEY"
    access = registry.get("REGISTRY_STORAGE_S3_ACCESSKEY", "")
    secret = registry.get("REGISTRY_STORAGE_S3_SECRETKEY", "")
    if access or secret:
        if not (access and secret):
            missing = "SECRETKEY" if access else "ACCESSKEY"
            raise ConfigError(
                f"REGISTRY_STORAGE_S3_{missing}",
                "required with the other half of the registry's key pair (the state store "
                "uses it too)",
            )
        return access, secret, "REGISTRY_STORAGE_S3_ACCESSKEY"
    if _value(env, "AWS_ACCESS_KEY_ID") and not _value(env, "AWS_SECRET_ACCESS_KEY"):
        raise ConfigError("AWS_SECRET_ACCESS_KEY", "required when AWS_ACCESS_KEY_ID is set")
    for name in AWS_CREDENTIAL_FILES:
        path = _value(env, name)
        if path:
            _read_secret(name, path)
    if _value(env, "AWS_ACCESS_KEY_ID"):
        return None, None, "AWS_ACCESS_KEY_ID"
    return None, None, "the AWS default credential chain"


def _encryption_key(env: Mapping[str, str]) -> bytes:
    """32 bytes written as 64 hex digits (``openssl rand -hex 32``), one newline allowed.

    The content is never echoed: it is the key.
    """
    name = "STATE_ENCRYPTION_KEY_FILE"
    path = _value(env, name)
    if not path:
        raise ConfigError(
            name, "required with STATE_STORE=s3 (a file holding `openssl rand -hex 32`)"
        )
    raw = _read_secret(name, path)
    text = raw.removesuffix("\n").removesuffix("\r")
    if not _HEX_KEY.fullmatch(text):
        raise ConfigError(
            name, f"{path} must hold exactly 64 hexadecimal characters (openssl rand -hex 32)"
        )
    return bytes.fromhex(text)


def _read_secret(variable: str, value: str) -> str:
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(variable, f"{value!r} is not an absolute path")
    if not path.is_file():
        raise ConfigError(variable, f"{value} is not a file")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(variable, f"{value} is not text") from None
    except OSError as error:
        raise ConfigError(variable, f"{value} cannot be read ({error.strerror})") from None


def _seconds(
    env: Mapping[str, str], variable: str, default: float, low: float, high: float
) -> float:
    raw = _value(env, variable)
    if not raw:
        return default
    match = _DURATION.fullmatch(raw.lower())
    if not match:
        raise ConfigError(variable, f"{raw!r} is not a duration such as 60, 60s or 2m")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not low <= seconds <= high:
        raise ConfigError(variable, f"{raw!r} is outside {low:g} s to {high:g} s")
    return seconds


def _boolean(env: Mapping[str, str], variable: str, default: bool) -> bool:
    value = _value(env, variable).lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(variable, f"{value!r} is not true or false")


def _first(
    env: Mapping[str, str], registry: Mapping[str, str], names: tuple[str, ...]
) -> tuple[str, str]:
    """The first of ``names`` set (non-empty), with its value; ("", "") when none is."""
    for name in names:
        value = _value(env, name) if name.startswith(("STATE_", "AWS_")) else registry.get(name, "")
        if value:
            return name, value
    return "", ""


def _value(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()
