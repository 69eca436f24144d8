"""ACME Renewal Information (RFC 9773): certificate IDs and suggested renewal windows.

The pure half (IDs, parsing, choosing an instant) is separate from the one network call,
an unauthenticated GET done with the standard library so the long-running agent does not
load the ACME stack.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass

from . import schedule
from .certinfo import CertInfo

# RFC 9773 4.3.2/4.3.3: honour Retry-After within sane bounds; six hours after errors.
MIN_RECHECK = dt.timedelta(minutes=1)
MAX_RECHECK = dt.timedelta(hours=12)  # Let's Encrypt: check at least twice a day
ERROR_RECHECK = dt.timedelta(hours=6)
TIMEOUT = 15


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def cert_id(cert: CertInfo) -> str:
    """base64url(AKI keyIdentifier) "." base64url(DER serial), padding stripped."""
    if cert.authority_key_id is None:
        raise ValueError("the certificate has no Authority Key Identifier keyIdentifier")
    serial = cert.serial
    # DER INTEGER content: big-endian two's complement, so a leading 1 bit needs a 0 byte.
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
    return f"{_b64(cert.authority_key_id)}.{_b64(serial_bytes)}"


@dataclass(frozen=True)
class RenewalInfo:
    start: dt.datetime
    end: dt.datetime
    explanation_url: str | None
    recheck_after: dt.timedelta


def parse(body: bytes, retry_after: str | None, now: dt.datetime) -> RenewalInfo:
    """A RenewalInfo response; ValueError when it is invalid (RFC 9773 4.2)."""
    try:
        data = json.loads(body)
        window = data["suggestedWindow"]
        start = dt.datetime.fromisoformat(window["start"].replace("Z", "+00:00"))
        end = dt.datetime.fromisoformat(window["end"].replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed renewalInfo: {error}") from None
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("renewalInfo window without a time zone")
    if end <= start:
        raise ValueError("renewalInfo window ends before it starts")
    explanation = data.get("explanationURL")
    return RenewalInfo(
        start=start,
        end=end,
        explanation_url=explanation if isinstance(explanation, str) else None,
        recheck_after=recheck_delay(retry_after, now),
    )


def recheck_delay(retry_after: str | None, now: dt.datetime) -> dt.timedelta:
    """How long until the next fetch: the server's Retry-After, clamped."""
    when = schedule.retry_after_at(retry_after, now)
    delay = when - now if when is not None else ERROR_RECHECK
    return min(max(delay, MIN_RECHECK), MAX_RECHECK)


# An order takes seconds to minutes: a chosen instant keeps this much before expiry.
ORDER_ROOM = dt.timedelta(minutes=5)


def choose_instant(
    info: RenewalInfo, rng: random.Random | None = None, expires: dt.datetime | None = None
) -> dt.datetime:
    """A uniformly random instant inside the suggested window.

    A window that reaches (nearly) to the certificate's expiry, as short-lived profiles'
    can, is cut to end :data:`ORDER_ROOM` before it (or half-way from the window's start to
    the expiry, when that is nearer): an instant in the last seconds would leave the order
    no time, and the certificate would expire while it runs.
    """
    end = info.end
    if expires is not None:
        room = min(ORDER_ROOM, max(expires - info.start, dt.timedelta(0)) / 2)
        end = max(info.start, min(end, expires - room))
    span = (end - info.start).total_seconds()
    return info.start + dt.timedelta(seconds=(rng or random).uniform(0, span))


def fetch(
    renewal_info_url: str, cert: CertInfo, context: ssl.SSLContext, now: dt.datetime
) -> RenewalInfo:
    """GET the RenewalInfo of ``cert``; OSError or ValueError on failure."""
    url = f"{renewal_info_url.rstrip('/')}/{cert_id(cert)}"
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "acme-registry"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
        return parse(response.read(), response.headers.get("Retry-After"), now)


def directory(url: str, context: ssl.SSLContext) -> dict[str, object]:
    """The ACME directory object (for its renewalInfo URL and profiles)."""
    request = urllib.request.Request(url, headers={"User-Agent": "acme-registry"})
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
        data = json.loads(response.read())
    if not isinstance(data, dict):
        raise ValueError("the ACME directory is not a JSON object")
    return data


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_bundle)
