"""Steady HTTPS load on a registry, and a registry whose process can be rotated under it.

``LoadClient`` is what a client sees while the registry process is swapped for a new one
(certificate rotation): refused connects, connections accepted but closed with no response,
failed requests after one retry, latency, and the longest stretch with no successful
connect. ``RegistryServer`` runs the real distribution binary as successive generations and
rotates them the way the agent does: SIGTERM the current one (its listener closes within
milliseconds, in-flight requests drain), poll until the port has no listener, start the next
one at once (or, with ``prestart``, have the next one already initialised and waiting for
its config).

Both only ever talk to loopback.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import itertools
import json
import math
import os
import secrets
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from acme_registry import listeners
from tests.support.lifecycle import StartStop
from tests.support.tls import TestCA

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
# The one retry of a refused connect comes this soon: a client that waits longer hides the
# window it is meant to measure.
RETRY_DELAY = 0.005
READ_CHUNK = 256 * 1024
MAX_FAILURES_KEPT = 50

MODE_CONNECT = "connect"  # a new connection for every manifest GET
MODE_KEEPALIVE = "keepalive"  # manifest GETs on one reused connection
MODE_BLOB = "blob"  # full blob downloads, a new connection each
MANIFEST_MODES = (MODE_CONNECT, MODE_KEEPALIVE)

# Errors that mean "nothing of a response arrived": the port refused, or the connection was
# reset or closed before a status line (a listener closing with connections in its accept
# backlog resets them; a keep-alive connection closed by a draining server too).
_BEFORE_RESPONSE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.RemoteDisconnected,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class _BeforeResponse(Exception):
    """Refused or reset before any response byte: the case that gets one retry."""


class _Refused(_BeforeResponse):
    """The TCP connect itself was refused: nothing listened on the port."""


class _Unanswered(_BeforeResponse):
    """The connection was accepted, then closed or reset before any response byte."""


class _Failed(Exception):
    """A request that failed in a way a retry is not meant to paper over."""


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:200]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Sample:
    """One completed (successful) request."""

    at: float  # seconds since start(), when it completed
    mode: str
    latency_ms: float  # including the retry, if it needed one


@dataclass
class LoadReport:
    """What the clients saw. ``requests`` counts logical requests (a retry is not a second)."""

    requests: int
    failed: int
    refused_connects: int  # TCP connects refused (counted per attempt, retries too)
    failures: list[str]
    p50_ms: float  # manifest GETs (connect + keep-alive modes)
    p99_ms: float
    longest_gap_ms: float  # longest time between two successful connects
    longest_gap_at_s: float  # when that gap began, seconds since start()
    duration_s: float
    successful_connects: int
    keepalive_reconnects: int  # idle keep-alive connections found closed and replaced
    blob_downloads: int
    blob_p50_ms: float
    blob_p99_ms: float
    stopped_by: str  # "stop()", "max_duration" or "max_requests"
    samples: list[Sample] = field(default_factory=list, repr=False)
    connect_times: list[float] = field(default_factory=list, repr=False)
    # Connections accepted (TCP handshake done) and then closed or reset before any response
    # byte: a listener closed with connections in its queue, or a server that dropped a
    # request it read after its shutdown began (counted per attempt, retries too).
    unanswered: int = 0

    def latency_ms(
        self,
        q: float,
        *,
        start: float | None = None,
        end: float | None = None,
        modes: Sequence[str] = MANIFEST_MODES,
    ) -> float:
        """Percentile ``q`` of the latency of requests completed in [start, end) (seconds)."""
        lo = -math.inf if start is None else start
        hi = math.inf if end is None else end
        return percentile(
            [s.latency_ms for s in self.samples if s.mode in modes and lo <= s.at < hi], q
        )

    def latency_overlapping(
        self,
        q: float,
        windows: Sequence[tuple[float, float]],
        modes: Sequence[str] = MANIFEST_MODES,
    ) -> float:
        """Percentile ``q`` of requests whose lifetime overlaps any (start, end) window."""
        return percentile(
            [
                s.latency_ms
                for s in self.samples
                if s.mode in modes
                and any(
                    s.at - s.latency_ms / 1000 < end and s.at >= start for start, end in windows
                )
            ],
            q,
        )

    def longest_gap_overlapping(self, windows: Sequence[tuple[float, float]]) -> float:
        """Longest time (ms) between two successful connects that overlaps any window."""
        longest = 0.0
        for before, after in itertools.pairwise(self.connect_times):
            if any(before < end and after > start for start, end in windows):
                longest = max(longest, after - before)
        return longest * 1000

    def summary(self) -> str:
        return (
            f"{self.requests} requests in {self.duration_s:.1f} s, {self.failed} failed, "
            f"{self.refused_connects} refused connects, {self.unanswered} accepted but "
            f"unanswered, {self.successful_connects} connects, "
            f"longest gap {self.longest_gap_ms:.1f} ms at {self.longest_gap_at_s:.2f} s, "
            f"manifest p50/p99 {self.p50_ms:.1f}/{self.p99_ms:.1f} ms, "
            f"{self.blob_downloads} blobs p50/p99 {self.blob_p50_ms:.0f}/{self.blob_p99_ms:.0f} ms"
            + (f"; failures: {self.failures[:2]}" if self.failures else "")
        )


@dataclass
class _WorkerStats:
    mode: str
    requests: int = 0
    failed: int = 0
    refused: int = 0
    unanswered: int = 0
    keepalive_reconnects: int = 0
    failures: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)


class LoadClient(StartStop):
    """Background clients against ``https://name:port`` (dialled on ``address``).

    Only ``root_pem`` is trusted and the name is checked (SNI and Host are ``name``). Modes
    run at once, each in its own threads: new connection per manifest GET, keep-alive
    manifest GETs, and full blob downloads with a sha256 check. A refused connect counts in
    ``refused_connects``, a connection accepted and then closed or reset before any response
    byte in ``unanswered``; either is retried once after 5 ms (unless ``retry=False``);
    a request that still fails, gets a status other than 200, or the wrong digest, counts
    in ``failed``. Stops by itself after ``max_duration`` seconds or ``max_requests``.
    """

    def __init__(
        self,
        name: str,
        port: int,
        root_pem: bytes,
        repo: str,
        tag: str,
        *,
        address: str = "127.0.0.1",
        creds: tuple[str, str] | None = None,
        manifest_digest: str | None = None,
        blob_digest: str | None = None,
        connect_workers: int = 2,
        keepalive_workers: int = 1,
        blob_workers: int = 1,
        pause: float = 0.002,
        retry_delay: float = RETRY_DELAY,
        retry: bool = True,
        timeout: float = 10.0,
        max_duration: float = 120.0,
        max_requests: int = 200_000,
    ) -> None:
        """``pause`` is each worker's rest between requests: without it the clients take
        every core and slow the very process start-up a rotation waits for. ``retry_delay``
        is the wait before the one retry of a refused connect; ``retry=False`` makes every
        refused or unanswered attempt a failure."""
        self.name = name
        self.port = port
        self.address = address
        self.repo = repo
        self.tag = tag
        self.manifest_digest = manifest_digest
        self.blob_digest = blob_digest
        self.pause = pause
        self.retry_delay = retry_delay
        self.retry = retry
        self.timeout = timeout
        self.max_duration = max_duration
        self.max_requests = max_requests
        self._context = ssl.create_default_context(cadata=root_pem.decode("ascii"))
        self._headers = {"User-Agent": "acme-registry-load/1", "Accept": MANIFEST_ACCEPT}
        if creds is not None:
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        modes = [MODE_CONNECT] * connect_workers + [MODE_KEEPALIVE] * keepalive_workers
        if blob_digest is not None:
            modes += [MODE_BLOB] * blob_workers
        self._stats = [_WorkerStats(mode) for mode in modes]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._issued = itertools.count()
        self._stopped_by = ""
        self._stop_lock = threading.Lock()
        self._started_at = 0.0
        self._ended_at = 0.0
        self._report: LoadReport | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LoadClient:
        if self._threads:
            raise RuntimeError("LoadClient already started")
        self._started_at = time.monotonic()
        for index, stats in enumerate(self._stats):
            thread = threading.Thread(
                target=self._run_worker, args=(stats,), name=f"load-{stats.mode}-{index}"
            )
            thread.daemon = True  # a wedged worker must never keep pytest alive
            thread.start()
            self._threads.append(thread)
        return self

    def elapsed(self) -> float:
        """Seconds since start(): the time base of samples, connects and report fields."""
        return time.monotonic() - self._started_at

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    def stop(self) -> LoadReport:
        """Stop every worker (in-flight requests finish) and return the report."""
        self._finish("stop()")
        return self._collect()

    def wait(self, timeout: float | None = None) -> LoadReport:
        """Wait until the bounds stop the load (or ``timeout`` passes), then stop()."""
        self._stop.wait(timeout)
        return self.stop()

    # -- workers ---------------------------------------------------------------------------

    def _finish(self, reason: str) -> None:
        with self._stop_lock:
            if not self._stop.is_set():
                self._stopped_by = reason
                self._ended_at = time.monotonic()
                self._stop.set()

    def _run_worker(self, stats: _WorkerStats) -> None:
        deadline = self._started_at + self.max_duration
        keepalive: list[http.client.HTTPSConnection] = []  # holds at most the reused one
        try:
            while not self._stop.is_set():
                if time.monotonic() >= deadline:
                    self._finish("max_duration")
                    break
                if next(self._issued) >= self.max_requests:
                    self._finish("max_requests")
                    break
                self._one_request(stats, keepalive)
                if self.pause:
                    self._stop.wait(self.pause)
        finally:
            for conn in keepalive:
                conn.close()

    def _one_request(
        self, stats: _WorkerStats, keepalive: list[http.client.HTTPSConnection]
    ) -> None:
        attempt: Callable[[], object]
        if stats.mode == MODE_BLOB:
            attempt = functools.partial(self._fresh, stats, self._get_blob)
        elif stats.mode == MODE_KEEPALIVE:
            attempt = functools.partial(self._reused, stats, keepalive)
        else:
            attempt = functools.partial(self._fresh, stats, self._get_manifest)
        stats.requests += 1
        started = time.monotonic()
        try:
            try:
                attempt()
            except _BeforeResponse as exc:
                self._count(stats, exc)
                if not self.retry:
                    self._fail(stats, f"{stats.mode}: no retry: {exc}")
                    return
                time.sleep(self.retry_delay)
                attempt()
        except _BeforeResponse as exc:
            self._count(stats, exc)
            self._fail(stats, f"{stats.mode}: after one retry: {exc}")
        except _Failed as exc:
            self._fail(stats, f"{stats.mode}: {exc}")
        except Exception as exc:  # a bug here must show up as a failure, not a dead thread
            self._fail(stats, f"{stats.mode}: unexpected {_describe(exc)}")
        else:
            done = time.monotonic()
            stats.samples.append(
                Sample(done - self._started_at, stats.mode, (done - started) * 1000)
            )

    @staticmethod
    def _count(stats: _WorkerStats, exc: _BeforeResponse) -> None:
        if isinstance(exc, _Refused):
            stats.refused += 1
        else:
            stats.unanswered += 1

    @staticmethod
    def _fail(stats: _WorkerStats, message: str) -> None:
        stats.failed += 1
        if len(stats.failures) < MAX_FAILURES_KEPT:
            stats.failures.append(message)

    def _connect(self, stats: _WorkerStats) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(
            self.name, self.port, context=self._context, timeout=self.timeout
        )
        try:
            raw = socket.create_connection((self.address, self.port), timeout=self.timeout)
        except ConnectionRefusedError as exc:
            raise _Refused(f"connect: {_describe(exc)}") from exc
        except _BEFORE_RESPONSE_ERRORS as exc:
            raise _Unanswered(f"connect: {_describe(exc)}") from exc
        except OSError as exc:
            raise _Failed(f"connect: {_describe(exc)}") from exc
        # As http.client's own connect() does: with Nagle on, the request written right after
        # the TLS Finished waits for a delayed ACK, ~40 ms per new connection.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # Setting .sock by hand lets http.client keep Host: name:port while the TCP
            # connection goes to the loopback address.
            conn.sock = self._context.wrap_socket(raw, server_hostname=self.name)
        except _BEFORE_RESPONSE_ERRORS as exc:
            raw.close()
            raise _Unanswered(f"TLS handshake: {_describe(exc)}") from exc
        except OSError as exc:
            raw.close()
            raise _Failed(f"TLS handshake: {_describe(exc)}") from exc
        stats.connects.append(time.monotonic() - self._started_at)
        return conn

    def _fresh(
        self,
        stats: _WorkerStats,
        request: Callable[[http.client.HTTPSConnection], object],
    ) -> None:
        conn = self._connect(stats)
        try:
            request(conn)
        finally:
            conn.close()

    def _reused(self, stats: _WorkerStats, keepalive: list[http.client.HTTPSConnection]) -> None:
        if keepalive and _dropped(keepalive[0]):
            # The server closed it while idle (a draining process does this at once): any
            # HTTP client notices before sending and reconnects, so this is not a refusal.
            keepalive.pop().close()
            stats.keepalive_reconnects += 1
        if not keepalive:
            keepalive.append(self._connect(stats))
        conn = keepalive[0]
        try:
            keep = self._get_manifest(conn)
        except BaseException:
            keepalive.pop().close()
            raise
        if not keep:
            keepalive.pop().close()

    def _send(self, conn: http.client.HTTPSConnection, path: str) -> http.client.HTTPResponse:
        try:
            conn.request("GET", path, headers=self._headers)
            return conn.getresponse()
        except _BEFORE_RESPONSE_ERRORS as exc:
            raise _Unanswered(f"GET {path}: {_describe(exc)}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Failed(f"GET {path}: {_describe(exc)}") from exc

    def _get_manifest(self, conn: http.client.HTTPSConnection) -> bool:
        """One manifest GET; returns whether the connection may be reused."""
        path = f"/v2/{self.repo}/manifests/{self.tag}"
        resp = self._send(conn, path)
        try:
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _Failed(f"GET {path}: reading body: {_describe(exc)}") from exc
        if resp.status != 200:
            raise _Failed(f"GET {path}: HTTP {resp.status}: {body[:120]!r}")
        if self.manifest_digest is not None:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if digest != self.manifest_digest:
                raise _Failed(f"GET {path}: manifest digest {digest} != {self.manifest_digest}")
        return not resp.will_close

    def _get_blob(self, conn: http.client.HTTPSConnection) -> None:
        path = f"/v2/{self.repo}/blobs/{self.blob_digest}"
        resp = self._send(conn, path)
        digest = hashlib.sha256()
        size = 0
        try:
            if resp.status != 200:
                raise _Failed(f"GET {path}: HTTP {resp.status}: {resp.read(120)!r}")
            while chunk := resp.read(READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise _Failed(f"GET {path}: after {size} bytes: {_describe(exc)}") from exc
        got = "sha256:" + digest.hexdigest()
        if got != self.blob_digest:
            raise _Failed(f"GET {path}: {size} bytes with digest {got}")

    # -- report ----------------------------------------------------------------------------

    def _collect(self) -> LoadReport:
        for thread in self._threads:
            thread.join(self.timeout + 5)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if self._report is not None and not stuck:
            return self._report
        stats = self._stats
        samples = sorted((s for w in stats for s in w.samples), key=lambda s: s.at)
        connects = sorted(t for w in stats for t in w.connects)
        gap, gap_at = 0.0, 0.0
        for before, after in itertools.pairwise(connects):
            if after - before > gap:
                gap, gap_at = after - before, before
        manifest = [s.latency_ms for s in samples if s.mode in MANIFEST_MODES]
        blobs = [s.latency_ms for s in samples if s.mode == MODE_BLOB]
        failures = [f for w in stats for f in w.failures]
        failures += [f"worker {name} still running at stop" for name in stuck]
        report = LoadReport(
            requests=sum(w.requests for w in stats),
            failed=sum(w.failed for w in stats) + len(stuck),
            refused_connects=sum(w.refused for w in stats),
            unanswered=sum(w.unanswered for w in stats),
            failures=failures,
            p50_ms=percentile(manifest, 50),
            p99_ms=percentile(manifest, 99),
            longest_gap_ms=gap * 1000,
            longest_gap_at_s=gap_at,
            duration_s=(self._ended_at or time.monotonic()) - self._started_at,
            successful_connects=len(connects),
            keepalive_reconnects=sum(w.keepalive_reconnects for w in stats),
            blob_downloads=len(blobs),
            blob_p50_ms=percentile(blobs, 50),
            blob_p99_ms=percentile(blobs, 99),
            stopped_by=self._stopped_by,
            samples=samples,
            connect_times=connects,
        )
        self._report = report
        return report


def _dropped(conn: http.client.HTTPSConnection) -> bool:
    """Whether an idle connection was closed by the server (readable means EOF here)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# -- TLS for a test registry ------------------------------------------------------------------


