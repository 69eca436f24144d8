"""What one issuance attempt came to: :class:`IssuanceResult` and its :class:`FailureReason`.

The issuing child process prints one result as a JSON line; the agent reads it back with
:meth:`IssuanceResult.from_json`. The reason is set where the kind of failure is known
(the ACME problem type, the exception class), never guessed again from the message.
Standard library only: the long-running agent imports this without the ACME stack.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

PROBLEM_PREFIX = "urn:ietf:params:acme:error:"


class FailureReason(StrEnum):
    """Why an order failed; the values are the ``reason`` label of the failure metric."""

    VALIDATION = "validation"
    RATE_LIMITED = "rate_limited"
    NETWORK = "network"
    CA_ERROR = "ca_error"
    STORAGE = "storage"
    # The DNS provider or the propagation check (dns-01, dns-persist-01), not the CA.
    DNS = "dns"
    OTHER = "other"


# RFC 8555 6.7 problem types that describe a failed proof of control of a name: the
# operator's DNS, firewall or port 80, not the CA. "unauthorized" is among them only while
# a challenge is validated; elsewhere it means the account (deactivated, unknown).
_VALIDATION_PROBLEMS = frozenset({"caa", "connection", "dns", "incorrectResponse", "tls"})


def problem_code(problem_type: str | None) -> str:
    """``urn:ietf:params:acme:error:rateLimited`` -> ``rateLimited`` (a bare code stays)."""
    if not problem_type:
        return ""
    return problem_type.removeprefix(PROBLEM_PREFIX).rsplit(":", 1)[-1]


def reason_for_problem(problem_type: str | None, *, validating: bool = False) -> FailureReason:
    """The reason for an ACME problem document of this type.

    ``validating``: the problem came from a challenge or an authorization (the CA's
    validation of a name), so any type is a validation failure except a rate limit.
    """
    code = problem_code(problem_type)
    if code == "rateLimited":
        return FailureReason.RATE_LIMITED
    if validating or code in _VALIDATION_PROBLEMS:
        return FailureReason.VALIDATION
    return FailureReason.CA_ERROR


@dataclass(frozen=True)
class IssuanceResult:
    """One run of the issuing child: the certificate it obtained, or why it failed.

    ``retry_after`` is the CA's Retry-After for a refused request, as an aware UTC time.
    ``timings`` are ``(step, seconds)`` of every ACME request, for the latency metric.
    """

    ok: bool
    seconds: float = 0.0
    fingerprint: str | None = None
    serial: str | None = None
    not_after: dt.datetime | None = None
    dry_run: bool = False
    error: str | None = None
    reason: FailureReason | None = None
    retry_after: dt.datetime | None = None
    timings: tuple[tuple[str, float], ...] = field(default=())
    # A shared store: another replica committed this certificate while we waited for the
    # issuance lock, so no order was placed.
    adopted: bool = False

    @classmethod
    def failure(
        cls,
        error: str,
        reason: FailureReason,
        *,
        retry_after: dt.datetime | None = None,
        seconds: float = 0.0,
        timings: Iterable[tuple[str, float]] = (),
    ) -> IssuanceResult:
        return cls(
            ok=False,
            error=error,
            reason=reason,
            retry_after=retry_after,
            seconds=seconds,
            timings=tuple(timings),
        )

    def to_json(self) -> str:
        """One line of JSON (the child's stdout protocol)."""
        return json.dumps(
            {
                "ok": self.ok,
                "seconds": self.seconds,
                "fingerprint": self.fingerprint,
                "serial": self.serial,
                "not_after": _iso(self.not_after),
                "dry_run": self.dry_run,
                "error": self.error,
                "reason": self.reason.value if self.reason else None,
                "retry_after": _iso(self.retry_after),
                "timings": [list(pair) for pair in self.timings],
                "adopted": self.adopted,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> IssuanceResult:
        """Read a child's answer. The child is not trusted blindly: whatever is malformed
        becomes a failure (or, in ``timings``, is skipped), never an exception."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls.failure("the issuing process gave a malformed answer", FailureReason.OTHER)
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> IssuanceResult:
        ok = data.get("ok") is True
        reason = None
        if not ok:
            try:
                reason = FailureReason(str(data.get("reason")))
            except ValueError:
                reason = FailureReason.OTHER
        error = data.get("error")
        return cls(
            ok=ok,
            seconds=_number(data.get("seconds")),
            fingerprint=_text(data.get("fingerprint")),
            serial=_text(data.get("serial")),
            not_after=_time(data.get("not_after")),
            dry_run=data.get("dry_run") is True,
            error=None if ok else (error if isinstance(error, str) else "no error given"),
            reason=reason,
            retry_after=_time(data.get("retry_after")),
            timings=_timings(data.get("timings")),
            adopted=ok and data.get("adopted") is True,
        )

    def answer(self) -> dict[str, Any]:
        """The control socket's answer to ``renew`` (what the CLI prints)."""
        data = json.loads(self.to_json())
        del data["timings"]
        return data


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def _time(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    # Aware UTC everywhere: a naive time from an older child is read as UTC.
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _timings(value: object) -> tuple[tuple[str, float], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    if not isinstance(pairs, Iterable) or isinstance(pairs, str | bytes):
        return ()
    found = []
    for pair in pairs:
        try:
            step, elapsed = pair
            seconds = float(elapsed)
        except (TypeError, ValueError):
            continue
        if math.isfinite(seconds):
            found.append((str(step), seconds))
    return tuple(found)
