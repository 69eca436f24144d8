"""The agent: the one maintenance loop (like certmagic's maintain.go).

It serves port 80 and the control socket, decides from the stored pair whether an order
is needed, runs the order in a short-lived child process (so the long-running agent never
loads the ACME stack), and starts or rotates the registry through supervisord.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import signal
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from . import schedule
from .certstore import CertificatePair, CertStore, unusable_reason
from .challenges import PendingChallenges
from .config import Settings
from .control import ControlServer
from .registry import RegistryGenerations, Supervisor, http_secret, render_config, write_config
from .responder import ChallengeResponder
from .storage import FileStorage, ensure_private_dir

log = logging.getLogger(__name__)

ISSUANCE_TIMEOUT = 300
PROBE_TIMEOUT = 3.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def issued_key(fingerprint: str) -> str:
    return f"issued/{fingerprint}.json"


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
        self.certs = CertStore(settings.cert_dir)
        self.challenges = PendingChallenges(self.storage)
        self.responder = ChallengeResponder(
            settings.domains, self.challenges.lookup, settings.http_port
        )
        self.generations = RegistryGenerations(
            Supervisor(settings.supervisor_socket), settings.registry_addr
        )
        self.control = ControlServer(
            settings.control_socket,
            {"health": self._health, "ready": self._ready, "status": self._status},
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._next_check: dt.datetime | None = None
        self._config_id = self._config_fingerprint()

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        ensure_private_dir(self.settings.data_dir)
        ensure_private_dir(self.settings.run_dir)
        self.settings.cert_dir.mkdir(parents=True, exist_ok=True)
        self.challenges.clear()
        write_config(
            self.settings.registry_config,
            render_config(
                self.settings,
                http_secret(self.storage),
                self.certs.tls_file,
                self.settings.registry_env,
            ),
        )
        self.responder.start()
        self.control.start()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "agent started for %s; challenges on port %d",
            ", ".join(self.settings.domains),
            self.responder.port,
        )
        try:
            while not self._stopping.is_set():
                wait = self._maintain()
                self._wake.wait(timeout=wait)
                self._wake.clear()
        finally:
            self.control.stop()
            self.responder.stop()
        log.info("agent stopped")
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping.set()
        self._wake.set()

    # -- the maintenance step ----------------------------------------------------

    def _maintain(self) -> float:
        """Bring the served certificate up to date; return seconds until the next look."""
        now = utcnow()
        pair, problem = self._current_pair(now)
        if pair is not None and problem is None:
            self._serve(pair)
            plan = schedule.lifetime_renewal(pair.not_before, pair.not_after)
            if now < plan.at:
                self._next_check = plan.at
                return _seconds_until(plan.at, now, cap=12 * 3600)
            log.info("renewal due (%s)", plan.reason)
        elif problem:
            log.info("the stored certificate cannot be served: %s", problem)

        backoff = self._load_backoff()
        if backoff.next_attempt and now < dt.datetime.fromisoformat(backoff.next_attempt):
            when = dt.datetime.fromisoformat(backoff.next_attempt)
            self._next_check = when
            return _seconds_until(when, now, cap=12 * 3600)

        if self._issue():
            self._save_backoff(Backoff(config=self._config_id))
            return 0.0
        return 1.0

    def _current_pair(self, now: dt.datetime) -> tuple[CertificatePair | None, str | None]:
        try:
            pair = self.certs.load()
        except ValueError as error:
            return None, str(error)
        if pair is None:
            return None, None
        record = self.storage.load_json(issued_key(pair.fingerprint))
        issued_by = record.get("directory") if record else None
        return pair, unusable_reason(
            pair, self.settings.domains, now, issued_by, self.settings.directory
        )

    def _serve(self, pair: CertificatePair) -> None:
        """Make sure a registry generation serves ``pair``."""
        if self.generations.current() is None:
            self.certs.adopt()
            log.info("starting the registry with %s", pair.describe())
            self.generations.ensure_running()
            return
        served = self._served_fingerprint()
        if served is not None and served != pair.fingerprint:
            log.info("rotating the registry to %s", pair.describe())
            self.generations.rotate()

    def _issue(self) -> bool:
        """Run one order in a child process; it stores the pair on success."""
        now = utcnow()
        log.info("obtaining a certificate for %s", ", ".join(self.settings.domains))
        try:
            child = subprocess.run(
                [sys.executable, "-m", "acme_registry", "issue"],
                stdout=subprocess.PIPE,
                timeout=ISSUANCE_TIMEOUT,
                check=False,
            )
            answer = json.loads(child.stdout.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            answer = {"ok": False, "error": "the issuing process gave no answer"}
        finally:
            self.challenges.clear()
        if answer.get("ok"):
            return True
        backoff = self._load_backoff()
        failures = backoff.failures + 1
        have_cert = self.certs.tls_file.exists()
        when = schedule.next_attempt(now, failures, have_cert)
        self._save_backoff(
            Backoff(
                failures=failures,
                last_attempt=now.isoformat(),
                last_error=str(answer.get("error")),
                next_attempt=when.isoformat(),
                config=self._config_id,
            )
        )
        log.error(
            "could not obtain a certificate: %s; next attempt at %s",
            answer.get("error"),
            f"{when:%Y-%m-%d %H:%M:%S} UTC",
        )
        return False

    # -- backoff state -------------------------------------------------------------

    def _config_fingerprint(self) -> str:
        s = self.settings
        text = "|".join((",".join(s.domains), s.directory, s.key_type, s.eab_kid or ""))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _load_backoff(self) -> Backoff:
        data = self.storage.load_json("state/backoff.json") or {}
        try:
            backoff = Backoff(**data)
        except TypeError:
            return Backoff(config=self._config_id)
        # A changed configuration starts over: the old failures say nothing about it.
        return backoff if backoff.config == self._config_id else Backoff(config=self._config_id)

    def _save_backoff(self, backoff: Backoff) -> None:
        self.storage.store_json("state/backoff.json", asdict(backoff))

    # -- answers on the control socket -------------------------------------------

    def _health(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

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
            plan = schedule.lifetime_renewal(pair.not_before, pair.not_after)
            answer["certificate"] = {
                "names": sorted(pair.names),
                "issuer": pair.issuer,
                "serial": f"{pair.leaf.serial_number:x}",
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
