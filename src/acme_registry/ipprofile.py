"""IP-address certificates need the CA's ``shortlived`` profile: checked before any order.

Let's Encrypt issues IP-address certificates only under ``shortlived``. With an IP address
in ACME_DOMAINS and no ACME_PROFILE, the issuer sends ``shortlived``; when the CA's
directory does not list it, ``run`` refuses to start (exit 2, naming ACME_PROFILE) instead
of spending orders the CA will refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from . import ari
from .config import ConfigError, Settings

log = logging.getLogger(__name__)

SHORTLIVED = "shortlived"

DirectoryFetch = Callable[[Settings], Mapping[str, Any]]


def fetch_directory(settings: Settings) -> Mapping[str, Any]:
    bundle = str(settings.ca_bundle) if settings.ca_bundle else None
    return ari.directory(settings.directory, ari.ssl_context(bundle))


def needs_check(settings: Settings) -> bool:
    return settings.acme_enabled and bool(settings.ip_addresses) and settings.profile is None


def profile_problem(directory: Mapping[str, Any]) -> str | None:
    """Why the directory cannot issue an IP-address certificate, or None (pure)."""
    meta = directory.get("meta")
    profiles = meta.get("profiles") if isinstance(meta, Mapping) else None
    if isinstance(profiles, Mapping) and SHORTLIVED in profiles:
        return None
    offered = ", ".join(sorted(profiles)) if isinstance(profiles, Mapping) and profiles else "none"
    return (
        f"an IP address in ACME_DOMAINS needs the {SHORTLIVED!r} profile, which the CA does "
        f"not offer (it offers: {offered}); set ACME_PROFILE"
    )


def check_ip_profile(settings: Settings, fetch: DirectoryFetch = fetch_directory) -> None:
    """Raise ConfigError("ACME_PROFILE") when the CA cannot issue for the IP addresses.

    A CA that cannot be reached now is not a configuration error: the issuer checks again
    before its order.
    """
    if not needs_check(settings):
        return
    try:
        directory = fetch(settings)
    except (OSError, ValueError) as error:
        log.warning("cannot read the ACME directory to check its profiles now: %s", error)
        return
    problem = profile_problem(directory)
    if problem:
        raise ConfigError("ACME_PROFILE", problem)
