"""The agent: the one maintenance loop (like certmagic's maintain.go).

It serves port 80, the control socket and the admin endpoint, decides from the stored pair
whether an order is needed, runs the order in a short-lived child process (so the
long-running process never loads the ACME stack), and starts or rotates the registry
through supervisord's XML-RPC socket. It runs as a thread of the supervisord process:
one Python process less, in memory and at start-up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import xmlrpc.client
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import ari, issued, schedule, statekeys
from .admin import AdminServer, Metrics
from .auth import HTPASSWD, UserStore, registry_auth_config
from .auth import control_handlers as user_handlers
from .certstore import CertificatePair, CertStore, parse_pair, unusable_reason
from .challenges import PendingChallenges
from .config import Settings
from .control import ControlServer
from .outcome import FailureReason, IssuanceResult
from .registry import RegistryGenerations, Supervisor, http_secret, render_config
from .responder import ChallengeResponder
from .storage import FileStorage, ensure_private_dir

log = logging.getLogger(__name__)

ISSUANCE_TIMEOUT = 300
MAX_SLEEP = 12 * 3600
RETRY = 5.0
BYO_POLL = 0.5
BYO_SETTLE = 2.0  # writers such as `cat >` leave brief mismatches


def byo_store(settings: Settings) -> Path:
    return settings.data_dir / "tls"


PROBE_TIMEOUT = 3.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RenewRequest:
    """`acme-registry renew` waiting for the maintenance loop to renew and rotate."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._answer: dict[str, Any] = {"ok": False, "error": "the renewal did not finish"}

    def finish(self, answer: dict[str, Any]) -> None:
        self._answer = answer
        self._done.set()

    def wait(self, timeout: float) -> dict[str, Any]:
        self._done.wait(timeout)
        return self._answer


