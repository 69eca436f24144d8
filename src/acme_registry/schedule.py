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


@dataclass(frozen=True)
class Backoff:
    """Failed attempts in a row and when the next may start: a value, changed only by its
    transitions. Persisted (as :meth:`to_dict`) so restarts and crash loops continue it.

    ``config`` names the configuration the failures were made with: a changed one starts
    over, since the old failures say nothing about it.
    """

    config: str = ""
    failures: int = 0
    last_attempt: dt.datetime | None = None
    last_error: str | None = None
    next_attempt: dt.datetime | None = None

    def for_config(self, config: str) -> Backoff:
        return self if self.config == config else Backoff(config=config)

    def waiting_until(self, now: dt.datetime) -> dt.datetime | None:
        """The next attempt while it is still ahead of ``now``; None when one may start."""
        if self.next_attempt is not None and now < self.next_attempt:
            return self.next_attempt
        return None

    def started_over(self) -> Backoff:
        """`acme-registry renew`: no failures behind, an attempt may start now."""
        return Backoff(config=self.config)

    def succeeded(self, now: dt.datetime) -> Backoff:
        return Backoff(config=self.config, last_attempt=now)

    def failed(
        self,
        now: dt.datetime,
        error: str | None,
        have_certificate: bool,
        retry_after: dt.datetime | None = None,
    ) -> Backoff:
        failures = self.failures + 1
        return Backoff(
            config=self.config,
            failures=failures,
            last_attempt=now,
            last_error=error,
            next_attempt=next_attempt(now, failures, have_certificate, retry_after),
        )

    def to_dict(self) -> dict[str, object]:
        """The stored form, also what `acme-registry status --json` shows."""
        return {
            "failures": self.failures,
            "last_attempt": self.last_attempt.isoformat() if self.last_attempt else None,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt.isoformat() if self.next_attempt else None,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object] | None, config: str) -> Backoff:
        """The stored backoff for ``config``; a fresh one when absent, malformed or stale."""
        if not data:
            return cls(config=config)
        try:
            failures = data.get("failures", 0)
            error = data.get("last_error")
            backoff = cls(
                config=str(data.get("config", "")),
                failures=failures if isinstance(failures, int) else int(str(failures)),
                last_attempt=_stored_time(data.get("last_attempt")),
                last_error=error if isinstance(error, str) else None,
                next_attempt=_stored_time(data.get("next_attempt")),
            )
        except (TypeError, ValueError):
            return cls(config=config)
        return backoff.for_config(config)


def _stored_time(value: object) -> dt.datetime | None:
    if value is None:
        return None
    when = dt.datetime.fromisoformat(str(value))
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
