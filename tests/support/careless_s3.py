"""A stand-in S3 server that ignores If-None-Match and If-Match (as some servers have).

Only for the one test that the conditional-write probe refuses such a store: it stores
objects in memory, accepts any signature and answers PUT, GET, HEAD and DELETE on
``/<bucket>/<key>`` (path-style), every write unconditional.
"""

from __future__ import annotations

import email.utils
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class _Handler(BaseHTTPRequestHandler):
    server: CarelessS3
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", etag: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Date", email.utils.formatdate(usegmt=True))
        self.send_header("Content-Length", str(len(body)))
        if etag:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(usegmt=True))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        etag = f'"{hashlib.md5(body).hexdigest()}"'
        with self.server.guard:
            self.server.objects[self.path] = body
        self.server.conditions_seen += sum(
            1 for name in ("If-None-Match", "If-Match") if name in self.headers
        )
        self._reply(200, etag=etag)

    def do_GET(self) -> None:
        with self.server.guard:
            body = self.server.objects.get(self.path.split("?")[0])
        if body is None:
            error = b"<Error><Code>NoSuchKey</Code><Message>none</Message></Error>"
            self._reply(404, error)
            return
        self._reply(200, body, etag=f'"{hashlib.md5(body).hexdigest()}"')

    do_HEAD = do_GET

    def do_DELETE(self) -> None:
        with self.server.guard:
            self.server.objects.pop(self.path, None)
        self._reply(204)


class CarelessS3(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[str, bytes] = {}
        self.guard = threading.Lock()
        # How many condition headers arrived (and were ignored): proof the client sent them.
        self.conditions_seen = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> CarelessS3:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()
        self.server_close()