@dataclass
class Backoff:
    """Failed attempts in a row, persisted so restarts and crash loops continue it."""

    failures: int = 0
    last_attempt: str | None = None
    last_error: str | None = None
    next_attempt: str | None = None
    config: str = ""


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage = FileStorage(settings.data_dir)
        # With ACME off the operator's files are copied into a store of our own once they
        # have settled, so the registry never loads a pair halfway through being replaced.
        self.certs = CertStore(settings.cert_dir if settings.acme_enabled else byo_store(settings))
        self._byo_seen: tuple[str, float] | None = None
        self._byo_applied: str | None = None
        self.challenges = PendingChallenges(self.storage)
        self.responder = ChallengeResponder(
            settings.domains, self.challenges.lookup, settings.http_port
        )
        self.generations = RegistryGenerations(
            Supervisor(settings.supervisor_socket),
            settings.registry_addr,
            settings.registry_config_dir,
        )
        self.users = (
            UserStore(self.storage, settings.data_dir / HTPASSWD, settings.auth_users)
            if settings.auth_mode == "htpasswd"
            else None
        )
        self.metrics = Metrics()
        self.admin = AdminServer(
            settings.admin_addr.host, settings.admin_addr.port, self.metrics, self._ready_check
        )
        handlers = {
            "health": self._health,
            "ready": self._ready,
            "status": self._status,
            "renew": self._renew,
        }
        if self.users is not None:
            handlers.update(user_handlers(self.users))
        self.control = ControlServer(settings.control_socket, handlers)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._next_check: dt.datetime | None = None
        self._plan: schedule.RenewalPlan | None = None
        self._renew_request: RenewRequest | None = None
        self._directory: dict[str, object] | None = None
        self._directory_at = 0.0
        self._tls_to_ca = ari.ssl_context(str(settings.ca_bundle) if settings.ca_bundle else None)
        self._config_id = self._config_fingerprint()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Prepare the files and open the listeners; errors here stop `run` before anything."""
        ensure_private_dir(self.settings.data_dir)
        ensure_private_dir(self.settings.run_dir)
        self.settings.cert_dir.mkdir(parents=True, exist_ok=True)
        self.challenges.clear()
        auth = None
        if self.users is not None:
            # The htpasswd file must exist before any registry starts: without it the
            # registry invents a user and logs its password.
            message = self.users.ensure_initial_admin()
            self.users.sync_htpasswd()
            if message:
                log.warning("%s", message)
            auth = registry_auth_config(self.users.htpasswd_path, "acme-registry")
        else:
            log.warning("AUTH_MODE=none: anyone who reaches the registry can push and pull")
        self.generations.configure(
            render_config(
                self.settings,
                http_secret(self.storage),
                self.certs.tls_file,
                self.settings.registry_env,
                auth,
            )
        )
        self.responder.start()
        self.control.start()
        try:
            self.admin.start()
        except OSError as error:
            # A monitoring port must not take the registry down.
            log.error("admin endpoint on %s unavailable: %s", self.settings.admin_addr, error)
        log.info(
            "agent started for %s; challenges on port %d",
            ", ".join(self.settings.domains),
            self.responder.port,
        )

    def maintain_forever(self) -> None:
        """The maintenance loop; runs on its own thread until :meth:`stop`."""
        while not self._stopping.is_set():
            try:
                wait = self._maintain()
            except (OSError, xmlrpc.client.Error) as error:
                if self._stopping.is_set():
                    break  # supervisord is shutting down around us
                log.error("maintenance step failed: %s; trying again in %d s", error, RETRY)
                wait = RETRY
            self._wake.wait(timeout=wait)
            self._wake.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.admin.stop()
        self.control.stop()
        self.responder.stop()
        log.info("agent stopped")

    # -- the maintenance step ----------------------------------------------------

    def _maintain(self) -> float:
        """Bring the served certificate up to date; return seconds until the next look."""
        if not self.settings.acme_enabled:
            return self._maintain_own_certificate()
        now = utcnow()
        renew = self._renew_request
        self._renew_request = None
        pair, problem = self._current_pair(now)
        replaces = None
        if pair is not None and problem is None:
            self._serve(pair)
            plan, recheck = self._renewal_plan(pair, now)
            self._plan = plan
            self.metrics.set_next_renewal(plan.at)
            if renew is None and now < plan.at:
                self._next_check = min(plan.at, recheck) if recheck else plan.at
                return _seconds_until(self._next_check, now, cap=MAX_SLEEP)
            log.info("renewing: %s", "requested" if renew else f"due ({plan.reason})")
            replaces = self._replaces(pair)
        elif problem:
            log.info("the stored certificate cannot be served: %s", problem)

        backoff = self._load_backoff()
        if renew is not None:
            backoff = Backoff(config=self._config_id)  # `acme-registry renew` starts over
        elif backoff.next_attempt and now < dt.datetime.fromisoformat(backoff.next_attempt):
            self._next_check = dt.datetime.fromisoformat(backoff.next_attempt)
            return _seconds_until(self._next_check, now, cap=MAX_SLEEP)

        # "=" form: an ARI ID may start with "-", which argparse would take for an option.
        result = self._issue([f"--replaces={replaces}"] if replaces else [])
        self._record_attempt(backoff, result, now)
        if result.ok:
            fresh, fresh_problem = self._current_pair(utcnow())
            if fresh is not None and fresh_problem is None:
                self._serve(fresh)
        if renew is not None:
            renew.finish(result.answer())
        return 0.0 if result.ok else 1.0

    def _maintain_own_certificate(self) -> float:
        """ACME off: serve TLS_CERT_FILE/TLS_KEY_FILE, rotating once a new pair settles."""
        cert_file, key_file = self.settings.tls_cert_file, self.settings.tls_key_file
        assert cert_file is not None and key_file is not None
        try:
            chain_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
        except OSError as error:
            if self._byo_applied != "unreadable":
                log.error("cannot read %s: %s; still serving the last pair", error.filename, error)
                self._byo_applied = "unreadable"
            return BYO_POLL
        signature = hashlib.sha256(chain_pem + b"\0" + key_pem).hexdigest()
        first_look = self._byo_seen is None
        if self._byo_seen is None or self._byo_seen[0] != signature:
            self._byo_seen = (signature, time.monotonic())
        settled = time.monotonic() - self._byo_seen[1] >= BYO_SETTLE
        if signature == self._byo_applied or not (settled or first_look):
            return BYO_POLL
        self._byo_applied = signature
        try:
            pair = parse_pair(chain_pem, key_pem)
        except ValueError as error:
            log.error(
                "refusing %s and %s: %s; still serving the last pair", cert_file, key_file, error
            )
            return BYO_POLL
        if pair.not_after <= utcnow():
            log.error(
                "refusing %s: %s", cert_file, f"it expired at {pair.not_after:%Y-%m-%d %H:%M} UTC"
            )
            return BYO_POLL
        if pair.names != frozenset(self.settings.domains):
            log.warning("%s names %s, not ACME_DOMAINS", cert_file, ", ".join(sorted(pair.names)))
        current = self.certs.load_quietly()
        if current is None or current.fingerprint != pair.fingerprint:
            self.certs.save(pair)
        self._serve(pair)
        return BYO_POLL

    def _renewal_plan(
        self, pair: CertificatePair, now: dt.datetime
    ) -> tuple[schedule.RenewalPlan, dt.datetime | None]:
        """When to renew: inside the CA's ARI window when it offers one, else by lifetime.

        Returns the plan and when to fetch the ARI window again (None without ARI).
        """
        renewal_info_url = self._directory_field("renewalInfo")
        fallback = schedule.lifetime_renewal(pair.not_before, pair.not_after)
        if not isinstance(renewal_info_url, str):
            return fallback, None
        cert_id = ari.cert_id(pair.leaf)
        state = self.storage.load_json(statekeys.ARI) or {}
        if state.get("cert_id") != cert_id:
            state = {"cert_id": cert_id}
        next_fetch = state.get("next_fetch")
        if next_fetch is None or now >= dt.datetime.fromisoformat(next_fetch):
            state = self._fetch_ari(renewal_info_url, pair, state, now)
            self.storage.store_json(statekeys.ARI, state)
        recheck = dt.datetime.fromisoformat(state["next_fetch"])
        if "chosen" not in state:
            return fallback, recheck
        reason = f"inside the CA's ARI window {state['start']} - {state['end']}"
        return schedule.RenewalPlan(dt.datetime.fromisoformat(state["chosen"]), reason), recheck

    def _fetch_ari(
        self, url: str, pair: CertificatePair, state: dict[str, Any], now: dt.datetime
    ) -> dict[str, Any]:
        try:
            info = ari.fetch(url, pair.leaf, self._tls_to_ca, now)
        except (OSError, ValueError) as error:
            log.warning("renewal information unavailable (%s); asking again later", error)
            delay = min(ari.ERROR_RECHECK, self.settings.ari_max_recheck)
            return {**state, "next_fetch": (now + delay).isoformat()}
        window = (info.start.isoformat(), info.end.isoformat())
        if (state.get("start"), state.get("end")) != window:
            chosen = ari.choose_instant(info)
            log.info(
                "the CA suggests renewing between %s and %s; chose %s%s",
                *window,
                chosen.isoformat(),
                f" (why: {info.explanation_url})" if info.explanation_url else "",
            )
            state = {**state, "start": window[0], "end": window[1], "chosen": chosen.isoformat()}
        if info.explanation_url:
            state["explanation_url"] = info.explanation_url
        delay = min(info.recheck_after, self.settings.ari_max_recheck)
        return {**state, "next_fetch": (now + delay).isoformat()}

    def _directory_field(self, name: str) -> object:
        """A field of the ACME directory, fetched at most once an hour."""
        now = time.monotonic()
        if self._directory is None or now - self._directory_at > 3600:
            try:
                self._directory = ari.directory(self.settings.directory, self._tls_to_ca)
                self._directory_at = now
            except (OSError, ValueError) as error:
                log.warning("the ACME directory is unreachable: %s", error)
                return None
        return self._directory.get(name)

    def _replaces(self, pair: CertificatePair) -> str | None:
        """The ARI ID of the certificate a renewal replaces (same names, ARI offered)."""
        if pair.names != frozenset(self.settings.domains):
            return None
        if not isinstance(self._directory_field("renewalInfo"), str):
            return None
        try:
            return ari.cert_id(pair.leaf)
        except ValueError:
            return None

    def _current_pair(self, now: dt.datetime) -> tuple[CertificatePair | None, str | None]:
        try:
            pair = self.certs.load()
        except ValueError as error:
            return None, str(error)
        if pair is None:
            return None, None
        if not self.settings.acme_enabled:
            expired = now >= pair.not_after
            return pair, f"it expired at {pair.not_after:%Y-%m-%d %H:%M} UTC" if expired else None
        return pair, unusable_reason(
            pair,
            self.settings.domains,
            now,
            issued.issued_by(self.storage, pair.fingerprint),
            self.settings.directory,
        )

    def _serve(self, pair: CertificatePair) -> None:
        """Make sure a registry generation serves ``pair``."""
        self.metrics.set_certificate(pair.names, pair.not_before, pair.not_after)
        if self.generations.current() is None:
            self.certs.adopt()
            log.info("starting the registry with %s", pair.describe())
            self.generations.ensure_running()
            self.metrics.registry_started()
            return
        served = self._served_fingerprint()
        if served is not None and served != pair.fingerprint:
            log.info("rotating the registry to %s", pair.describe())
            self.generations.rotate()
            self.metrics.registry_started()

    def _issue(self, extra: list[str], dry_run: bool = False) -> IssuanceResult:
        """Run one order in a child process; it stores the pair on success."""
        what = "a dry-run certificate" if dry_run else "a certificate"
        log.info("obtaining %s for %s", what, ", ".join(self.settings.domains))
        command = [sys.executable, "-m", "acme_registry", "issue", *extra]
        if dry_run:
            command.append("--dry-run")
        started = time.monotonic()
        try:
            child = subprocess.run(
                command, stdout=subprocess.PIPE, timeout=ISSUANCE_TIMEOUT, check=False
            )
            lines = child.stdout.decode(errors="replace").strip().splitlines()
            result = (
                IssuanceResult.from_json(lines[-1])
                if lines
                else IssuanceResult.failure(
                    "the issuing process gave no answer", FailureReason.OTHER
                )
            )
        except subprocess.TimeoutExpired:
            result = IssuanceResult.failure(
                "the issuing process gave no answer", FailureReason.OTHER
            )
        finally:
            if not dry_run:
                self.challenges.clear()
        if not dry_run:
            self.metrics.record_issuance(result, time.monotonic() - started)
        return result

    def _record_attempt(self, backoff: Backoff, result: IssuanceResult, now: dt.datetime) -> None:
        if result.ok:
            self._save_backoff(Backoff(last_attempt=now.isoformat(), config=self._config_id))
            return
        failures = backoff.failures + 1
        have_cert = self.certs.tls_file.exists()
        when = schedule.next_attempt(now, failures, have_cert, result.retry_after)
        self._save_backoff(
            Backoff(
                failures=failures,
                last_attempt=now.isoformat(),
                last_error=result.error,
                next_attempt=when.isoformat(),
                config=self._config_id,
            )
        )
        self._next_check = when
        log.error(
            "could not obtain a certificate: %s; next attempt at %s",
            result.error,
            f"{when:%Y-%m-%d %H:%M:%S} UTC",
        )

    # -- backoff state -------------------------------------------------------------

    def _config_fingerprint(self) -> str:
        s = self.settings
        text = "|".join((",".join(s.domains), s.directory, s.key_type, s.eab_kid or ""))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _load_backoff(self) -> Backoff:
        data = self.storage.load_json(statekeys.BACKOFF) or {}
        try:
            backoff = Backoff(**data)
        except TypeError:
            return Backoff(config=self._config_id)
        # A changed configuration starts over: the old failures say nothing about it.
        return backoff if backoff.config == self._config_id else Backoff(config=self._config_id)

    def _save_backoff(self, backoff: Backoff) -> None:
        self.storage.store_json(statekeys.BACKOFF, asdict(backoff))

    # -- answers on the control socket -------------------------------------------

    def _health(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def _ready_check(self) -> tuple[bool, str]:
        answer = self._ready({})
        if answer.get("ok"):
            return True, f"serving a certificate valid until {answer['not_after']}"
        return False, str(answer.get("error"))

    def _ready(self, request: dict[str, Any]) -> dict[str, Any]:
        now = utcnow()
        pair, problem = self._current_pair(now)
        if pair is None or problem is not None:
            return {"ok": False, "error": problem or "no certificate yet"}
        served = self._served_fingerprint()
        if served is None:
            return {"ok": False, "error": "the registry does not answer TLS"}
        if served != pair.fingerprint:
            return {"ok": False, "error": "the registry serves another certificate"}
        status = self._registry_status()
        if status not in (200, 401):
            return {"ok": False, "error": f"the registry answered /v2/ with {status}"}
        return {"ok": True, "not_after": pair.not_after.isoformat()}

    def _renew(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self.settings.acme_enabled:
            error = "ACME_ENABLED=false: replace TLS_CERT_FILE and TLS_KEY_FILE instead"
            return {"ok": False, "error": error}
        if request.get("dry_run"):
            return self._issue([], dry_run=True).answer()
        renew = RenewRequest()
        self._renew_request = renew
        self._wake.set()
        return renew.wait(ISSUANCE_TIMEOUT + 60)

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        now = utcnow()
        pair, problem = self._current_pair(now)
        backoff = self._load_backoff()
        answer: dict[str, Any] = {
            "ok": True,
            "domains": list(self.settings.domains),
            "directory": self.settings.directory,
            "certificate": None,
            "problem": problem,
            "next_check": self._next_check.isoformat() if self._next_check else None,
            "backoff": asdict(backoff),
        }
        if pair is not None:
            plan = self._plan or schedule.lifetime_renewal(pair.not_before, pair.not_after)
            answer["certificate"] = {
                "names": sorted(pair.names),
                "issuer": pair.issuer,
                "serial": f"{pair.serial:x}",
                "not_before": pair.not_before.isoformat(),
                "not_after": pair.not_after.isoformat(),
                "renewal": {"at": plan.at.isoformat(), "reason": plan.reason},
            }
        return answer

    # -- probing the registry ------------------------------------------------------

    def _tls_connection(self) -> ssl.SSLSocket:
        # We compare the served leaf with the stored one instead of verifying a chain:
        # the question is "is this registry serving our current pair", not "is the CA trusted".
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        addr = self.settings.registry_addr
        raw = socket.create_connection((addr.connect_host(), addr.port), timeout=PROBE_TIMEOUT)
        return context.wrap_socket(raw, server_hostname=self.settings.domains[0])

    def _served_fingerprint(self) -> str | None:
        try:
            with self._tls_connection() as conn:
                der = conn.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            return None
        return hashlib.sha256(der).hexdigest() if der else None

    def _registry_status(self) -> int | None:
        try:
            with self._tls_connection() as conn:
                host = self.settings.domains[0]
                conn.sendall(
                    f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\nUser-Agent: acme-registry-probe\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                head = conn.recv(64).decode("latin-1")
        except (OSError, ssl.SSLError):
            return None
        parts = head.split(" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _seconds_until(when: dt.datetime, now: dt.datetime, cap: float) -> float:
    return max(0.0, min((when - now).total_seconds(), cap))
