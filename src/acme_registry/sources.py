"""Where the served certificate comes from, chosen once at start (:func:`choose_source`).

- :class:`AcmeSource`: orders from the ACME CA, renews when :mod:`schedule` and the CA's
  renewal information say so, backs off after failures. Each order runs in a short-lived
  child process (``acme-registry issue``), so the long-running agent never loads the
  ACME stack; the child answers one :class:`~.outcome.IssuanceResult` line.
- :class:`OperatorFiles` (``ACME_ENABLED=false``): serves ``TLS_CERT_FILE`` /
  ``TLS_KEY_FILE``, taking a new pair once it matches and has settled.

Both give the agent the same small surface, :class:`CertificateSource`; the agent's
loop calls :meth:`~CertificateSource.maintain` and sleeps for what it returns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from . import issued, schedule, statekeys
from .admin import Metrics
from .certstore import CertificatePair, CertStore, parse_pair, unusable_reason
from .challenges import PendingChallenges
from .config import Settings
from .outcome import FailureReason, IssuanceResult
from .persistcheck import PersistPrecondition
from .renewalinfo import RenewalInfoTracker
from .sharedcert import CertificateMirror
from .storage import Storage

log = logging.getLogger(__name__)

ISSUANCE_TIMEOUT = 300
MAX_SLEEP = 12 * 3600
OPERATOR_POLL = 0.5
OPERATOR_SETTLE = 2.0  # writers such as `cat >` leave brief mismatches

Serve = Callable[[CertificatePair], None]
# `acme-registry renew`: answered with the attempt that started after it was asked.
Renewal = Future[IssuanceResult]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateSource(Protocol):
    store: CertStore  # where the pair the registry loads lives

    def current(self, now: dt.datetime) -> tuple[CertificatePair | None, str | None]:
        """The stored pair, and why it cannot be served (None: it can)."""
        ...

    def maintain(self, now: dt.datetime, renewals: Sequence[Renewal]) -> float:
        """Bring the served pair up to date (calling ``serve``); seconds until the next look.

        Every future in ``renewals`` gets its answer before this returns."""
        ...

    def renewal_refused(self) -> str | None:
        """Why `acme-registry renew` cannot be served here, or None."""
        ...

    def dry_run(self) -> IssuanceResult: ...

    def status(self, pair: CertificatePair | None) -> dict[str, Any]:
        """``next_check``, ``backoff`` and the pair's ``renewal`` plan, for `status`."""
        ...


def config_id(settings: Settings) -> str:
    """What the backoff's failures were made with: names, directory, key type, EAB."""
    s = settings
    text = "|".join((",".join(s.domains), s.directory, s.key_type, s.eab_kid or ""))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def choose_source(
    settings: Settings,
    storage: Storage,
    challenges: PendingChallenges,
    metrics: Metrics,
    serve: Serve,
) -> CertificateSource:
    if settings.acme_enabled:
        return AcmeSource(settings, storage, challenges, metrics, serve)
    return OperatorFiles(settings, serve)


