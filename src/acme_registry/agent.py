"""The agent: the one maintenance loop (like certmagic's maintain.go), and the wiring.

It opens port 80, the control socket and the admin endpoint, then loops: ask the
certificate source (:mod:`sources`, chosen once at start: ACME or the operator's files) to
bring the served pair up to date, make sure a registry generation serves it (starting or
rotating generations through supervisord's XML-RPC socket), and sleep until the next
look or a `renew` request. It runs as a thread of the supervisord process: one Python
process less, in memory and at start-up.
"""

from __future__ import annotations

import logging
import queue
import threading
import xmlrpc.client
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from . import statekeys
from .admin import AdminServer, Metrics
from .auth import UserStore, registry_auth_config
from .auth import control_handlers as user_handlers
from .certstore import CertificatePair, client_hostname
from .challenges import PendingChallenges
from .config import Settings
from .control import ControlServer, Handler
from .gcrunner import GcRunner, internal_user
from .gcrunner import answer as gc_answer
from .outcome import IssuanceResult
from .registry import (
    RegistryGenerations,
    RegistryProbe,
    Supervisor,
    http_secret,
    probe_registry,
    render_config,
)
from .registry_socket import RegistrySocket
from .responder import ChallengeResponder
from .sources import ISSUANCE_TIMEOUT, Renewal, choose_source, utcnow
from .statestore import open_storage
from .storage import ensure_private_dir

if TYPE_CHECKING:
    from .tokenmode import TokenMode

log = logging.getLogger(__name__)

RETRY = 5.0


