"""The agent's retention + garbage-collection runs: when, against what, and what is left.

:class:`GcRunner` wires :func:`gc.run_gc` to the serving registry: the read-only window is a
pair of generation switches (:meth:`RegistryGenerations.enter_readonly` /
``leave_readonly``), the API calls go to the served port as an internal htpasswd user (in
token mode with bearer tokens the agent mints itself, one repository's ``pull,delete`` each:
:meth:`TokenMode.internal_token <acme_registry.tokenmode.TokenMode.internal_token>`), and
each run is recorded in ``DATA_DIR/state/gc.json`` (for ``status``) and in the metrics.

One run at a time. A scheduled run goes on a thread of its own, so a long collection never
holds up the maintenance loop (a renewal, a `renew` request); `acme-registry gc` during a
run waits for that run and answers with its result, saying so. Only the generation switches
(into the read-only window, out of it) hold the agent's registry lock, as a certificate
rotation does: a rotation inside the window starts a read-only generation on the new
certificate (:meth:`RegistryGenerations.rotate`), and the window's end moves to read-write
with it. :mod:`gc` (and with it requests) is imported at the first run only: the
long-running agent stays small when no collection runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .auth import Credential, generate_password
from .config import Settings
from .gcconfig import RetentionRules, next_run
from .registry import RegistryGenerations
from .registrytree import FilesystemTree, take_snapshot
from .storage import Storage

if TYPE_CHECKING:
    import requests

    from . import gc

log = logging.getLogger(__name__)

GC_STATE = "state/gc.json"  # the last run and the last success, for `status`
GC_USER = "acme-registry-gc"  # the htpasswd user retention's API deletes go through
GC_USER_SOURCE = "internal (retention)"
DEFAULT_STORAGE_ROOT = "/var/lib/registry"
# acme_registry_storage_bytes is refreshed after each run and at most this often otherwise.
STORAGE_BYTES_REFRESH = 600.0
RESULTS = ("success", "error", "timeout", "refused")


def storage_root(registry_env: Mapping[str, str]) -> Path:
    """The registry's filesystem root, as the generations get it."""
    for name, value in registry_env.items():
        if name.upper() == "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY" and value.strip():
            return Path(value.strip())
    return Path(DEFAULT_STORAGE_ROOT)


def filesystem_storage(registry_env: Mapping[str, str]) -> bool:
    """Whether the registry stores on the filesystem (the only tree read so far)."""
    for name, value in registry_env.items():
        if name.upper() == "REGISTRY_STORAGE":
            return value.strip().lower() in ("", "filesystem")
    return True


def blob_descriptor_cache(registry_env: Mapping[str, str]) -> str | None:
    for name, value in registry_env.items():
        if name.upper() == "REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR":
            return value
    return None


def redis_addr(registry_env: Mapping[str, str]) -> str | None:
    """REGISTRY_REDIS_ADDR (2.x), or REGISTRY_REDIS_ADDRS (3.x's list), when set."""
    for name, value in registry_env.items():
        if name.upper() in ("REGISTRY_REDIS_ADDR", "REGISTRY_REDIS_ADDRS") and value.strip():
            return value
    return None


def internal_user() -> tuple[str, Credential]:
    """The internal user (a new random password each start), as an extra configured user:
    ``user list`` shows where it comes from and ``user remove`` refuses it."""
    return GC_USER, Credential(generate_password(), hashed=False, source=GC_USER_SOURCE)


