"""The admin HTTP endpoint on ADMIN_ADDR: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``.

Plain HTTP, GET and HEAD only, no state changes: it is meant for 127.0.0.1 (the default)
or a monitoring network. ``/healthz`` answers 200 while the agent process is alive and
its health callable agrees; ``/readyz`` answers 200 or 503 with the reason, as
``acme-registry health --ready`` does; anything else is 404, other methods 405.

Metrics (names and labels are a contract: dashboards and alert rules use them)::

    name                                                        type       labels
    acme_registry_certificate_not_before_timestamp_seconds      gauge      domain
    acme_registry_certificate_not_after_timestamp_seconds       gauge      domain
    acme_registry_certificate_next_renewal_timestamp_seconds    gauge      -
    acme_registry_renewal_attempts_total                        counter    -
    acme_registry_renewal_failures_total                        counter    reason
    acme_registry_registry_generation_starts_total              counter    -
    acme_registry_issuance_duration_seconds                     histogram  -
    acme_registry_acme_request_duration_seconds                 histogram  step

- The certificate gauges hold unix seconds for each name of the served certificate; a
  name dropped from the certificate disappears from the next scrape, and there is no
  series before the first certificate. The next renewal is NaN until it is planned.
- ``reason`` is one of :data:`FAILURE_REASONS` (:class:`~.outcome.FailureReason`, set by the
  issuer where the failure is known); every reason
  is exported from the start (at 0), so ``increase()`` works on the first failure.
- An issuance is one run of the issuing child process, timed by the agent; the child's
  per-request timings (its result's ``timings``) feed the ``step`` histogram, with
  ``step`` one of :data:`ACME_STEPS`.

prometheus_client is imported here only, and this module only by the long-running agent.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .listen import bind_tcp
from .outcome import FailureReason, IssuanceResult

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9180
# The classic text format: every Prometheus version parses it, and generate_latest's
# default output (legacy names, underscore escaping) is exactly that format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

FAILURE_REASONS = tuple(reason.value for reason in FailureReason)
ACME_STEPS = (
    "directory",
    "account_registration",
    "new_order",
    "answer_challenge",
    "poll_authorization",
    "poll_order",
    "finalize",
    "download_certificate",
    "other",
)
# ACME requests take tens of milliseconds; polls and a slow CA take seconds.
REQUEST_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A whole issuance: validation by the CA and polling included, up to the child's timeout.
ISSUANCE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

Check = Callable[[], tuple[bool, str]]


def step_label(step: str) -> str:
    """The ``step`` label for an issuer step name ("new order" -> "new_order")."""
    label = re.sub(r"[^a-z0-9]+", "_", step.strip().lower()).strip("_")
    return label if label in ACME_STEPS else "other"


def _timestamp(value: dt.datetime | float) -> float:
    return value.timestamp() if isinstance(value, dt.datetime) else float(value)


# tokenservice's REASON_* values, listed here so that every series exists from the start.
AUTH_FAILURE_REASONS = (
    "invalid_credentials",
    "invalid_refresh_token",
    "throttled",
    "busy",
    "bad_request",
)


class Metrics:
    """The agent's metrics in a registry of their own (never the library's global one)."""

    def __init__(self) -> None:
        # The *_created series only say when this process made each counter: noise here.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        r = self.registry
        self.not_before = Gauge(
            "acme_registry_certificate_not_before_timestamp_seconds",
            "Start of validity of the served certificate, per name (unix seconds).",
            ["domain"],
            registry=r,
        )
        self.not_after = Gauge(
            "acme_registry_certificate_not_after_timestamp_seconds",
            "Expiry of the served certificate, per name (unix seconds).",
            ["domain"],
            registry=r,
        )
        self.next_renewal = Gauge(
            "acme_registry_certificate_next_renewal_timestamp_seconds",
            "When the agent plans to renew the certificate next (unix seconds).",
            registry=r,
        )
        # NaN until the agent knows: 0 would read as "renewal overdue since 1970".
        self.next_renewal.set(float("nan"))
        self.attempts = Counter(
            "acme_registry_renewal_attempts_total",
            "Certificate orders started (first issuance and renewals).",
            registry=r,
        )
        self.failures = Counter(
            "acme_registry_renewal_failures_total",
            "Certificate orders that failed, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)
        self.generation_starts = Counter(
            "acme_registry_registry_generation_starts_total",
            "Registry generations started (first start and every rotation).",
            registry=r,
        )
        self.issuance_seconds = Histogram(
            "acme_registry_issuance_duration_seconds",
            "Duration of one certificate order, as the agent waited for it.",
            buckets=ISSUANCE_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "acme_registry_acme_request_duration_seconds",
            "Latency of ACME requests made during an order, by step.",
            ["step"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        # Token mode (AUTH_MODE=token): the token service's logins.
        self.auth_failures = Counter(
            "acme_registry_auth_failures_total",
            "Token requests refused, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason=reason)
        # A shared state store (STATE_STORE=s3): 1 while its last request succeeded.
        self.state_store_up = Gauge(
            "acme_registry_state_store_up",
            "Whether the shared state store answered the last request (1) or not (0).",
            registry=r,
        )
        self.state_store_up.set(1)
        self.tokens_issued = Counter(
            "acme_registry_tokens_issued_total",
            "Tokens the token service issued (logins, refreshes, anonymous).",
            registry=r,
        )

    def set_certificate(
        self,
        names: Iterable[str],
        not_before: dt.datetime | float,
        not_after: dt.datetime | float,
    ) -> None:
        start, end = _timestamp(not_before), _timestamp(not_after)
        # Under the lock so that a scrape never sees the gauges between clear and set.
        with self._lock:
            self.not_before.clear()
            self.not_after.clear()
            for name in sorted(set(names)):
                self.not_before.labels(domain=name).set(start)
                self.not_after.labels(domain=name).set(end)

    def clear_certificate(self) -> None:
        with self._lock:
            self.not_before.clear()
            self.not_after.clear()

    def set_next_renewal(self, when: dt.datetime | float) -> None:
        self.next_renewal.set(_timestamp(when))

    def attempt(self) -> None:
        self.attempts.inc()

    def failure(self, reason: str) -> None:
        self.failures.labels(reason=reason if reason in FAILURE_REASONS else "other").inc()

    def auth_failure(self, reason: str) -> None:
        label = reason if reason in AUTH_FAILURE_REASONS else "other"
        self.auth_failures.labels(reason=label).inc()

    def token_issued(self) -> None:
        self.tokens_issued.inc()

    def registry_started(self) -> None:
        self.generation_starts.inc()

    def observe_acme(self, seconds: float, step: str = "other") -> None:
        self.request_seconds.labels(step=step_label(step)).observe(max(0.0, seconds))

    def observe_issuance(self, seconds: float) -> None:
        self.issuance_seconds.observe(max(0.0, seconds))

    def record_issuance(self, result: IssuanceResult, seconds: float) -> FailureReason | None:
        """Count one run of the issuing child from its result; the failure reason or None."""
        self.attempt()
        self.observe_issuance(seconds)
        for step, elapsed in result.timings:
            self.observe_acme(elapsed, step)
        if result.ok:
            return None
        reason = result.reason or FailureReason.OTHER
        self.failure(reason)
        return reason

    def render(self) -> bytes:
        with self._lock:
            return generate_latest(self.registry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics
    ready: Check
    healthy: Check


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "acme-registry-admin"
    sys_version = ""  # no Python version in the Server header
    timeout = 10  # a slow or idle client cannot hold a thread for long

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", body=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _respond(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(HTTPStatus.OK, self.server.metrics.render(), body, CONTENT_TYPE)
        elif path == "/healthz":
            self._check(self.server.healthy, "ok", body)
        elif path == "/readyz":
            self._check(self.server.ready, "ready", body)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", body)

    def _check(self, check: Check, fine: str, body: bool) -> None:
        try:
            ok, reason = check()
        except Exception:  # a broken check is a "no", not a dead endpoint
            log.exception("%s check failed", self.path)
            ok, reason = False, "the check failed"
        status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(status, f"{reason or fine}\n".encode(), body)

    def _send(
        self,
        status: HTTPStatus,
        payload: bytes,
        body: bool,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # Prometheus scrapes every few seconds: one INFO line each would drown the log.
        log.debug("admin %s %s", self.address_string(), format % args)


def _always_healthy() -> tuple[bool, str]:
    return True, "ok"


class AdminServer:
    """Serves the admin endpoint from daemon threads; ``port=0`` picks a free port.

    ``host`` "" listens on every IPv6 and IPv4 address. ``ready`` and ``healthy`` return
    ``(ok, reason)``; they run on the request's thread, so they must be thread-safe.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        ready: Check,
        healthy: Check | None = None,
    ) -> None:
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.requested_port = port
        self.metrics = metrics
        self.ready = ready
        self.healthy = healthy or _always_healthy
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        listener = bind_tcp(self.host, self.requested_port)
        try:
            server = _Server(listener.getsockname()[:2], _Handler, bind_and_activate=False)
        except BaseException:
            listener.close()
            raise
        # The server made a socket of its own family; ours may be IPv6 dual-stack.
        server.socket.close()
        server.socket = listener
        server.server_address = listener.getsockname()[:2]
        server.metrics, server.ready, server.healthy = self.metrics, self.ready, self.healthy
        self._server = server
        # serve_forever notices shutdown() only between polls: 0.1 s keeps stop() quick.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name="admin", daemon=True
        )
        self._thread.start()
        log.info("admin endpoint on %s port %d", self.host or "every address", self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
