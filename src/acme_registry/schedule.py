"""When to renew and how long to back off after a failure. Pure: facts in, times out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

SHORT_LIVED = dt.timedelta(days=10)
# Let's Encrypt's guidance: 1 min, 10 min, 100 min, then daily.
BACKOFF = (dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100))
DAILY = dt.timedelta(days=1)


@dataclass(frozen=True)
class RenewalPlan:
    at: dt.datetime
    reason: str


def lifetime_renewal(not_before: dt.datetime, not_after: dt.datetime) -> RenewalPlan:
    """Renew with a third of the lifetime left (half, for certificates under 10 days)."""
    lifetime = not_after - not_before
    if lifetime < SHORT_LIVED:
        return RenewalPlan(not_after - lifetime / 2, "half of a short lifetime left")
    return RenewalPlan(not_after - lifetime / 3, "a third of the lifetime left")


def backoff_delay(failures: int, have_certificate: bool) -> dt.timedelta:
    """The wait after ``failures`` consecutive failed attempts (failures >= 1).

    Without any certificate (a first start before DNS points here) the wait stays at
    100 minutes instead of growing to a day, so the registry comes up soon after DNS is fixed.
    """
    if failures <= 0:
        return dt.timedelta(0)
    if failures <= len(BACKOFF):
        return BACKOFF[failures - 1]
    return DAILY if have_certificate else BACKOFF[-1]


def next_attempt(
    last_attempt: dt.datetime,
    failures: int,
    have_certificate: bool,
    retry_after: dt.datetime | None = None,
) -> dt.datetime:
    """The earliest next attempt: the backoff, or the CA's Retry-After if that is later."""
    planned = last_attempt + backoff_delay(failures, have_certificate)
    if retry_after is not None and retry_after > planned:
        return retry_after
    return planned


def retry_after_at(header: str | None, now: dt.datetime) -> dt.datetime | None:
    """When an HTTP ``Retry-After`` (delay-seconds or an HTTP date) points, as aware UTC.

    The acme library's own helper returns a naive time, local for delays and UTC for dates;
    this one is aware in both cases. None when the header is absent or unreadable.
    """
    if header is None:
        return None
    text = header.strip()
    if text.isdigit():
        return now.astimezone(dt.UTC) + dt.timedelta(seconds=int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    # RFC 9110 dates are GMT; a date without a zone is read as UTC too.
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