class GcMetrics:
    """The collection's series, in the agent's metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.storage_bytes = Gauge(
            "acme_registry_storage_bytes",
            "Bytes of every blob in the registry's storage.",
            registry=registry,
        )
        self.storage_bytes.set(float("nan"))
        self.runs = Counter(
            "acme_registry_gc_runs_total",
            "Retention + garbage-collection runs, by result.",
            ["result"],
            registry=registry,
        )
        for result in RESULTS:
            self.runs.labels(result=result)
        self.freed = Counter(
            "acme_registry_gc_freed_bytes_total",
            "Bytes of the blobs garbage collection deleted.",
            registry=registry,
        )
        self.removed_tags = Counter(
            "acme_registry_retention_removed_tags_total",
            "Tags retention removed.",
            registry=registry,
        )
        self.last_success = Gauge(
            "acme_registry_gc_last_success_timestamp_seconds",
            "When the last successful run finished (unix seconds).",
            registry=registry,
        )
        self.readonly = Gauge(
            "acme_registry_readonly",
            "1 while the registry serves read-only for a collection.",
            registry=registry,
        )

    def record(self, report: gc.GcReport) -> None:
        if report.dry_run:
            return
        self.runs.labels(result=report.result).inc()
        self.freed.inc(report.freed_bytes)
        self.removed_tags.inc(report.tags_removed)
        if report.result == "success" and report.finished is not None:
            self.last_success.set(report.finished.timestamp())


class GcRunner:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        generations: RegistryGenerations,
        registry_lock: threading.Lock,
        metrics_registry: CollectorRegistry,
        credentials: tuple[str, str] | None,
        generation_started: Callable[[], None] = lambda: None,
        bearer: Callable[[str], str] | None = None,
    ) -> None:
        """``credentials``: the internal htpasswd user's (htpasswd mode); ``bearer``: mints
        a token for a repository (token mode), sent instead."""
        self.settings = settings
        self.storage = storage
        self.generations = generations
        self.lock = registry_lock
        self.metrics = GcMetrics(metrics_registry)
        self.credentials = credentials
        self.bearer = bearer
        self.generation_started = generation_started
        self.tree = FilesystemTree(storage_root(settings.registry_env))
        self._tag_delete: bool | None = None
        self._next: dt.datetime | None = None
        self._bytes_at = 0.0
        # The run going on (None or done: none), what started it and when, for a joiner.
        self._state_lock = threading.Lock()
        self._current: Future[gc.GcReport] | None = None
        self._current_what = ""

    # -- the schedule -----------------------------------------------------------------------

    def start(self, now: dt.datetime) -> None:
        self._next = next_run(self.settings.gc.schedule, now)
        if self._next is not None:
            log.info(
                "garbage collection scheduled %s; next run %s",
                self.settings.gc.schedule.text,
                self._next.isoformat(),
            )

    @property
    def next_run(self) -> dt.datetime | None:
        return self._next

    def seconds_until_due(self, now: dt.datetime) -> float | None:
        if self._next is None:
            return None
        return max(0.0, (self._next - now).total_seconds())

    def run_if_due(self, now: dt.datetime) -> None:
        """The maintenance loop's step: start a scheduled run on its own thread when its
        time has come (never waits for it), and refresh the storage gauge now and then."""
        if self._next is not None and now >= self._next:
            # Strictly after now: a run longer than the interval skips the slots it covers.
            self._next = next_run(self.settings.gc.schedule, now)
            claimed = self._claim(f"a scheduled run started at {now.isoformat()}")
            if claimed is None:
                log.warning(
                    "scheduled garbage collection skipped: %s is still going; next %s",
                    self._current_what,
                    self._next,
                )
                return
            threading.Thread(
                target=self._execute, args=(claimed,), name="gc-scheduled", daemon=True
            ).start()
            log.info("scheduled garbage collection started; next %s", self._next)
        elif time.monotonic() - self._bytes_at > STORAGE_BYTES_REFRESH and not self.running:
            self.refresh_storage_bytes()

    @property
    def running(self) -> bool:
        with self._state_lock:
            return self._current is not None and not self._current.done()

    def refresh_storage_bytes(self) -> None:
        self._bytes_at = time.monotonic()
        if not filesystem_storage(self.settings.registry_env):
            return  # no tree to measure (S3 needs a listing): the gauge stays NaN
        try:
            self.metrics.storage_bytes.set(take_snapshot(self.tree).total_bytes)
        except OSError as error:
            log.warning("cannot measure the registry's storage: %s", error)

    # -- one run ----------------------------------------------------------------------------

    def request(self, *, dry_run: bool) -> dict[str, Any]:
        """`acme-registry gc [--dry-run]`: the control socket's answer, once the run is done.

        A dry run only reads, so it runs at once, beside a run that may be going. Otherwise,
        when a run is going already (the schedule's, or another `gc`), this waits for it and
        answers with its result, with ``joined`` saying whose it was: one run at a time,
        and the caller still learns how the run it asked for went.
        """
        if dry_run:
            return answer(self._run_once(dry_run=True), self.tag_delete)
        claimed = self._claim(f"a run asked for at {dt.datetime.now(dt.UTC).isoformat()}")
        if claimed is not None:
            return answer(self._execute(claimed), self.tag_delete)
        with self._state_lock:
            going, what = self._current, self._current_what
        assert going is not None  # the claim failed: a run was going
        return {**answer(going.result(), self.tag_delete), "joined": what}

    def _claim(self, what: str) -> Future[gc.GcReport] | None:
        """The right to run (a future its report goes to), or None while one is going."""
        with self._state_lock:
            if self._current is not None and not self._current.done():
                return None
            self._current = Future()
            self._current.set_running_or_notify_cancel()
            self._current_what = what
            return self._current

    def _execute(self, claimed: Future[gc.GcReport]) -> gc.GcReport:
        """The claimed run: retention, the window, the record; its report goes to
        ``claimed`` on every path, so a joiner is always answered."""
        from . import gc

        report: gc.GcReport | None = None
        try:
            try:
                report = self._run_once(dry_run=False)
            except Exception as error:  # _run_once reports its own failures; a bug here
                report = _failed(gc, str(error) or type(error).__name__)
            self.metrics.record(report)
            self._remember(report)
            self.refresh_storage_bytes()
            level = logging.INFO if report.ok else logging.ERROR
            log.log(
                level,
                "garbage collection %s: %d tag(s) removed, %d byte(s) freed%s",
                report.result,
                report.tags_removed,
                report.freed_bytes,
                f"; {report.error_line()}" if report.error_line() else "",
            )
            return report
        finally:
            claimed.set_result(report or _failed(gc, "the run was interrupted"))

    def stop(self) -> None:
        """The agent is stopping: no garbage-collect may outlive it."""
        if self.running:
            from . import gc

            gc.stop_running()

    def tag_delete(self) -> bool:
        from . import gc

        if self._tag_delete is None:
            self._tag_delete = gc.supports_tag_delete(
                gc.registry_version(self.settings.registry_binary)
            )
        return self._tag_delete

    def _run_once(self, dry_run: bool) -> gc.GcReport:
        from . import gc

        try:
            tag_delete = self.tag_delete()
            # A dry run writes nothing: it may run beside a real one.
            config = self.generations.write_collection_config() if not dry_run else Path()
        except (OSError, gc.GcError) as error:
            report = gc.GcReport(started=dt.datetime.now(dt.UTC), dry_run=dry_run)
            report.errors.append(str(error))
            report.result = "error"
            report.finished = report.started
            return report
        with self._session() as session:
            return gc.run_gc(
                tree=self.tree,
                rules=self._rules(),
                api=gc.RegistryApi(self._base_url(), session, bearer=self.bearer),
                binary=self.settings.registry_binary,
                config=config,
                env=self._registry_process_env(),
                timeout=self.settings.gc.timeout,
                enter_readonly=self._enter_readonly,
                leave_readonly=self._leave_readonly,
                tag_delete=tag_delete,
                refusal=gc.collection_refusal(
                    shared_state_store=self.settings.gc.shared_state_store,
                    blob_descriptor_cache=blob_descriptor_cache(self.settings.registry_env),
                    redis_addr=redis_addr(self.settings.registry_env),
                ),
                dry_run=dry_run,
            )

    def _rules(self) -> RetentionRules:
        return self.settings.gc.retention

    def _enter_readonly(self) -> None:
        self.metrics.readonly.set(1)
        with self.lock:  # never in the middle of a certificate rotation
            self.generations.enter_readonly()
        self.generation_started()

    def _leave_readonly(self) -> None:
        with self.lock:
            # Always end read-write, even when entering failed half-way.
            self.generations.readonly = True
            self.generations.leave_readonly()
        self.generation_started()
        self.metrics.readonly.set(0)

    def _registry_process_env(self) -> dict[str, str]:
        """What a generation gets from supervisord: the agent's environment (which holds the
        operator's REGISTRY_* variables; they override the file, as for `serve`)."""
        return dict(os.environ)

    def _base_url(self) -> str:
        addr = self.settings.registry_addr
        host = addr.connect_host()
        return f"https://[{host}]:{addr.port}" if ":" in host else f"https://{host}:{addr.port}"

    def _session(self) -> requests.Session:
        import requests
        import urllib3

        session = requests.Session()
        # Loopback to the registry this agent started, which serves the agent's own pair:
        # the name is not checked (the connection goes to an address, not the domain).
        session.verify = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        # No HTTPS_PROXY and no ~/.netrc: the calls go to loopback, and a netrc entry would
        # replace token mode's bearer header with basic credentials.
        session.trust_env = False
        if self.credentials is not None:
            session.auth = self.credentials
        return session

    # -- what status shows ------------------------------------------------------------------

    def _remember(self, report: gc.GcReport) -> None:
        state = self.storage.load_json(GC_STATE) or {}
        state["last_run"] = report.summary()
        if report.result == "success":
            state["last_success"] = state["last_run"]["finished"]
        try:
            self.storage.store_json(GC_STATE, state)
        except OSError as error:
            log.warning("cannot record the garbage collection run: %s", error)

    def status(self) -> dict[str, Any]:
        state = self.storage.load_json(GC_STATE) or {}
        rules = self.settings.gc.retention
        return {
            "schedule": self.settings.gc.schedule.text,
            "next_run": self._next.isoformat() if self._next else None,
            "last_run": state.get("last_run"),
            "last_success": state.get("last_success"),
            "retention": _describe_rules(rules) if rules.enabled else "off",
        }


def _failed(gc_module: Any, error: str) -> gc.GcReport:
    report: gc.GcReport = gc_module.GcReport(started=dt.datetime.now(dt.UTC), dry_run=False)
    report.errors.append(error)
    report.result = "error"
    report.finished = report.started
    return report


def answer(report: gc.GcReport, tag_delete: Callable[[], bool]) -> dict[str, Any]:
    """The control socket's answer to `gc`: the summary, and the dry run's lines."""
    from . import gc

    out: dict[str, Any] = {"ok": report.ok, **report.summary()}
    if report.dry_run and report.plan is not None:
        out["lines"] = gc.describe_plan(report.plan, tag_delete=tag_delete())
    return out


def _describe_rules(rules: RetentionRules) -> dict[str, Any]:
    return {
        "keep_last": rules.keep_last,
        "keep_days": rules.keep_days,
        "protect": [p.text for p in rules.protect],
        "repositories": [p.text for p in rules.repositories],
    }
