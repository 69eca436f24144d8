"""The shapes of names the agent accepts: DNS names, IP literals, ACME tokens, user names.

Pure and dependency-free, so that configuration, the port-80 responder, the DNS settings,
the challenge store and the user store all judge a name the same way.
"""

from __future__ import annotations

import ipaddress
import re

# One DNS label as a host name has it (RFC 1123): letters, digits, inner hyphens.
HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# A label of a DNS name that is not a host name (TSIG key names, zones): "_" is allowed too.
DNS_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# An ACME token (RFC 8555 section 8.1): base64url, and short enough to be a path segment.
ACME_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
# A registry user name: safe in an htpasswd line, a JSON key and a log line.
USER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def is_dns_name(name: str, *, min_labels: int = 1, labels: re.Pattern[str] = HOST_LABEL) -> bool:
    """Whether lower-case ``name`` (no trailing dot) is a DNS name of at least ``min_labels``."""
    parts = name.split(".")
    return len(name) <= 253 and len(parts) >= min_labels and all(labels.fullmatch(p) for p in parts)


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (IPv6 possibly in brackets)."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def is_acme_token(token: str) -> bool:
    return ACME_TOKEN.fullmatch(token) is not None


def is_user_name(name: str) -> bool:
    return USER_NAME.fullmatch(name) is not None