class AcmeSource:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        challenges: PendingChallenges,
        metrics: Metrics,
        serve: Serve,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.store = CertStore(settings.cert_dir)
        self.challenges = challenges
        self.metrics = metrics
        self.serve = serve
        self.renewal_info = RenewalInfoTracker(
            storage,
            settings.directory,
            str(settings.ca_bundle) if settings.ca_bundle else None,
            settings.ari_max_recheck,
        )
        self.config = config_id(settings)
        self._next_check: dt.datetime | None = None
        self._plan: schedule.RenewalPlan | None = None
        # A shared store: the record CERT_DIR mirrors (its version goes to the orderer).
        self.mirror: CertificateMirror | None = None
        self.started_at = time.time()
        # Issuance records never change once written: one read per fingerprint.
        self._issued_by: dict[str, str | None] = {}
        self._backoff: schedule.Backoff | None = None
        # dns-persist-01: the record must authorize the account before any order.
        self.precondition = (
            PersistPrecondition(settings) if settings.challenge == "dns-persist-01" else None
        )

    def current(self, now: dt.datetime) -> tuple[CertificatePair | None, str | None]:
        pair, problem = self._stored(now)
        if pair is None and problem is None and self.precondition is not None:
            # With no certificate yet, what stops the first order is the problem to show.
            return None, self.precondition.problem
        return pair, problem

    def _stored(self, now: dt.datetime) -> tuple[CertificatePair | None, str | None]:
        try:
            pair = self.store.load()
        except ValueError as error:
            return None, str(error)
        if pair is None:
            return None, None
        return pair, unusable_reason(
            pair,
            self.settings.domains,
            now,
            self._issued_through(pair),
            self.settings.directory,
        )

    def _issued_through(self, pair: CertificatePair) -> str | None:
        if pair.fingerprint in self._issued_by:
            return self._issued_by[pair.fingerprint]
        try:
            directory = issued.issued_by(self.storage, pair.fingerprint)
        except OSError:
            if self.mirror is None:
                raise
            # The store is down: CERT_DIR holds only what the record or our orderer put
            # there, so it was issued through the configured directory.
            return self.settings.directory
        self._issued_by[pair.fingerprint] = directory
        return directory

    def maintain(self, now: dt.datetime, renewals: Sequence[Renewal]) -> float:
        try:
            result = self._maintain(now, renewals)
        except BaseException as error:
            for renewal in renewals:
                renewal.set_exception(error)
            raise
        if result is not None:
            for renewal in renewals:
                renewal.set_result(result[1])
            return result[0]
        return self._seconds_until_next_check(now)

    def _maintain(
        self, now: dt.datetime, renewals: Sequence[Renewal]
    ) -> tuple[float, IssuanceResult] | None:
        """None when nothing is due (and no renewal was asked for)."""
        pair, problem = self._stored(now)
        replaces = None
        if pair is not None and problem is None:
            self.serve(pair)
            plan, recheck = self.renewal_info.plan(pair, now)
            self._plan = plan
            self.metrics.set_next_renewal(plan.at)
            if not renewals and now < plan.at:
                self._next_check = min(plan.at, recheck) if recheck else plan.at
                return None
            log.info("renewing: %s", "requested" if renewals else f"due ({plan.reason})")
            replaces = self.renewal_info.replaces(pair, self.settings.domains)
        elif problem:
            log.info("the stored certificate cannot be served: %s", problem)

        backoff = self._load_backoff()
        if renewals:
            backoff = backoff.started_over()  # `acme-registry renew` starts over
        else:
            waiting = backoff.waiting_until(now)
            if waiting is not None:
                self._next_check = waiting
                return None

        if self.precondition is not None and self.precondition.check(now) is not None:
            # No order and no backoff entry: the record is the operator's to create.
            self._next_check = now + dt.timedelta(seconds=self.precondition.delay())
            problem = self.precondition.problem or ""
            return self.precondition.delay(), IssuanceResult.failure(problem, FailureReason.DNS)

        # "=" form: an ARI ID may start with "-", which argparse would take for an option.
        result = self._issue([f"--replaces={replaces}"] if replaces else [])
        self._record_attempt(backoff, result, now)
        if result.ok:
            fresh, fresh_problem = self.current(utcnow())
            if fresh is not None and fresh_problem is None:
                self.serve(fresh)
        return (0.0 if result.ok else 1.0), result

    def _seconds_until_next_check(self, now: dt.datetime) -> float:
        if self._next_check is None:
            return 0.0
        return max(0.0, min((self._next_check - now).total_seconds(), MAX_SLEEP))

    def renewal_refused(self) -> str | None:
        return None

    def dry_run(self) -> IssuanceResult:
        return self._issue([], dry_run=True)

    def status(self, pair: CertificatePair | None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "next_check": self._next_check.isoformat() if self._next_check else None,
            "backoff": self._last_backoff().to_dict(),
        }
        if self.precondition is not None:
            answer["dns_persist_problem"] = self.precondition.problem
        if pair is not None:
            plan = self._plan or schedule.lifetime_renewal(pair.not_before, pair.not_after)
            answer["renewal"] = {"at": plan.at.isoformat(), "reason": plan.reason}
        return answer

    # -- the issuing child ---------------------------------------------------------

    def _issue(self, extra: list[str], dry_run: bool = False) -> IssuanceResult:
        """Run one order in a child process; it stores the pair on success."""
        what = "a dry-run certificate" if dry_run else "a certificate"
        log.info("obtaining %s for %s", what, ", ".join(self.settings.domains))
        command = [sys.executable, "-m", "acme_registry", "issue", *extra]
        if dry_run:
            command.append("--dry-run")
        elif self.mirror is not None and self.mirror.seen:
            command += [
                f"--record-version={self.mirror.version or ''}",
                f"--agent-started={self.started_at}",
            ]
        started = time.monotonic()
        no_answer = IssuanceResult.failure(
            "the issuing process gave no answer", FailureReason.OTHER
        )
        try:
            child = subprocess.run(
                command, stdout=subprocess.PIPE, timeout=ISSUANCE_TIMEOUT, check=False
            )
            lines = child.stdout.decode(errors="replace").strip().splitlines()
            result = IssuanceResult.from_json(lines[-1]) if lines else no_answer
        except subprocess.TimeoutExpired:
            result = no_answer
        finally:
            if not dry_run:
                self.challenges.clear()
        if result.adopted:
            log.info("serving the certificate another replica obtained (no order placed)")
        elif not dry_run:
            self.metrics.record_issuance(result, time.monotonic() - started)
        return result

    # -- backoff ---------------------------------------------------------------------

    def _load_backoff(self) -> schedule.Backoff:
        self._backoff = schedule.Backoff.from_dict(
            self.storage.load_json(statekeys.BACKOFF), self.config
        )
        return self._backoff

    def _last_backoff(self) -> schedule.Backoff:
        """For `status`: the stored backoff, or the last one read while the store is down."""
        try:
            return self._load_backoff()
        except OSError:
            if self.mirror is None:
                raise
            return self._backoff or schedule.Backoff(config=self.config)

    def _record_attempt(
        self, backoff: schedule.Backoff, result: IssuanceResult, now: dt.datetime
    ) -> None:
        if result.ok:
            self.storage.store_json(statekeys.BACKOFF, backoff.succeeded(now).to_dict())
            return
        failed = backoff.failed(now, result.error, self.store.tls_file.exists(), result.retry_after)
        self.storage.store_json(statekeys.BACKOFF, failed.to_dict())
        assert failed.next_attempt is not None
        self._next_check = failed.next_attempt
        log.error(
            "could not obtain a certificate: %s; next attempt at %s",
            result.error,
            f"{failed.next_attempt:%Y-%m-%d %H:%M:%S} UTC",
        )


