"""The real registry binary in token mode with our token service beside it, on loopback.

:class:`TokenStack` starts the token service in this process (its own event loop thread,
as the agent will run it) and the registry binary configured with ``auth.token`` pointing
at it, both serving TLS for ``registry.test`` from a throwaway CA. Users, passwords and the
policy are plain attributes read at every token request, so a test changes them at will.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from acme_registry import policy, tokenconfig
from acme_registry.policy import Grants, Policy
from acme_registry.throttle import LoginThrottle
from acme_registry.tokenhttp import ServerCertificate, ThreadedServer, TokenHTTPServer
from acme_registry.tokenmode import registry_key_reference
from acme_registry.tokens import Keyring
from acme_registry.tokenservice import Hooks, PasswordChecker, TokenService
from tests.support.clients import Skopeo
from tests.support.lifecycle import StartStop
from tests.support.ports import free_ports
from tests.support.tls import TestCA

NAME = "registry.test"
ISSUER = f"acme-registry@{NAME}"
COST = 4  # the tests log in often; the cost is irrelevant to what they check


@dataclass
class Counters:
    failures: dict[str, int] = field(default_factory=dict)
    issued: int = 0

    def hooks(self) -> Hooks:
        def failure(reason: str) -> None:
            self.failures[reason] = self.failures.get(reason, 0) + 1

        def issued() -> None:
            self.issued += 1

        return Hooks(failure=failure, issued=issued)


class TokenStack(StartStop):
    """Registry + token service; ``start()`` / ``stop()`` (or a ``with`` block)."""

    def __init__(
        self,
        workdir: Path,
        binary: Path,
        *,
        users: dict[str, str] | None = None,
        policy_text: str = "",
        anonymous_pull: tuple[str, ...] = (),
        ttl: int = 300,
        proxy_protocol: bool = False,
        checker: PasswordChecker | None = None,
        throttle: LoginThrottle | None = None,
        storage: Path | None = None,
        ca: TestCA | None = None,
        access_log: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.storage = storage or self.workdir / "storage"
        self.access_log = access_log
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.hashes = {
            name: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(COST)).decode()
            for name, pw in (users or {}).items()
        }
        self.policy: Policy = policy.parse_policy(policy_text, "test policy")
        self.runtime: dict[str, Grants] = {}
        self.anonymous_pull = anonymous_pull
        self.ca = ca or TestCA()
        self.keyring = Keyring.create(dt.datetime.now(dt.UTC))
        self.counters = Counters()
        # As the agent chooses it: kid for 3.x, x5c for 2.8.
        self.key_reference = registry_key_reference(binary)
        self.registry_port, self.token_port = free_ports(2)
        self.settings = tokenconfig.load_token_settings(
            {"TOKEN_ADDR": f"127.0.0.1:{self.token_port}", "TOKEN_TTL": str(ttl)}, (NAME,)
        )
        self.tls_path = self.workdir / "tls.pem"
        self.tls_path.write_bytes(self.ca.issue([NAME]))
        self.tls_path.chmod(0o600)
        self.certificate = ServerCertificate(self.tls_path)
        self.service = TokenService(
            service=self.settings.service,
            issuer=self.settings.issuer,
            ttl=self.settings.ttl,
            password_hash=self.hashes.get,
            grants=lambda user: policy.effective_grants(
                user, self.policy, self.runtime, self.anonymous_pull
            ),
            keyring=lambda: self.keyring,
            checker=checker or PasswordChecker(dummy_cost=COST),
            throttle=throttle or LoginThrottle(),
            hooks=self.counters.hooks(),
            key_reference=self.key_reference,
        )
        self.server = ThreadedServer(
            TokenHTTPServer(self.service.handle, self.certificate, proxy_protocol=proxy_protocol),
            "127.0.0.1",
            self.token_port,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "registry.log"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> TokenStack:
        self.server.start()
        self._start_registry(self.keyring.bundle_pem(dt.datetime.now(dt.UTC)))
        return self

    def restart_registry(self, bundle_pem: bytes) -> None:
        """A new registry process trusting ``bundle_pem``, as a rotation would start."""
        self._stop_registry()
        self._start_registry(bundle_pem)

    def _start_registry(self, bundle_pem: bytes) -> None:
        bundle = self.workdir / "token-roots.pem"
        bundle.write_bytes(bundle_pem)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": not self.access_log}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
            "http": {
                "addr": f"127.0.0.1:{self.registry_port}",
                "secret": "test-http-secret",
                "tls": {"certificate": str(self.tls_path), "key": str(self.tls_path)},
            },
        }
        rendered = tokenconfig.registry_token_config(self.settings, bundle)
        config["auth"] = rendered["auth"]
        config["storage"].update(rendered["storage"])
        config_path = self.workdir / "registry.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "serve", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"PATH": os.environ["PATH"], "OTEL_TRACES_EXPORTER": "none"},
            )
        self._wait_registry(timeout=20)

    def _stop_registry(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._stop_registry()
        self.server.stop()
        self.service.checker.close()

    def registry_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_registry(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the registry exited at start:\n{self.registry_log()}")
            try:
                status, _, _ = self.registry_request("GET", "/v2/")
                if status == 401:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the registry did not answer:\n{self.registry_log()}")
            time.sleep(0.05)

    # -- clients ---------------------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.pem.decode())

    def skopeo(self, workdir: Path, creds: str | None = None) -> Skopeo:
        return Skopeo(workdir, self.ca.pem, [NAME], creds=creds)

    def ref(self, repository: str, tag: str = "v1") -> str:
        return f"{NAME}:{self.registry_port}/{repository}:{tag}"

    def registry_request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to the registry (dialled on 127.0.0.1, the certificate checked)."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.registry_port, context=self.context(), timeout=30
        )
        try:
            sent = dict(headers or {})
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            conn.request(method, path, headers=sent)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def token_request(
        self,
        method: str = "GET",
        query: str = "",
        *,
        creds: tuple[str, str] | None = None,
        form: str | None = None,
        source: str | None = None,
        prefix: bytes = b"",
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """One request to the token service; ``source`` binds the client's address."""
        conn = _TokenConnection(
            "127.0.0.1",
            self.token_port,
            context=self.context(),
            timeout=30,
            source_address=(source, 0) if source else None,
            prefix=prefix,
        )
        try:
            headers = {}
            if creds is not None:
                raw = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
                headers["Authorization"] = f"Basic {raw}"
            body = None
            if form is not None:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                body = form.encode()
            conn.request(method, f"/token{'?' + query if query else ''}", body, headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), json.loads(data or b"{}")
        finally:
            conn.close()

    def token(self, scope: str, creds: tuple[str, str] | None = None) -> str:
        status, _, body = self.token_request("GET", f"service={NAME}&scope={scope}", creds=creds)
        assert status == 200, body
        return str(body["token"])


class _TokenConnection(http.client.HTTPSConnection):
    """HTTPS that can send bytes (a PROXY header) before the TLS handshake."""

    def __init__(self, *args: Any, prefix: bytes = b"", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefix = prefix

    def connect(self) -> None:
        if not self._prefix:
            super().connect()
            return
        http.client.HTTPConnection.connect(self)
        self.sock.sendall(self._prefix)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)  # type: ignore[attr-defined]
