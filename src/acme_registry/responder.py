"""The port-80 responder: ACME HTTP-01 challenges, and a redirect to HTTPS for everything else.

This listener faces the public internet, so it is a deliberately small HTTP/1.x server of its
own rather than ``http.server``: every request head is read under one total deadline and the
hard size limits of :mod:`acme_registry.httphead`, exactly one request is served per
connection, and nothing from the request reaches a response header unless it has been
validated first.

* ``GET``/``HEAD /.well-known/acme-challenge/<token>`` answers ``lookup(token)`` verbatim (200),
  or 404. The path is never mapped to the filesystem.
* Any other ``GET``/``HEAD`` is redirected (301) to ``https://<domain><path>``, where ``<domain>``
  is always one of the configured names, so the redirect cannot be aimed elsewhere.
* Other methods get 405; malformed or oversized requests get 400, 414 or 431; never a 5xx.

It runs on asyncio, in one event loop on one daemon thread: a connection that has not finished
its head costs a few KiB and no thread, so thousands of idle or trickling clients (a cheap way
to make HTTP-01 validations, and so renewals, fail) cannot starve the CA's request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from .httphead import (
    MAX_HEAD_BYTES,
    HeadParser,
    Reject,
    Request,
    canonical_host,
    normalise_target,
    redirect_host,
    response,
)
from .listen import DEFAULT_BACKLOG, bind_tcp, open_file_limit
from .names import is_acme_token, is_dns_name, is_ip

log = logging.getLogger(__name__)

TokenLookup = Callable[[str], str | None]
"""Maps a challenge token to its key authorization; ``None`` when no such challenge is pending.

