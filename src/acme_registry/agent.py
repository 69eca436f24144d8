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
import time
import xmlrpc.client
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from . import sharedcert, statechanges, statekeys
from .admin import AdminServer, Metrics
from .auth import UserStore, registry_auth_config
from .auth import control_handlers as user_handlers
from .certstore import CertificatePair, client_hostname
from .challenges import PendingChallenges
from .config import Settings
from .control import ControlServer, Handler
from .gcrunner import GcRunner, internal_user
from .outcome import FailureReason, IssuanceResult
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
from .sharedcert import CertificateMirror
from .sharedchallenges import SharedChallenges, account_thumbprint
from .sources import ISSUANCE_TIMEOUT, AcmeSource, Renewal, choose_source, utcnow
from .statestore import open_storage
from .storage import FileStorage, StorageConflict, StoreUnsafe, ensure_private_dir

if TYPE_CHECKING:
    from .tokenmode import TokenMode

log = logging.getLogger(__name__)

RETRY = 5.0


class Agent:
    def __init__(self, settings: Settings, registry_socket: RegistrySocket | None = None) -> None:
        self.settings = settings
        self.storage = open_storage(settings)
        # What is this replica's alone (its responder's tokens, a copy of http.secret).
        self.local = FileStorage(settings.data_dir)
        self.shared = settings.state.shared
        # A shared store: the one record polled every interval (statechanges).
        self.changes = statechanges.ChangeWatch(self.storage) if self.shared else None
        self.challenges = PendingChallenges(self.local)
        self.remote_challenges = (
            SharedChallenges(
                self.storage, settings.domains, stateless=settings.state.stateless_challenges
            )
            if self.shared
            else None
        )
        self.responder = ChallengeResponder(
            settings.domains,
            self.challenges.lookup,
            settings.http_port,
            remote=self.remote_challenges.lookup if self.remote_challenges else None,
        )
        self.generations = RegistryGenerations(
            Supervisor(settings.supervisor_socket),
            settings.registry_addr,
            settings.registry_config_dir,
            registry_socket,
        )
        self.users = (
            UserStore(
                self.storage,
                settings.data_dir / statekeys.HTPASSWD_FILE,
                settings.auth_users,
                saved=self._users_saved if self.shared else None,
                followed_copy=settings.data_dir / statekeys.USERS_COPY_FILE
                if self.shared
                else None,
            )
            if settings.auth_mode in ("htpasswd", "token")
            else None
        )
        # Made in start(): it writes its keyring into DATA_DIR.
        self.token: TokenMode | None = None
        self.metrics = Metrics()
        # Rotations and a collection's read-only window both switch generations: one at a time.
        self._registry_lock = threading.Lock()
        # htpasswd mode: retention's deletes go through an internal user. Token mode has
        # none (a user would be a password the token service accepts): the agent mints
        # retention's tokens itself (_retention_token).
        self._gc_user = (
            internal_user()
            if settings.gc.retention.enabled and settings.auth_mode == "htpasswd"
            else None
        )
        self.gc = GcRunner(
            settings,
            self.local,  # a collection is one replica's (its read-only window, its record)
            self.generations,
            self._registry_lock,
            self.metrics.registry,
            (self._gc_user[0], self._gc_user[1].secret)
            if self._gc_user and self.users is not None
            else None,
            self.metrics.registry_started,
            bearer=self._retention_token if settings.token is not None else None,
        )
        self.source = choose_source(
            settings, self.storage, self.challenges, self.metrics, self._serve
        )
        # A shared store: CERT_DIR mirrors the certificate record (ACME only: with
        # ACME_ENABLED=false each replica serves the operator's files).
        self.mirror: CertificateMirror | None = None
        if self.shared and isinstance(self.source, AcmeSource):
            self.mirror = CertificateMirror(self.storage, self.source.store, settings.domains)
            self.source.mirror = self.mirror
        self.store_error: str | None = None  # why the shared store could not be reached
        self._configured = False  # the registry's config rendered (it needs http.secret)
        self._users_ready = self.users is None
        self._cert_serial = -1  # the change watch's serial when the loop last read the record
        self._keyring_serial = -1  # the same, when token mode last read the keyring
        self._next_maintain = 0.0  # monotonic: when the source wants its next look
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
        if self.users is not None and self._gc_user is not None:
            self.users.env_users[self._gc_user[0]] = self._gc_user[1]
        if self.users is None:
            log.warning("AUTH_MODE=none: anyone who reaches the registry can push and pull")
        for step in (self._prepare_users, self._configure_registry):
            try:
                step()
            except OSError as error:
                if not self.shared:
                    raise
                # A replica must come up with the store down: it serves its cache if it
                # has one, stays unready if not, and finishes this once the store answers.
                self._store_failed(error)
        self.gc.start(utcnow())
        if self.shared:
            # Its own thread: the loop may wait minutes for an order, users must not.
            threading.Thread(target=self._follow_store, name="follow", daemon=True).start()
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

    def _prepare_users(self) -> None:
        """The htpasswd file, before any registry starts: without it the registry invents a
        user and logs its password. OSError when the store cannot be reached."""
        if self._users_ready or self.users is None:
            return
        if self._gc_user is not None:
            # The initial admin check must not count the collector's internal user.
            self.users.env_users.pop(self._gc_user[0], None)
        try:
            message = self.users.ensure_initial_admin()
        finally:
            if self._gc_user is not None:
                self.users.env_users[self._gc_user[0]] = self._gc_user[1]
        if self.shared:
            self.users.refresh()
        else:
            self.users.sync_htpasswd()
        if message:
            log.warning("%s", message)
        self._users_ready = True

    def _configure_registry(self) -> None:
        """Render the registry's config once (http.secret comes from the store)."""
        if self._configured:
            return
        auth = None
        if self.users is not None:
            auth = registry_auth_config(self.users.htpasswd_path, "acme-registry")
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
                # Shared store: one keyring for every replica, kept there.
                shared=self.storage if self.shared else None,
            )
            extra = self.token.registry_config(utcnow())
            auth = extra["auth"]
        config = render_config(
            self.settings,
            self._http_secret(),
            self.source.store.tls_file,
            self.settings.registry_env,
            auth,
        )
        if "storage" in config and "storage" in extra:
            # Without a storage section the environment configures it, and the launcher
            # passes REGISTRY_STORAGE_DELETE_ENABLED instead.
            config["storage"].update(extra["storage"])
        self.generations.configure(config)
        self._configured = True

    def _retention_token(self, repository: str) -> str:
        """Token mode: the bearer token of one retention API call on ``repository``."""
        if self.token is None:  # the registry's config is not rendered yet: none serves
            raise RuntimeError("token mode is not set up yet")
        return self.token.internal_token(repository, utcnow())

    def _http_secret(self) -> str:
        """The registry's http.secret: with a shared store the one every replica uses
        (uploads then cross replicas), copied into DATA_DIR for a start with the store down."""
        if not self.shared:
            return http_secret(self.storage)
        try:
            secret = http_secret(self.storage)
        except OSError:
            cached = self.local.load_bytes(statekeys.HTTP_SECRET)
            if cached is None:
                raise
            log.warning("the state store is unreachable: using the cached http.secret")
            return cached.decode().strip()
        if self.local.load_bytes(statekeys.HTTP_SECRET) != secret.encode() + b"\n":
            self.local.store(statekeys.HTTP_SECRET, secret.encode() + b"\n")
        return secret

    def maintain_forever(self) -> None:
        """The maintenance loop; runs on its own thread until :meth:`stop`."""
        while not self._stopping.is_set():
            renewals = self._take_renewals()
            try:
                if self.shared:
                    wait = self._maintain_shared(renewals)
                else:
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
                if self.shared:
                    wait = min(wait, self.settings.state.poll_interval)
            wait = min(wait, self._maintain_gc())
            self._wake.wait(timeout=wait)
            self._wake.clear()
        for renewal in self._take_renewals():
            renewal.cancel()

    # -- a shared store (several replicas) ---------------------------------------------

    def _maintain_shared(self, renewals: list[Renewal]) -> float:
        """One look at the shared records, then the source's step when it is due.

        Every poll interval: the certificate record (a new one is served at once); the
        source (renewal, the orderer's lock) only when it asked to be woken, when the record
        changed, or for `renew`. With the store down: serve the cache, order nothing.
        """
        poll = self.settings.state.poll_interval
        changed = self._poll_store()
        if self.store_error is not None:
            for renewal in renewals:
                renewal.set_result(
                    IssuanceResult.failure(
                        f"the state store cannot be reached ({self.store_error}): "
                        "no order is placed until it answers",
                        FailureReason.STORAGE,
                    )
                )
            self._serve_cache()
            return poll
        if self.mirror is not None and self.mirror.seen and self.mirror.version is None:
            changed = self._publish_cache() or changed
        self._follow_token_keys()
        now = time.monotonic()
        if renewals or changed or now >= self._next_maintain:
            wait = self.source.maintain(utcnow(), renewals)
            self._next_maintain = time.monotonic() + wait
        return max(0.0, min(poll, self._next_maintain - time.monotonic()))

    def _poll_store(self) -> bool:
        """Read the shared records; True when CERT_DIR got a new certificate from them."""
        try:
            self._prepare_users()
            self._configure_registry()
            # The change record is polled by a thread of its own (_follow_store), which also
            # follows the users; the certificate record is read when that record changed.
            assert self.changes is not None
            serial = self.changes.serial
            changed = False
            if self.mirror is not None and (
                serial != self._cert_serial or self.store_error is not None
            ):
                changed = self.mirror.sync()
            self._cert_serial = serial
            self._learn_thumbprint()
            if self.changes.error is not None:
                # The follower thread's last look failed: look again before acting on it
                # (a `renew` just as the store came back must not be refused). Raises
                # OSError while the store is still down.
                self.changes.look()
        except OSError as error:
            self._store_failed(error)
            return False
        except StoreUnsafe as error:
            # Found once the store answered (it was down at start): use nothing of it.
            self._store_failed(OSError(str(error)))
            return False
        if self.store_error is not None:
            log.info("the state store answers again")
        self.store_error = None
        self.metrics.state_store_up.set(1)
        return changed

    def _publish_cache(self) -> bool:
        """No shared record yet, but a servable pair here (a single instance becoming
        replicas): it becomes the record, so the others serve it instead of ordering."""
        pair, problem = self.source.current(utcnow())
        if pair is None or problem is not None:
            return False
        try:
            sharedcert.commit(self.storage, pair, self.settings.directory, None, utcnow())
        except StorageConflict:
            return False  # another replica made the record first: the next look takes it
        log.info("published the cached %s as the shared certificate", pair.describe())
        return True

    def _follow_store(self) -> None:
        """Every poll interval one conditional GET, of the change record; when it changed,
        the users are read here and the loop is woken to read the certificate record."""
        assert self.changes is not None
        users_serial = 0
        while not self._stopping.wait(self.settings.state.poll_interval):
            try:
                serial = self.changes.look()
            except OSError:
                continue  # the loop notices the store is down (changes.error) and says so
            except Exception as error:  # the thread must outlive anything a look raises
                log.exception("looking at the shared change record failed")
                self.changes.error = f"the change record could not be read: {error}"
                continue
            if serial != self._cert_serial:
                self._wake.set()
            if self.users is None or not self._users_ready or serial == users_serial:
                continue  # the loop prepares the users first, once the store answers
            try:
                self.users.refresh()
                users_serial = serial
            except OSError:
                pass  # the next look tries again
            except Exception:  # the thread must outlive a bad record
                log.exception("reading the shared users failed")

    def _users_saved(self) -> None:
        statechanges.bump(self.storage)  # the other replicas read the users again

    def _store_failed(self, error: OSError) -> None:
        if self.store_error is None:
            log.error(
                "the state store cannot be reached (%s): serving the cached certificate, "
                "placing no orders, refusing user changes",
                error,
            )
        self.store_error = str(error) or type(error).__name__
        self.metrics.state_store_up.set(0)

    def _serve_cache(self) -> None:
        """The store is down: keep serving (or start serving) the pair in CERT_DIR."""
        users_cached = self.users is None or self.users.htpasswd_path.exists()
        if not self._configured or not (self._users_ready or users_cached):
            return  # no http.secret or htpasswd yet: this replica stays unready
        pair = self.source.store.load_quietly()
        if pair is None or pair.names != frozenset(self.settings.domains):
            return
        if utcnow() >= pair.not_after:
            return
        self._serve(pair)

    def _learn_thumbprint(self) -> None:
        """STATE_STATELESS_CHALLENGES: the account key's thumbprint, known before the store
        goes down (the account is made by the first order)."""
        remote = self.remote_challenges
        if remote is None or not remote.stateless or remote.thumbprint is not None:
            return
        pem = self.storage.load_bytes(statekeys.account_key(self.settings.directory_id))
        if pem is None:
            return
        try:
            remote.thumbprint = account_thumbprint(pem)
        except ValueError as error:
            log.error("STATE_STATELESS_CHALLENGES: %s", error)

    def _maintain_gc(self) -> float:
        """Start a scheduled collection when due (on its own thread: a long one never holds
        up this loop); seconds until the next one (inf when off)."""
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
            # Never during a collection's switch into or out of its read-only window; inside
            # the window the new generation is read-only too (RegistryGenerations.rotate).
            with self._registry_lock:
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
        with self._registry_lock:  # never during a collection's switch
            self.generations.rotate()
        self.metrics.registry_started()
        return True

    def _follow_token_keys(self) -> None:
        """Shared store: follow the keyring other replicas may advance, and advance it when
        due; a new bundle starts a registry generation here too (tokenrollover)."""
        if self.token is None:
            return
        assert self.changes is not None
        serial = self.changes.serial  # the keyring is read again only when it moved
        try:
            self.token.maintain(
                utcnow(), self._rotate_for_token_keys, look=serial != self._keyring_serial
            )
            self._keyring_serial = serial
        except OSError as error:
            # The store went away since the look above: the next step tries again, and
            # the keyring in memory keeps signing.
            log.error("following the token keyring failed: %s", error)
        except Exception:  # a record that cannot be opened must not stop the loop
            log.exception("following the token keyring failed")

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
        # No refusal here on the store's last known state, which may be a step old (the
        # store just came back): the loop's step looks again and answers this renewal.
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
        return self.gc.request(dry_run=bool(request.get("dry_run")))

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
            "state_store": {
                "store": self.settings.state.store,
                "reachable": self.store_error is None,
                "error": self.store_error,
            },
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
