"""dns-persist-01's precondition: the record must be in DNS before any order is placed.

The agent never loads the ACME stack, so it learns the record to expect from the child
``acme-registry dns-persist-record --json`` (which registers the account if needed and reads
the issuer domain name from the directory: no order), then asks DNS itself. While the check
fails, no order is placed and no ACME backoff is recorded (that is for failures at the CA):
the agent looks again every 30 s, or after the answers' TTL if longer (the record's, or the
negative-caching TTL while it is missing), and says which record to create.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from collections.abc import Callable

from . import dnspersist
from .config import Settings
from .dnspropagation import PropagationChecker
from .dnsproviders import DnsError

log = logging.getLogger(__name__)

RECORDS_TIMEOUT = 120

# () -> the records to create, or why they cannot be known (one line).
RecordsSource = Callable[[], list[dnspersist.PersistRecord] | str]


def records_from_child() -> list[dnspersist.PersistRecord] | str:
    """The records, from ``acme-registry dns-persist-record --json`` in a child process."""
    try:
        child = subprocess.run(
            [sys.executable, "-m", "acme_registry", "dns-persist-record", "--json"],
            capture_output=True,
            timeout=RECORDS_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "dns-persist-record did not answer in time"
    if child.returncode != 0:
        lines = child.stderr.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"dns-persist-record exited {child.returncode}"
    try:
        raw = json.loads(child.stdout)["records"]
        return [dnspersist.PersistRecord(r["name"], r["value"], r["type"]) for r in raw]
    except (ValueError, KeyError, TypeError):
        return "dns-persist-record gave no records"


class PersistPrecondition:
    """Checks that every ``_validation-persist`` record authorizes this account."""

    def __init__(
        self,
        settings: Settings,
        records: RecordsSource = records_from_child,
        checker: PropagationChecker | None = None,
    ) -> None:
        assert settings.dns is not None
        self.settings = settings
        self._records = records
        self._checker = checker or PropagationChecker(settings.dns.propagation)
        # The last failure, for `status` and /readyz; None once the records are in place.
        self.problem: str | None = None
        # How long each answer of the last check may be cached: sets the next look.
        self._ttls: list[int | None] = []

    def check(self, now: dt.datetime) -> str | None:
        """None when an order may be placed; else one line saying what to create."""
        problem = self._problem(now)
        if problem != self.problem:
            if problem:
                log.warning("dns-persist-01: no order placed: %s", problem)
            else:
                log.info("dns-persist-01: the record(s) authorize this account")
        self.problem = problem
        return problem

    def delay(self) -> float:
        """Seconds until the next look while the check fails: 30, or the TTL if longer."""
        return float(dnspersist.recheck_delay(self._ttls))

    def _problem(self, now: dt.datetime) -> str | None:
        self._ttls = []
        records = self._records()
        if isinstance(records, str):
            return records
        wanted = {record.name: record for record in records}
        groups = dnspersist.group_by_record(self.settings.domains)
        messages = []
        for name, identifiers in groups.items():
            record = wanted.get(name)
            if record is None:
                return f"dns-persist-record gave no record for {name}"
            value = dnspersist.parse_value(record.value)
            assert value.account_uri is not None
            try:
                answers = self._checker.answers(name)
            except DnsError as error:
                messages.append(f"{name}: {error}")
                continue
            self._ttls += [answer.ttl for answer in answers.values()]
            found = _shown_everywhere({k: a.observation for k, a in answers.items()})
            verdict = dnspersist.check_record(
                identifiers,
                found,
                issuers=[value.issuer],
                account_uri=value.account_uri,
                now=now,
            )
            if not verdict.ok:
                messages.append(verdict.message())
        return "; ".join(messages) or None


def _shown_everywhere(observed: dict[str, frozenset[str] | str]) -> frozenset[str]:
    """The values every server shows (a server that gave no answer shows none)."""
    sets = [o if isinstance(o, frozenset) else frozenset() for o in observed.values()]
    if not sets:
        return frozenset()
    return frozenset.intersection(*sets)