It is called on the event loop, so it must be quick (a dict or a small file read): a slow
lookup would delay every other connection.
"""

RemoteLookup = Callable[[str, str | None], str | None]
"""The second look, for a token ``lookup`` does not know: (token, the request's Host) -> the
key authorization or ``None``. It may block (a shared store): it runs in a small thread pool,
bounded by ``remote_timeout``, never on the event loop.
"""

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

_ALLOW = "GET, HEAD"
_RECV_SIZE = 4096
# After answering, unread request bytes (a body, the rest of an oversized head) are drained for
# a moment so that closing does not send a TCP reset that could destroy the answer in flight.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 64 * 1024
_DROP_WARNING_INTERVAL = 10.0
_STOP_SECONDS = 5.0
_REMOTE_WORKERS = 4
# The connection cap is no longer what protects port 80 (the deadline and cheap connections
# are); it stays so that a flood can never use up the process's open files, which the agent
# also needs for storage, supervisord's pipes and the control and admin sockets: it leaves a
# quarter of the limit, at most 1024 files, to the rest. The fixed ceiling bounds memory
# (about 6.5 KiB a connection: some 420 MiB at the ceiling) whatever the hard limit is, since
# many containers get a hard limit of 2**20.
_RESERVED_FILES = 1024
_MAX_CONNECTIONS_CEILING = 65536


def default_max_connections(open_files: int) -> int:
    """The connection cap for a process allowed ``open_files`` open files."""
    reserve = min(_RESERVED_FILES, open_files // 4)
    return max(1, min(open_files - reserve, _MAX_CONNECTIONS_CEILING))


class _Run:
    """The event loop, listener and connections of one start()..stop() cycle."""

    def __init__(self, listener: socket.socket, max_connections: int) -> None:
        self.listener = listener
        self.max_connections = max_connections
        self.loop = asyncio.new_event_loop()
        self.started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.stopping: asyncio.Event | None = None
        self.thread: threading.Thread | None = None
        self.connections: set[asyncio.Task[None]] = set()


class ChallengeResponder:
    """Serves HTTP-01 challenges for ``domains`` on ``port``; see the module docstring.

    ``host`` "" listens on every IPv6 and IPv4 address; any other value binds only that address.
    ``read_timeout`` bounds the time a client has for its whole request head.
    ``max_connections`` caps the connections open at once (further ones are closed at once);
    by default it follows the open-file limit at :meth:`start`.
    """

    def __init__(
        self,
        domains: Sequence[str],
        lookup: TokenLookup,
        port: int,
        host: str = "",
        *,
        read_timeout: float = 10.0,
        max_connections: int | None = None,
        remote: RemoteLookup | None = None,
        remote_timeout: float = 2.0,
    ) -> None:
        if isinstance(domains, str):
            raise TypeError("domains must be a sequence of names, not one string")
        names = [canonical_host(name) for name in domains]
        if not names:
            raise ValueError("at least one domain is required")
        for name in names:
            # The names end up in Location headers, so only DNS names (a wildcard's base
            # too) and IP addresses are acceptable.
            if is_ip(name):
                continue
            base = name.removeprefix("*.")
            if not is_dns_name(base):
                raise ValueError(f"{name!r} is not a valid DNS name")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
        if read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._domains = tuple(dict.fromkeys(names))
        self._lookup = lookup
        self._requested_port = port
        self._host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._read_timeout = float(read_timeout)
        self._max_connections = max_connections
        self._remote = remote
        self._remote_timeout = float(remote_timeout)
        self._remote_pool: concurrent.futures.ThreadPoolExecutor | None = None

        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._bound_port: int | None = None
        self._last_drop_warning = -_DROP_WARNING_INTERVAL

    @property
    def port(self) -> int:
        """The bound port once started (``port=0`` picks a free one); the requested one before."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains

    def start(self) -> None:
        """Bind, listen and serve from a daemon thread; returns once connections are accepted."""
        with self._lock:
            if self._run is not None:
                raise RuntimeError("the challenge responder is already running")
            listener = bind_tcp(self._host, self._requested_port)
            cap = self._max_connections or default_max_connections(open_file_limit())
            try:
                run = _Run(listener, cap)
            except BaseException:
                listener.close()
                raise
            self._bound_port = int(listener.getsockname()[1])
            if self._remote is not None and self._remote_pool is None:
                self._remote_pool = concurrent.futures.ThreadPoolExecutor(
                    _REMOTE_WORKERS, thread_name_prefix="acme-http01-remote"
                )
            run.thread = threading.Thread(
                target=self._loop_thread,
                args=(run,),
                name=f"acme-http01:{self._bound_port}",
                daemon=True,
            )
            try:
                run.thread.start()
                run.started.result(timeout=_STOP_SECONDS)
            except BaseException:
                self._shut_down(run)
                raise
            self._run = run
        log.info(
            "HTTP-01 responder listening on %s port %d (up to %d connections)",
            self._host or "every address",
            self._bound_port,
            cap,
        )

    def stop(self) -> None:
        """Stop accepting, close the listener and cut open connections. Safe to call twice."""
        with self._lock:
            run, self._run = self._run, None
        if run is None:
            return
        self._shut_down(run)
        pool, self._remote_pool = self._remote_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        log.info("HTTP-01 responder on port %d stopped", self._bound_port)

    def _shut_down(self, run: _Run) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            run.loop.call_soon_threadsafe(self._request_stop, run)
        if run.thread is not None and run.thread is not threading.current_thread():
            run.thread.join(timeout=_STOP_SECONDS)
        run.listener.close()

    @staticmethod
    def _request_stop(run: _Run) -> None:
        if run.stopping is not None:
            run.stopping.set()
        else:  # stopped before serving began
            run.loop.stop()

    # -- the event loop ----------------------------------------------------------------------

    def _loop_thread(self, run: _Run) -> None:
        asyncio.set_event_loop(run.loop)
        try:
            run.loop.run_until_complete(self._serve_until_stopped(run))
        except BaseException as exc:  # anything before serving began is start()'s error
            if not run.started.done():
                run.started.set_exception(exc)
            else:
                log.exception("HTTP-01 responder: the event loop failed")
        finally:
            run.loop.close()

    async def _serve_until_stopped(self, run: _Run) -> None:
        run.stopping = asyncio.Event()
        server = await asyncio.start_server(
            lambda reader, writer: self._connection(run, reader, writer),
            sock=run.listener,
            # create_server calls listen() again with its own backlog (100 by default).
            backlog=DEFAULT_BACKLOG,
            # Flow control only: a head is parsed as it arrives, never buffered past this.
            limit=MAX_HEAD_BYTES,
        )
        run.started.set_result(None)
        try:
            await run.stopping.wait()
        finally:
            server.close()
            # Connections accepted just before the close may start while the others end.
            while run.connections:
                for task in list(run.connections):
                    task.cancel()
                await asyncio.gather(*run.connections, return_exceptions=True)
                await asyncio.sleep(0)
            # Aborted transports close their sockets in callbacks of the next iterations.
            for _ in range(3):
                await asyncio.sleep(0)

    async def _connection(
        self, run: _Run, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        transport = writer.transport
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        if len(run.connections) >= run.max_connections:
            transport.close()
            self._warn_dropping(run, peer)
            return
        task = asyncio.current_task()
        assert task is not None
        run.connections.add(task)
        graceful = False
        try:
            graceful = await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            pass  # stop(): the connection is cut below
        except Exception:  # one bad connection must never take anything else down
            log.warning("HTTP-01 responder: unexpected error serving %s", peer, exc_info=True)
        finally:
            run.connections.discard(task)
            if graceful:
                transport.close()
            else:
                transport.abort()

    def _warn_dropping(self, run: _Run, peer: str) -> None:
        # A flood must not turn into a flood of log lines too: one warning per interval.
        now = time.monotonic()
        if now - self._last_drop_warning >= _DROP_WARNING_INTERVAL:
            self._last_drop_warning = now
            log.warning(
                "HTTP-01 responder: %d connections open; dropping new ones (from %s)",
                run.max_connections,
                peer,
            )

    # -- one connection, one request ------------------------------------------------------

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bool:
        """Read one head and answer it; False when the connection should be cut, not closed."""
        parser = HeadParser()
        request: Request | None = None
        try:
            # Read here rather than in a helper coroutine: an idle connection is this frame,
            # and every connection held open costs one more frame per level of calls.
            async with asyncio.timeout(self._read_timeout):
                while request is None:
                    try:
                        data = await reader.read(_RECV_SIZE)
                    except OSError:
                        return True  # reset: there is nobody left to answer
                    if not data:
                        parser.end_of_input()
                        return True  # closed before sending anything
                    request = parser.feed(data)
        except TimeoutError:
            log.debug("HTTP-01 responder: %s timed out sending a request head", peer)
            if parser.received:
                return await self._send(writer, response(408, head_only=False))
            return True
        except Reject as rejected:
            log.debug("HTTP-01 responder: rejected a request from %s: %d", peer, rejected.status)
            if not await self._send(writer, response(rejected.status, head_only=False)):
                return False
            await _linger(reader, writer)
            return True
        if not await self._send(writer, await self._answer(request, peer)):
            return False
        if request.body_announced or parser.leftover:
            await _linger(reader, writer)
        return True

    async def _answer(self, request: Request, peer: str) -> bytes:
        head_only = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return response(405, head_only=False, headers=[("Allow", _ALLOW)])
        try:
            path_and_query = normalise_target(request.target)
        except Reject as rejected:
            return response(rejected.status, head_only=head_only)
        path = path_and_query.partition("?")[0]

        if path == CHALLENGE_PREFIX.rstrip("/") or path.startswith(CHALLENGE_PREFIX):
            token = path[len(CHALLENGE_PREFIX) :]
            body = None
            if is_acme_token(token):
                body = self._key_authorization(token, peer)
                if body is None and self._remote is not None:
                    body = await self._remote_key_authorization(token, request.host, peer)
            if body is None:
                return response(404, head_only=head_only)
            return response(200, head_only=head_only, body=body)

        location = f"https://{redirect_host(request.host, self._domains)}{path_and_query}"
        log.debug("HTTP-01 responder: redirecting %s to %.200s", peer, location)
        return response(301, head_only=head_only, headers=[("Location", location)])

    def _key_authorization(self, token: str, peer: str) -> bytes | None:
        short = token[:8] + ("..." if len(token) > 8 else "")
        try:
            answer = self._lookup(token)
        except Exception:
            log.warning("HTTP-01 responder: token lookup failed for %s", short, exc_info=True)
            return None
        if answer is None:
            log.info("HTTP-01 challenge %s requested by %s: not pending", short, peer)
            return None
        if not isinstance(answer, str):
            log.warning("HTTP-01 responder: lookup gave %s, not str", type(answer).__name__)
            return None
        try:
            body = answer.encode("utf-8")
        except UnicodeEncodeError:
            log.warning("HTTP-01 responder: key authorization for %s is not encodable", short)
            return None
        log.info("HTTP-01 challenge %s served to %s", short, peer)
        return body

    async def _remote_key_authorization(
        self, token: str, host: str | None, peer: str
    ) -> bytes | None:
        assert self._remote is not None and self._remote_pool is not None
        short = token[:8] + ("..." if len(token) > 8 else "")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._remote_timeout):
                answer = await loop.run_in_executor(self._remote_pool, self._remote, token, host)
        except TimeoutError:
            log.warning("HTTP-01 challenge %s: the shared lookup took too long", short)
            return None
        except Exception:
            log.warning("HTTP-01 responder: shared lookup failed for %s", short, exc_info=True)
            return None
        if not isinstance(answer, str):
            return None
        log.info("HTTP-01 challenge %s served to %s from the shared store", short, peer)
        return answer.encode("utf-8", errors="replace")

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write ``data``; False when the peer would not take it within the read timeout."""
        # The answer is small enough for the socket buffer, so this only waits on a dead peer.
        try:
            writer.write(data)
            async with asyncio.timeout(self._read_timeout):
                await writer.drain()
        except (OSError, TimeoutError):
            return False
        return True


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then drain what the client is still sending, for a bounded time."""
    drained = 0
    with contextlib.suppress(OSError, TimeoutError):
        writer.write_eof()
        async with asyncio.timeout(_LINGER_SECONDS):
            while drained < _LINGER_BYTES:
                chunk = await reader.read(_RECV_SIZE)
                if not chunk:
                    return
                drained += len(chunk)