class Agent:
    def __init__(self, settings: Settings, registry_socket: RegistrySocket | None = None) -> None:
        self.settings = settings
        self.storage = open_storage(settings)
        self.challenges = PendingChallenges(self.storage)
        self.responder = ChallengeResponder(
            settings.domains, self.challenges.lookup, settings.http_port
        )
        self.generations = RegistryGenerations(
            Supervisor(settings.supervisor_socket),
            settings.registry_addr,
            settings.registry_config_dir,
            registry_socket,
        )
        self.users = (
            UserStore(
                self.storage, settings.data_dir / statekeys.HTPASSWD_FILE, settings.auth_users
            )
            if settings.auth_mode in ("htpasswd", "token")
            else None
        )
        # Made in start(): it writes its keyring into DATA_DIR.
        self.token: TokenMode | None = None
        self.metrics = Metrics()
        # Rotations and a collection's read-only window both switch generations: one at a time.
        self._registry_lock = threading.Lock()
        self._gc_user = internal_user() if settings.gc.retention.enabled else None
        self.gc = GcRunner(
            settings,
            self.storage,
            self.generations,
            self._registry_lock,
            self.metrics.registry,
            (self._gc_user[0], self._gc_user[1].secret)
            if self._gc_user and self.users is not None
            else None,
            self.metrics.registry_started,
        )
        self.source = choose_source(
            settings, self.storage, self.challenges, self.metrics, self._serve
        )
        self.admin = AdminServer(
            settings.admin_addr.host, settings.admin_addr.port, self.metrics, self._ready_check
        )
        handlers: dict[str, Handler] = {
            "health": self._health,
            "ready": self._ready,
            "status": self._status,
            "renew": self._renew,
            "gc": self._gc,
        }
        if self.users is not None:
            describe = self._describe_grants if settings.token is not None else None
            handlers.update(user_handlers(self.users, describe))
        self.control = ControlServer(settings.control_socket, handlers)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # Every `renew` waiting for the loop; each is answered by the next attempt.
        self._renewals: queue.SimpleQueue[Renewal] = queue.SimpleQueue()

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
            if self._gc_user is not None:
                # After the initial admin check, which must not count it as a user.
                self.users.env_users[self._gc_user[0]] = self._gc_user[1]
            self.users.sync_htpasswd()
            if message:
                log.warning("%s", message)
            auth = registry_auth_config(self.users.htpasswd_path, "acme-registry")
        else:
            log.warning("AUTH_MODE=none: anyone who reaches the registry can push and pull")
        extra: dict[str, Any] = {}
        if self.settings.token is not None and self.users is not None:
            # Here, not at the top: outside token mode the agent never loads cryptography.
            from .tokenmode import TokenMode, registry_key_reference

            self.token = TokenMode(
                self.settings.token,
                self.settings.data_dir,
                self.users,
                self.metrics,
                utcnow(),
                registry_key_reference(self.settings.registry_binary),
            )
            extra = self.token.registry_config(utcnow())
            auth = extra["auth"]
        config = render_config(
            self.settings,
            http_secret(self.storage),
            self.source.store.tls_file,
            self.settings.registry_env,
            auth,
        )
        if "storage" in config and "storage" in extra:
            # Without a storage section the environment configures it, and the launcher
            # passes REGISTRY_STORAGE_DELETE_ENABLED instead.
            config["storage"].update(extra["storage"])
        self.generations.configure(config)
        self.gc.start(utcnow())
        if self.settings.http_port:  # 0: ACME_HTTP_PORT=off (a DNS challenge)
            self.responder.start()
        self.control.start()
        try:
            self.admin.start()
        except OSError as error:
            # A monitoring port must not take the registry down.
            log.error("admin endpoint on %s unavailable: %s", self.settings.admin_addr, error)
        log.info(
            "agent started for %s; %s",
            ", ".join(self.settings.domains),
            f"port {self.responder.port} answers HTTP-01 and redirects to https"
            if self.settings.http_port
            else "no port-80 listener (ACME_HTTP_PORT=off)",
        )

    def maintain_forever(self) -> None:
        """The maintenance loop; runs on its own thread until :meth:`stop`."""
        while not self._stopping.is_set():
            renewals = self._take_renewals()
            try:
                if self.token is not None:
                    self.token.maintain(utcnow(), self._rotate_for_token_keys)
                wait = self.source.maintain(utcnow(), renewals)
                if self.token is not None and self.token.failed_to_listen:
                    wait = min(wait, RETRY)
            except (OSError, xmlrpc.client.Error) as error:
                if self._stopping.is_set():
                    break  # supervisord is shutting down around us
                log.error("maintenance step failed: %s; trying again in %d s", error, RETRY)
                wait = RETRY
            wait = min(wait, self._maintain_gc())
            self._wake.wait(timeout=wait)
            self._wake.clear()
        for renewal in self._take_renewals():
            renewal.cancel()

    def _maintain_gc(self) -> float:
        """A scheduled collection when due; seconds until the next one (inf when off)."""
        try:
            if self.generations.current() is not None:
                self.gc.run_if_due(utcnow())
        except (OSError, xmlrpc.client.Error) as error:
            log.error("scheduled garbage collection failed: %s", error)
        due = self.gc.seconds_until_due(utcnow())
        return float("inf") if due is None else due

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.gc.stop()
        self.admin.stop()
        if self.token is not None:
            self.token.stop()
        self.control.stop()
        self.responder.stop()
        log.info("agent stopped")

    def _take_renewals(self) -> list[Renewal]:
        taken: list[Renewal] = []
        while True:
            try:
                renewal = self._renewals.get_nowait()
            except queue.Empty:
                return taken
            if renewal.set_running_or_notify_cancel():
                taken.append(renewal)

    # -- serving ---------------------------------------------------------------------

    def _serve(self, pair: CertificatePair) -> None:
        """Make sure a registry generation serves ``pair``."""
        self.metrics.set_certificate(pair.names, pair.not_before, pair.not_after)
        if self.generations.current() is None:
            self.source.store.adopt()
            log.info("starting the registry with %s", pair.describe())
            self.generations.ensure_running()
            self.metrics.registry_started()
            self._token_follows()
            return
        served = self._probe(request=False).fingerprint
        if served is not None and served != pair.fingerprint:
            log.info("rotating the registry to %s", pair.describe())
            # With a shared socket the old generation stops only once the new pair is served.
            with self._registry_lock:  # never inside a collection's read-only window
                self.generations.rotate(
                    serving=lambda: self._probe(request=False).fingerprint == pair.fingerprint
                )
            self.metrics.registry_started()
            self._token_follows()
        elif self.token is not None and self.token.server is None:
            self._token_follows()  # an earlier start of the token service failed

    def _token_follows(self) -> None:
        """The token service serves the certificate the registry now serves."""
        if self.token is None:
            return
        try:
            self.token.serve(self.source.store.tls_file)
        except (OSError, ValueError) as error:
            # The launcher checked TOKEN_ADDR, so this is a port taken since: the registry
            # keeps serving, and the next loop step tries again.
            log.error("token service unavailable: %s", error)

    def _rotate_for_token_keys(self) -> bool:
        """A generation that reads the new token bundle (same TLS certificate); False when
        none runs yet (the first one, started later, reads it)."""
        if self.generations.current() is None:
            return False
        self.generations.rotate()
        self.metrics.registry_started()
        return True

    def _describe_grants(self, name: str) -> str:
        return self.token.describe_grants(name) if self.token is not None else "everything"

    def _probe(self, request: bool = True) -> RegistryProbe:
        return probe_registry(
            self.settings.registry_addr, client_hostname(self.settings.domains), request=request
        )

    # -- answers on the control socket -------------------------------------------

    def _health(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def _ready_check(self) -> tuple[bool, str]:
        answer = self._ready({})
        if answer.get("ok"):
            return True, f"serving a certificate valid until {answer['not_after']}"
        return False, str(answer.get("error"))

    def _ready(self, request: dict[str, Any]) -> dict[str, Any]:
        pair, problem = self.source.current(utcnow())
        if pair is None or problem is not None:
            return {"ok": False, "error": problem or "no certificate yet"}
        probe = self._probe()
        if probe.fingerprint is None:
            return {"ok": False, "error": "the registry does not answer TLS"}
        if probe.fingerprint != pair.fingerprint:
            return {"ok": False, "error": "the registry serves another certificate"}
        if probe.status not in (200, 401):
            return {"ok": False, "error": f"the registry answered /v2/ with {probe.status}"}
        return {"ok": True, "not_after": pair.not_after.isoformat()}

    def _renew(self, request: dict[str, Any]) -> dict[str, Any]:
        refused = self.source.renewal_refused()
        if refused:
            return {"ok": False, "error": refused}
        if request.get("dry_run"):
            return self.source.dry_run().answer()
        renewal: Renewal = Future()
        self._renewals.put(renewal)
        self._wake.set()
        try:
            result: IssuanceResult = renewal.result(timeout=ISSUANCE_TIMEOUT + 60)
        except FutureTimeout:
            return {"ok": False, "error": "the renewal did not finish"}
        except Exception as error:  # the step failed (or the agent stopped) before an answer
            return {"ok": False, "error": f"the renewal did not finish: {error}"}
        return result.answer()

    def _gc(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.generations.current() is None:
            return {"ok": False, "error": "the registry does not run yet"}
        report = self.gc.run(dry_run=bool(request.get("dry_run")))
        return gc_answer(report, self.gc.tag_delete)

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        now = utcnow()
        pair, problem = self.source.current(now)
        state = self.source.status(pair)
        answer: dict[str, Any] = {
            "ok": True,
            "domains": list(self.settings.domains),
            "directory": self.settings.directory,
            "certificate": None,
            "problem": problem,
            "next_check": state["next_check"],
            "backoff": state["backoff"],
            "gc": self.gc.status(),
        }
        if "dns_persist_problem" in state:
            answer["dns_persist_problem"] = state["dns_persist_problem"]
        if pair is not None:
            answer["certificate"] = {
                "names": sorted(pair.names),
                "issuer": pair.issuer,
                "serial": f"{pair.serial:x}",
                "not_before": pair.not_before.isoformat(),
                "not_after": pair.not_after.isoformat(),
                "renewal": state["renewal"],
            }
        return answer