# -- listeners --------------------------------------------------------------------------------


def listening_on(port: int) -> bool:
    """Whether any socket listens on TCP ``port``: the product's own check (sock_diag)."""
    return listeners.listening(port)


def wait_no_listener(port: int, timeout: float = 10.0, interval: float = 0.0005) -> float:
    """Poll until nothing listens on ``port``; returns the seconds it took."""
    started = time.monotonic()
    while listening_on(port):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"port {port} still has a listener after {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


# -- the registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    """Timings of one rotation, in ms from the SIGTERM to the old generation."""

    generation: int
    listener_gone_ms: float
    spawned_ms: float
    serving_ms: float  # first verified TLS handshake with the new generation
    bind_retries: int


class RegistryServer(StartStop):
    """The distribution registry binary with TLS on loopback, rotated process by process.

    Each generation is a new ``docker-registry serve CONFIG`` with the same config, port and
    ``http.secret`` (so uploads continue across generations), ``http.draintimeout`` set (so
    SIGTERM drains instead of cutting transfers) and no debug server (a draining generation
    would still hold its port). ``rotate()`` is the manual rotation the agent automates.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        name: str = "registry.test",
        binary: str = "/usr/bin/docker-registry",
        drain_timeout: str = "5s",
        htpasswd: Path | None = None,
        ca: TestCA | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.name = name
        self.binary = binary
        self.drain_timeout = drain_timeout
        self.htpasswd = htpasswd
        self.ca = ca or TestCA()
        self.start_timeout = start_timeout
        self.secret = secrets.token_hex(16)
        self.config_path = self.workdir / "config.yml"
        self.tls_path = self.workdir / "tls.pem"
        self.data_dir = self.workdir / "data"
        self.generations: list[subprocess.Popen[bytes]] = []
        self._client_context = ssl.create_default_context(cadata=self.ca.pem.decode("ascii"))

    @property
    def root_pem(self) -> bytes:
        return self.ca.pem

    @property
    def current(self) -> subprocess.Popen[bytes]:
        return self.generations[-1]

    def log_path(self, generation: int) -> Path:
        return self.workdir / f"registry-{generation}.log"

    def logs(self, chars: int = 4000) -> str:
        """The tail of every generation's log, for failure messages."""
        parts = []
        for index in range(len(self.generations)):
            text = self.log_path(index).read_text(errors="replace")
            parts.append(f"--- generation {index} ---\n{text[-chars:]}")
        return "\n".join(parts)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> RegistryServer:
        if self.generations:
            raise RuntimeError("registry already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self._write_tls(self.ca.issue([self.name]))
        self._write_config()
        self._spawn_bound(time.monotonic())
        self.wait_serving(self.start_timeout)
        return self

    def rotate(self, tls_pem: bytes | None = None, *, prestart: bool = False) -> Rotation:
        """Serve a fresh certificate (``tls_pem``, or a new leaf from the CA) via a new process.

        SIGTERM the current generation, poll until its listener is gone, start the next one
        at once and wait until it completes a verified TLS handshake. The old one keeps
        draining in-flight requests in the background.

        The binary spends ~14 ms in Go package init before it even reads its config, and
        that lands inside the refused window. ``prestart=True`` starts the next generation
        BEFORE the SIGTERM with its config path on a FIFO: it runs its init and blocks
        reading the config; the config is written once the old listener is gone, and the
        process binds ~4 ms later.
        """
        self._write_tls(tls_pem if tls_pem is not None else self.ca.issue([self.name]))
        old = self.current
        fifo = self._prestart() if prestart else None
        started = time.monotonic()
        old.send_signal(signal.SIGTERM)
        wait_no_listener(self.port)
        gone = time.monotonic()
        retries = self._spawn_bound(started) if fifo is None else self._release(fifo, started)
        spawned = time.monotonic()
        self.wait_serving(self.start_timeout)
        serving = time.monotonic()
        return Rotation(
            generation=len(self.generations) - 1,
            listener_gone_ms=(gone - started) * 1000,
            spawned_ms=(spawned - started) * 1000,
            serving_ms=(serving - started) * 1000,
            bind_retries=retries,
        )

    def stop(self) -> list[int | None]:
        """SIGTERM every generation still running and wait; returns all exit codes."""
        for proc in self.generations:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.generations:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [proc.returncode for proc in self.generations]

    def exit_codes(self) -> list[int | None]:
        """Exit codes so far (None while running): 0 means a generation drained in time."""
        return [proc.poll() for proc in self.generations]

    # -- internals -------------------------------------------------------------------------

    def _write_tls(self, pem: bytes) -> None:
        # Replaced atomically: a generation starting now must never read half a file.
        tmp = self.tls_path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o600)
        tmp.replace(self.tls_path)

    def _write_config(self) -> None:
        http_config: dict[str, object] = {
            "addr": f"127.0.0.1:{self.port}",
            "secret": self.secret,
            "draintimeout": self.drain_timeout,
            "tls": {"certificate": str(self.tls_path), "key": str(self.tls_path)},
        }
        config: dict[str, object] = {
            "version": 0.1,
            # Access logs under load would be most of the I/O; errors still show.
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.data_dir)}},
            "http": http_config,
        }
        if self.htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": "load-test", "path": str(self.htpasswd)}}
        # JSON is YAML: no YAML library needed to write the registry's config.
        self.config_path.write_text(json.dumps(config, indent=2))

    def _spawn(self, config: Path | None = None) -> subprocess.Popen[bytes]:
        generation = len(self.generations)
        with self.log_path(generation).open("wb") as log:
            proc = subprocess.Popen(
                [self.binary, "serve", str(config or self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Nothing inherited: any REGISTRY_* variable would override the config.
                env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
            )
        self.generations.append(proc)
        return proc

    def _prestart(self) -> int:
        """Start the next generation blocked on reading its config from a FIFO.

        Returns the FIFO's write end, opened: that open succeeding proves the process has
        finished its init and is waiting in the config read.
        """
        fifo = self.workdir / f"config-{len(self.generations)}.fifo"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        proc = self._spawn(fifo)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                # Non-blocking open of a FIFO's write end fails (ENXIO) until a reader has it.
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pre-started registry never opened {fifo}:\n{self.logs()}"
                    ) from None
                time.sleep(0.0005)
        fifo.unlink()  # the open ends keep it working; nothing else should find it
        os.set_blocking(fd, True)
        return fd

    def _release(self, fifo_fd: int, started: float) -> int:
        """Hand the pre-started generation its config; fall back to a plain start if it died."""
        proc = self.current
        try:
            os.write(fifo_fd, self.config_path.read_bytes())
        finally:
            os.close(fifo_fd)
        while proc.poll() is None and not listening_on(self.port):
            if time.monotonic() - started > self.start_timeout:
                raise TimeoutError(f"pre-started registry not listening:\n{self.logs()}")
            time.sleep(0.0002)
        if proc.poll() is None:
            return 0
        return 1 + self._spawn_bound(started)

    def _spawn_bound(self, started: float) -> int:
        """Start the next generation; if it lost the race for the port, try again.

        Returns how many starts failed with "address already in use".
        """
        retries = 0
        while True:
            proc = self._spawn()
            # Bind errors come within milliseconds of start; anything later is a real exit.
            while proc.poll() is None and not listening_on(self.port):
                if time.monotonic() - started > self.start_timeout:
                    raise TimeoutError(f"registry not listening:\n{self.logs()}")
                time.sleep(0.0002)
            if proc.poll() is None:
                return retries
            log = self.log_path(len(self.generations) - 1).read_text(errors="replace")
            if "address already in use" not in log or retries >= 20:
                raise RuntimeError(f"registry exited with {proc.returncode}:\n{self.logs()}")
            retries += 1
            wait_no_listener(self.port)

    def wait_serving(self, timeout: float) -> None:
        """Until a verified TLS handshake (SNI ``name``) with the current generation works."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.current.poll() is not None:
                raise RuntimeError(
                    f"registry exited with {self.current.returncode}:\n{self.logs()}"
                )
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                    self._client_context.wrap_socket(raw, server_hostname=self.name),
                ):
                    return
            except OSError as exc:
                last = _describe(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry not serving within {timeout} s ({last})")
            time.sleep(0.001)


def image_digests(layout_dir: Path, tag: str = "v1") -> tuple[str, list[str]]:
    """(manifest digest, layer digests) of ``tag`` in an OCI layout, as a registry serves them."""
    layout_dir = Path(layout_dir)
    index = json.loads((layout_dir / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest = str(entry["digest"])
            blob = layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
            manifest = json.loads(blob.read_bytes())
            return digest, [str(layer["digest"]) for layer in manifest["layers"]]
    raise KeyError(f"tag {tag!r} not in {layout_dir}/index.json")


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    """Write an htpasswd file with bcrypt hashes (the only kind the registry accepts)."""
    import bcrypt  # only the auth case needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path
