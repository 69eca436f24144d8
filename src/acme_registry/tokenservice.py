"""The token endpoint's logic: who is asking, what they get, and the signed answer.

Protocols: distribution's "Token Authentication Specification" (``GET /token``) and
"OAuth2 Token Authentication" (``POST /token``, the ``password`` and ``refresh_token``
grants docker and containerd use). :class:`TokenService` turns a parsed
:class:`~acme_registry.tokenhttp.Request` into a :class:`~acme_registry.tokenhttp.Response`;
the HTTP/TLS server around it is :mod:`acme_registry.tokenhttp`.

- ``GET /token?service=S&scope=...&account=A[&offline_token=true]`` with basic
  credentials or none (anonymous).
- ``POST /token`` form-encoded: ``grant_type=password`` (``username``, ``password``) or
  ``grant_type=refresh_token`` (``refresh_token``), with ``service``, ``scope``
  (space-separated), ``client_id``, ``access_type=offline``.
- Answers ``token`` and ``access_token`` (the same JWT), ``expires_in``, ``issued_at``; on
  POST also ``scope``; ``refresh_token`` when offline access was asked for (and a user
  logged in).
- 400: malformed scope, unknown service or grant, an ``account`` that is not the
  authenticated user (it never decides identity); 401: unknown user, wrong password,
  invalid refresh token; 429 with ``Retry-After``: throttled (:mod:`.throttle`) or all
  password workers busy.

Passwords are compared with bcrypt in a small thread pool (:class:`PasswordChecker`), never
on the event loop: at most ``workers`` comparisons at once; a login that cannot get a
worker within ``wait`` seconds gets 429. An unknown user is compared against a dummy hash,
so the answer takes as long as for a known one.

Users, their password hashes and their grants are looked up at every request through the
callables given, so changes apply to the next token without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import bcrypt

from .policy import Grants, ScopeError, granted_access, parse_scopes
from .throttle import LoginThrottle
from .tokenhttp import Request, Response
from .tokens import KeyReference, Keyring, RefreshTokens, TokenError, access_claims

log = logging.getLogger(__name__)

MAX_FIELD = 4096  # any one parameter; user names are 64, passwords 72 bytes at most
DUMMY_COST = 10

# Metric reasons for acme_registry_auth_failures_total{reason}.
REASON_CREDENTIALS = "invalid_credentials"
REASON_REFRESH = "invalid_refresh_token"
REASON_THROTTLED = "throttled"
REASON_BUSY = "busy"
REASON_REQUEST = "bad_request"


class Busy(Exception):
    """No password worker became free in time."""


class PasswordChecker:
    """bcrypt comparisons in at most ``workers`` threads; the rest wait up to ``wait`` s."""

    def __init__(self, workers: int = 2, wait: float = 2.0, dummy_cost: int = DUMMY_COST) -> None:
        self.workers = workers
        self.wait = wait
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "token-bcrypt")
        self._slots: asyncio.Semaphore | None = None
        # Made once: an unknown name is compared against this, at the cost of a real hash.
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(dummy_cost))

    async def check(self, password: str, hashed: str | None) -> bool:
        if self._slots is None:  # created on the serving loop, not the constructor's thread
            self._slots = asyncio.Semaphore(self.workers)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait)
        except TimeoutError:
            raise Busy from None
        try:
            loop = asyncio.get_running_loop()
            target = hashed.encode() if hashed else self._dummy
            matched = await loop.run_in_executor(self._pool, _checkpw, password.encode(), target)
            return matched and hashed is not None
        finally:
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # over 72 bytes, or a malformed stored hash
        return False


@dataclass
class Hooks:
    """Callbacks for the metrics: a failure by reason, a token issued."""

    failure: Callable[[str], None] = lambda reason: None
    issued: Callable[[], None] = lambda: None


@dataclass
class TokenService:
    """Answers token requests. Every collaborator is passed in (the agent wires them).

    ``password_hash(name)`` is the user's current bcrypt hash or None (no such user);
    ``grants(name)`` what a user (None: anonymous) may do, e.g.
    :func:`~acme_registry.policy.effective_grants` over the policy file and run-time grants;
    ``keyring()`` the current signing keyring; ``key_reference`` how tokens name their key
    (``kid`` only for a registry that maps keys by it: 3.x); ``refresh_binding(name)``
    what a refresh token binds the user to (a changed value invalidates it), by default
    ``password_hash``.
    """

    service: str
    issuer: str
    ttl: int
    password_hash: Callable[[str], str | None]
    grants: Callable[[str | None], Grants]
    keyring: Callable[[], Keyring]
    checker: PasswordChecker
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    hooks: Hooks = field(default_factory=Hooks)
    clock: Callable[[], float] = time.time
    key_reference: KeyReference = KeyReference.X5C
    refresh_binding: Callable[[str], str | None] | None = None

    async def handle(self, request: Request, client: str) -> Response:
        if request.path != "/token":
            return _error(404, "not_found", "no such endpoint")
        try:
            if request.method == "GET":
                return await self._get(request, client)
            if request.method == "POST":
                return await self._post(request, client)
            response = _error(405, "invalid_request", "use GET or POST")
            response.headers.append(("Allow", "GET, POST"))
            return response
        except _Refusal as refusal:
            self.hooks.failure(refusal.reason)
            return refusal.response

    # -- the two forms ---------------------------------------------------------------------

    async def _get(self, request: Request, client: str) -> Response:
        params = _single_values(request.query, repeated=("scope",))
        self._check_service(params.get("service"))
        scopes = _scopes(request.query.get("scope", []))
        account = params.get("account")
        credentials = _basic_credentials(request.headers.get("authorization"))
        user = None
        hashed = None
        if credentials is not None:
            name, password = credentials
            if account is not None and account != name:
                raise _bad_request("account is not the user whose credentials were sent")
            user, hashed = await self._login(name, password, client)
        elif account is not None:
            raise _bad_request("account given without credentials")
        offline = params.get("offline_token", "").lower() == "true"
        return self._answer(user, hashed, scopes, offline=offline, oauth=False)

    async def _post(self, request: Request, client: str) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise _bad_request("POST /token takes application/x-www-form-urlencoded")
        try:
            form = parse_qs(
                request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except UnicodeDecodeError:
            raise _bad_request("the form is not UTF-8") from None
        params = _single_values(form, repeated=())
        self._check_service(params.get("service"))
        scopes = _scopes([params.get("scope", "")])
        grant = params.get("grant_type")
        offline = params.get("access_type") == "offline"
        if grant == "password":
            name, password = params.get("username", ""), params.get("password", "")
            if not name:
                raise _bad_request("username is missing")
            user, hashed = await self._login(name, password, client)
            return self._answer(user, hashed, scopes, offline=offline, oauth=True)
        if grant == "refresh_token":
            user = self._refresh_user(params.get("refresh_token", ""))
            response = self._answer(user, None, scopes, offline=False, oauth=True)
            return response
        raise _bad_request(
            "grant_type must be password or refresh_token", code="unsupported_grant_type"
        )

    # -- steps -----------------------------------------------------------------------------

    def _check_service(self, service: str | None) -> None:
        if service is not None and service != self.service:
            raise _bad_request(f"unknown service {service[:100]!r}")

    async def _login(self, name: str, password: str, client: str) -> tuple[str, str]:
        wait = self.throttle.check(name, client)
        if wait is not None:
            log.info("token: login for %r from %s throttled for %d s", name[:64], client, wait)
            raise _Refusal(REASON_THROTTLED, _throttled(wait))
        hashed = self.password_hash(name)
        try:
            matched = await self.checker.check(password, hashed)
        except Busy:
            log.warning("token: every password worker busy; login from %s refused", client)
            raise _Refusal(REASON_BUSY, _throttled(1)) from None
        if not matched or hashed is None:
            self.throttle.failed(name, client)
            log.info("token: login failed for %r from %s", name[:64], client)
            raise _Refusal(REASON_CREDENTIALS, _unauthorized("invalid username or password"))
        self.throttle.succeeded(name, client)
        return name, hashed

    def _refresh_user(self, token: str) -> str:
        keyring = self.keyring()
        try:
            return RefreshTokens(keyring.refresh_secret).verify(
                token, self.service, self._now(), self.refresh_binding or self.password_hash
            )
        except TokenError as exc:
            log.info("token: refresh token refused: %s", exc)
            raise _Refusal(REASON_REFRESH, _unauthorized(str(exc))) from None

    def _answer(
        self,
        user: str | None,
        hashed: str | None,
        scopes: list[Any],
        *,
        offline: bool,
        oauth: bool,
    ) -> Response:
        now = self._now()
        access = granted_access(self.grants(user), scopes)
        keyring = self.keyring()
        claims = access_claims(
            issuer=self.issuer,
            subject=user or "",
            audience=self.service,
            access=[a.claim() for a in access],
            now=now,
            ttl=dt.timedelta(seconds=self.ttl),
        )
        token = keyring.current.sign(claims, self.key_reference)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if oauth:
            body["scope"] = " ".join(a.scope() for a in access)
        if offline and user is not None and hashed is not None:
            binding = self.refresh_binding(user) if self.refresh_binding else hashed
            if binding is not None:
                refresh = RefreshTokens(keyring.refresh_secret)
                body["refresh_token"] = refresh.issue(user, binding, self.service, now)
        self.hooks.issued()
        return _json(200, body)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(int(self.clock()), dt.UTC)


# -- helpers -----------------------------------------------------------------------------


class _Refusal(Exception):
    def __init__(self, reason: str, response: Response) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def _bad_request(message: str, code: str = "invalid_request") -> _Refusal:
    return _Refusal(REASON_REQUEST, _error(400, code, message))


def _single_values(params: Mapping[str, list[str]], repeated: tuple[str, ...]) -> dict[str, str]:
    """One value per parameter (a repeated one, other than ``repeated``, is malformed)."""
    values = {}
    for key, items in params.items():
        if any(len(item) > MAX_FIELD for item in items):
            raise _bad_request(f"parameter {key[:40]!r} is too long")
        if key in repeated:
            continue
        if len(items) != 1:
            raise _bad_request(f"parameter {key[:40]!r} is repeated")
        values[key] = items[0]
    return values


def _scopes(values: list[str]) -> list[Any]:
    try:
        return parse_scopes(values)
    except ScopeError as exc:
        raise _Refusal(REASON_REQUEST, _error(400, "invalid_scope", str(exc))) from None


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise _Refusal(REASON_REQUEST, _unauthorized("only Basic credentials are accepted"))
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _Refusal(REASON_REQUEST, _unauthorized("malformed Basic credentials")) from None
    name, colon, password = decoded.partition(":")
    if not colon or not name:
        raise _Refusal(REASON_REQUEST, _unauthorized("malformed Basic credentials"))
    return name, password


def _json(
    status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
) -> Response:
    return Response(
        status,
        json.dumps(body).encode(),
        [
            ("Content-Type", "application/json"),
            ("Cache-Control", "no-store"),
            ("Pragma", "no-cache"),
            *(headers or []),
        ],
    )


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": code, "error_description": message})


def _unauthorized(message: str) -> Response:
    response = _error(401, "invalid_grant", message)
    response.headers.append(("WWW-Authenticate", 'Basic realm="acme-registry"'))
    return response


def _throttled(seconds: float) -> Response:
    response = _error(429, "too_many_requests", f"too many attempts; retry after {seconds:.0f} s")
    response.headers.append(("Retry-After", f"{seconds:.0f}"))
    return response