class OperatorFiles:
    """ACME off: serve TLS_CERT_FILE/TLS_KEY_FILE, rotating once a new pair settles.

    The operator's files are copied into a store of our own (``DATA_DIR/tls``) once they
    have settled, so the registry never loads a pair halfway through being replaced.
    """

    def __init__(self, settings: Settings, serve: Serve) -> None:
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        self.settings = settings
        self.cert_file = settings.tls_cert_file
        self.key_file = settings.tls_key_file
        self.store = CertStore(settings.data_dir / statekeys.OPERATOR_TLS_DIR)
        self.serve = serve
        self.config = config_id(settings)
        self._seen: tuple[str, float] | None = None
        self._applied: str | None = None

    def current(self, now: dt.datetime) -> tuple[CertificatePair | None, str | None]:
        try:
            pair = self.store.load()
        except ValueError as error:
            return None, str(error)
        if pair is None:
            return None, None
        expired = now >= pair.not_after
        return pair, f"it expired at {pair.not_after:%Y-%m-%d %H:%M} UTC" if expired else None

    def maintain(self, now: dt.datetime, renewals: Sequence[Renewal]) -> float:
        for renewal in renewals:  # refused at the control socket already; never left waiting
            renewal.set_result(IssuanceResult.failure(self._refusal, FailureReason.OTHER))
        try:
            chain_pem, key_pem = self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as error:
            if self._applied != "unreadable":
                log.error("cannot read %s: %s; still serving the last pair", error.filename, error)
                self._applied = "unreadable"
            return OPERATOR_POLL
        signature = hashlib.sha256(chain_pem + b"\0" + key_pem).hexdigest()
        first_look = self._seen is None
        if self._seen is None or self._seen[0] != signature:
            self._seen = (signature, time.monotonic())
        settled = time.monotonic() - self._seen[1] >= OPERATOR_SETTLE
        if signature == self._applied or not (settled or first_look):
            return OPERATOR_POLL
        self._applied = signature
        try:
            pair = parse_pair(chain_pem, key_pem)
        except ValueError as error:
            log.error(
                "refusing %s and %s: %s; still serving the last pair",
                self.cert_file,
                self.key_file,
                error,
            )
            return OPERATOR_POLL
        if pair.not_after <= now:
            log.error(
                "refusing %s: %s",
                self.cert_file,
                f"it expired at {pair.not_after:%Y-%m-%d %H:%M} UTC",
            )
            return OPERATOR_POLL
        if pair.names != frozenset(self.settings.domains):
            log.warning(
                "%s names %s, not ACME_DOMAINS", self.cert_file, ", ".join(sorted(pair.names))
            )
        stored = self.store.load_quietly()
        if stored is None or stored.fingerprint != pair.fingerprint:
            self.store.save(pair)
        self.serve(pair)
        return OPERATOR_POLL

    _refusal = "ACME_ENABLED=false: replace TLS_CERT_FILE and TLS_KEY_FILE instead"

    def renewal_refused(self) -> str | None:
        return self._refusal

    def dry_run(self) -> IssuanceResult:
        return IssuanceResult.failure(self._refusal, FailureReason.OTHER)

    def status(self, pair: CertificatePair | None) -> dict[str, Any]:
        # The same fields as with ACME, so `status --json` keeps one shape.
        answer: dict[str, Any] = {
            "next_check": None,
            "backoff": schedule.Backoff(config=self.config).to_dict(),
        }
        if pair is not None:
            plan = schedule.lifetime_renewal(pair.not_before, pair.not_after)
            answer["renewal"] = {"at": plan.at.isoformat(), "reason": plan.reason}
        return answer
